"""The adapter_release record the trainer publishes for a request, released or rejected."""

from __future__ import annotations

from typing import Any, Mapping

from adaptloop.schemas.contract import code_version, now_ms
from adaptloop.trainers.snapshot import Snapshot, canonical_json

DECIDED_BY = "gate"


def build_release(request: Mapping[str, Any], *, base_model: str, base_model_digest: str | None, state: str,
                  reason: str, version: str, artifact_uri: str | None, digest: str | None, snapshot: Snapshot | None,
                  method: str, config: Mapping[str, Any], lora_rank: int, evaluation: dict, regression: list[dict],
                  evidence: dict, training: dict, parent_version: str | None,
                  canary_share: float | None = None) -> dict:
    """The release of ``request``'s decision; ``base_model`` is the base's name, ``base_model_digest`` the digest
    a server recomputes to refuse another base."""
    return {
        "version": version,
        "tenant": request["tenant"],
        "task": request["task"],
        "state": state,
        "reason": reason,
        "base_model": base_model,
        "artifact_uri": artifact_uri,
        "digest": digest,
        "lora_rank": lora_rank,
        "method": method,
        "evaluation": evaluation,
        "lineage": {
            "request_id": request["request_id"],
            "dataset_digest": snapshot.digest if snapshot else "",
            "examples": [{"topic": r["topic"], "partition": r["partition"], "start_offset": r["start_offset"],
                          "end_offset": r["end_offset"]} for r in request["examples"]],
            "train_example_ids": snapshot.train_ids if snapshot else [],
            "code_version": code_version(),
            "config_json": canonical_json(config),
            "dataset_uri": snapshot.uri if snapshot else "",
            "parent_version": parent_version,
        },
        "created_at": now_ms(),
        "regression": regression,
        "decided_by": DECIDED_BY,
        "evidence_json": canonical_json(evidence),
        "training_json": canonical_json(training),
        "base_model_digest": base_model_digest,
        "canary_share": canary_share,
    }
