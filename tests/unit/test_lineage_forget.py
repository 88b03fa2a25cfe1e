"""Lineage folds and the forget plan, over decoded records with positions (no broker)."""

from __future__ import annotations

import json

import pytest

from adaptloop.erasure import build_erasure, subject_key
from adaptloop.errors import ConfigError
from adaptloop.ops.forget import (FLAG_REASON, erasure_id_for, infer_tenant, plan_forget, render,
                                  retrain_request_id)
from adaptloop.ops.lineage import (LineageRecords, adapter_lineage, interaction_lineage, ranges_contain, render_adapter,
                                   render_interaction)
from adaptloop.records import Positioned
from adaptloop.schemas import SerdeContext, serde_for

CURATED = "examples.curated"
TENANT, TASK = "acme", "order-extract"


def example(i: int, *, split: str = "TRAIN", tenant: str = TENANT, session: str | None = None,
            subjects: list[str] = (), admitted: bool = True, partition: int = 0) -> Positioned:
    record = {
        "example_id": f"i-{i}", "tenant": tenant, "task": TASK, "session_id": session or f"s-{i}",
        "split": split, "kind": "SUCCESS", "admitted": admitted, "reject_reason": None if admitted else "dup",
        "prompt_messages": [{"role": "user", "content": f"order {i}"}], "completion": "{}", "rejected": None,
        "score": 1.0, "scorer": "order_json@1", "curated_at": 1_700_000_000_000 + i,
        "lineage": {"interaction": {"topic": "agent.interactions", "partition": 1, "offset": 100 + i},
                    "outcomes": [], "outcome_ids": [], "code_version": "test", "winning_outcome_id": None},
        "served_by": None, "event_time": 0, "outcome_source": "VALIDATOR", "redactions": [], "content_hash": "",
        "near_duplicate_of": None, "subjects": list(subjects),
    }
    return Positioned(CURATED, partition, i, record)


def request(request_id: str, start: int, end: int, *, train: int, holdout: int) -> dict:
    return {"request_id": request_id, "tenant": TENANT, "task": TASK, "created_at": 1_700_000_100_000,
            "trigger": "count>=4", "examples": [{"topic": CURATED, "partition": 0, "start_offset": start,
                                                 "end_offset": end}],
            "train_count": train, "holdout_count": holdout, "code_version": "test"}


def release(version: str, req: dict, train_ids: list[str], *, state: str = "RELEASED", decided_by: str = "gate",
            evidence: dict | None = None) -> dict:
    return {
        "version": version, "tenant": TENANT, "task": TASK, "state": state, "reason": "gate passed",
        "base_model": "smollm2", "artifact_uri": f"/a/{version}", "digest": "sha256:" + "0" * 64,
        "lora_rank": 8, "method": "sft",
        "evaluation": {"metric": "success_rate:order_json@1", "holdout_count": req["holdout_count"],
                       "candidate_score": 0.9, "incumbent": "base", "incumbent_score": 0.1, "margin": 0.05,
                       "ci_low": 0.7, "ci_high": 0.97, "incumbent_ci_low": 0.02, "incumbent_ci_high": 0.3,
                       "metrics": {}},
        "lineage": {"request_id": req["request_id"], "dataset_digest": "sha256:" + "d" * 64,
                    "examples": req["examples"], "train_example_ids": train_ids, "code_version": "test",
                    "config_json": '{"lora_rank": 8}', "dataset_uri": "file:///snap/x", "parent_version": None},
        "created_at": 1_700_000_200_000, "regression": [], "decided_by": decided_by,
        "evidence_json": json.dumps(evidence or {"gate": "ok"}), "training_json": '{"steps": 3}',
        "base_model_digest": None,
    }


@pytest.fixture
def records() -> LineageRecords:
    """Examples 0..5 on partition 0 (4 is holdout, 5 another tenant), one on partition 1; two requests:
    r1 = [0, 5) trained v1 (now PROMOTED by the canary), r2 = [5, 6) is another tenant's and untrained."""
    curated = [example(0, session="s-shared"), example(1, session="s-shared"), example(2, subjects=["subj:x"]),
               example(3), example(4, split="HOLDOUT"), example(5, tenant="globex"), example(9, partition=1)]
    r1 = request("r1", 0, 5, train=4, holdout=1)
    r2 = request("r2", 5, 6, train=1, holdout=0)
    v1 = release("acme--order-extract--v1", r1, ["i-0", "i-1", "i-2", "i-3"])
    promoted = v1 | {"state": "PROMOTED", "decided_by": "canary", "reason": "canary won",
                     "evidence_json": '{"canary_n": 40}'}
    rejected = release("acme--order-extract--v0", r1, ["i-0", "i-1", "i-2", "i-3"], state="REJECTED")
    return LineageRecords(
        curated=curated,
        requests=[Positioned("training.requests", 0, 0, r1), Positioned("training.requests", 0, 1, r2)],
        releases=[Positioned("adapters.releases", 0, 0, rejected), Positioned("adapters.releases", 0, 1, v1),
                  Positioned("adapters.releases", 0, 2, promoted)])


def test_ranges_contain_is_half_open_and_per_partition():
    ranges = [{"topic": CURATED, "partition": 0, "start_offset": 2, "end_offset": 5}]
    assert [o for o in range(7) if ranges_contain(ranges, CURATED, 0, o)] == [2, 3, 4]
    assert not ranges_contain(ranges, CURATED, 1, 3)
    assert not ranges_contain(ranges, "other", 0, 3)


def test_adapter_lineage_has_every_decision_the_dataset_the_request_and_the_gate(records):
    view = adapter_lineage("acme--order-extract--v1", records)
    assert view["state"] == "PROMOTED"
    assert [(d["state"], d["decided_by"]) for d in view["decisions"]] == [("RELEASED", "gate"), ("PROMOTED", "canary")]
    assert view["decisions"][1]["evidence"] == {"canary_n": 40}
    assert view["dataset"]["digest"] == "sha256:" + "d" * 64 and view["dataset"]["uri"] == "file:///snap/x"
    assert view["dataset"]["train_examples"] == 4
    assert view["dataset"]["source_ranges"] == [{"topic": CURATED, "partition": 0, "start_offset": 0, "end_offset": 5}]
    assert view["request"]["request_id"] == "r1" and view["request"]["trigger"] == "count>=4"
    assert view["gate"]["evaluation"]["candidate_score"] == 0.9 and view["gate"]["evidence"] == {"gate": "ok"}
    text = render_adapter(view)
    assert "PROMOTED    by canary" in text and "examples.curated[0] 0..5" in text
    with pytest.raises(KeyError):
        adapter_lineage("nope", records)


def test_interaction_lineage_goes_forward_to_requests_and_adapters(records):
    trained = interaction_lineage("i-2", records)
    assert [e["example_id"] for e in trained["examples"]] == ["i-2"]
    assert trained["examples"][0]["interaction"] == {"topic": "agent.interactions", "partition": 1, "offset": 102}
    assert [r["request_id"] for r in trained["requests"]] == ["r1"]
    assert {a["version"]: (a["state"], a["uses"]["i-2"]) for a in trained["adapters"]} == {
        "acme--order-extract--v0": ("REJECTED", "train"), "acme--order-extract--v1": ("PROMOTED", "train")}

    holdout = interaction_lineage("i-4", records)
    assert [r["request_id"] for r in holdout["requests"]] == ["r1"]
    assert all(a["uses"] == {"i-4": "holdout"} and a["learned_from"] == [] for a in holdout["adapters"])

    untrained = interaction_lineage("i-9", records)
    assert untrained["requests"] == [] and untrained["adapters"] == []
    assert interaction_lineage("i-2", records, tenant="globex")["examples"] == []
    assert "no curated example" in render_interaction(interaction_lineage("missing", records))


def test_forget_flags_the_live_adapter_and_asks_for_a_retrain_over_the_same_ranges(records):
    erasure = build_erasure(tenant=TENANT, scope="INTERACTION", key="i-2",
                            erasure_id=erasure_id_for(TENANT, "INTERACTION", "i-2"))
    plan = plan_forget(erasure, records, retire=False, decided_at=42)
    assert [p.record["example_id"] for p in plan.matched] == ["i-2"]
    actions = {a.version: a for a in plan.adapters}
    assert actions["acme--order-extract--v0"].action == "none (not live)"
    assert actions["acme--order-extract--v0"].decision is None
    flagged = actions["acme--order-extract--v1"]
    assert flagged.action == "flag" and flagged.learned_from == ["i-2"]
    decision = flagged.decision
    assert decision["state"] == "PROMOTED" and decision["decided_by"] == "erasure"
    assert decision["reason"].startswith(FLAG_REASON)
    assert decision["created_at"] == 1_700_000_200_000  # the adapter's; the decision time is in the evidence
    evidence = json.loads(decision["evidence_json"])
    assert evidence["erasure_id"] == erasure["erasure_id"] and evidence["matched_example_ids"] == ["i-2"]
    assert evidence["decided_at"] == 42 and evidence["previous_state"] == "PROMOTED"
    request = flagged.retrain_request
    assert request["request_id"] == retrain_request_id("r1", erasure["erasure_id"]) == evidence["retrain_request_id"]
    assert request["trigger"] == f"erasure:{erasure['erasure_id']}"
    assert request["examples"] == records.requests[0].record["examples"]
    assert (request["train_count"], request["holdout_count"]) == (3, 1)
    # Both records fit their schemas.
    for stem, record in (("adapter_release", decision), ("training_request", request)):
        serde = serde_for(stem)
        assert serde.deserialize(serde.serialize(record, SerdeContext("t")))["request_id" if stem == "training_request"
                                                                             else "version"]
    assert "retraining request" in render(plan)


def test_forget_retire_and_replay_and_scopes(records):
    erasure = build_erasure(tenant=TENANT, scope="SESSION", key="s-shared", erasure_id="era-1")
    retired = plan_forget(erasure, records, retire=True)
    assert sorted(p.record["example_id"] for p in retired.matched) == ["i-0", "i-1"]
    action = next(a for a in retired.adapters if a.version == "acme--order-extract--v1")
    assert action.decision["state"] == "RETIRED" and action.retrain_request is None
    assert action.learned_from == ["i-0", "i-1"]

    # Replay: the decision is on the topic now -> nothing more is published for that version.
    records.releases.append(Positioned("adapters.releases", 0, 3, action.decision))
    again = plan_forget(erasure, records, retire=True)
    assert {a.version: a.action for a in again.adapters}["acme--order-extract--v1"] == "none (already decided)"
    assert all(a.decision is None for a in again.adapters)

    # A flag whose retraining request is already on the requests topic publishes no second request.
    flag = build_erasure(tenant=TENANT, scope="SUBJECT", key="subj:x", erasure_id="era-2")
    records.releases.pop()
    records.requests.append(Positioned("training.requests", 0, 2, {"request_id": retrain_request_id("r1", "era-2")}))
    planned = plan_forget(flag, records, retire=False)
    assert [p.record["example_id"] for p in planned.matched] == ["i-2"]
    assert planned.requests_already_published == [retrain_request_id("r1", "era-2")]
    assert all(a.retrain_request is None for a in planned.adapters)

    # Another tenant's erasure touches nothing of acme's.
    other = plan_forget(build_erasure(tenant="globex", scope="INTERACTION", key="i-2", erasure_id="e3"), records,
                        retire=False)
    assert other.matched == [] and other.adapters == []


def test_erasure_ids_are_deterministic_and_tenant_is_inferred_or_refused(records):
    assert erasure_id_for("acme", "SUBJECT", subject_key("acme", "a@b.c", "s" * 32)) == \
        erasure_id_for("acme", "SUBJECT", subject_key("acme", "A@B.c", "s" * 32))
    assert erasure_id_for("acme", "SESSION", "s") != erasure_id_for("globex", "SESSION", "s")
    assert infer_tenant(records, "INTERACTION", "i-5") == "globex"
    assert infer_tenant(records, "SESSION", "s-shared") == "acme"
    with pytest.raises(ConfigError, match="pass --tenant"):
        infer_tenant(records, "INTERACTION", "unknown")


def test_an_adapter_is_loaded_from_a_read_only_copy_checked_after_it_was_made(tmp_path):
    """The sidecar hands vLLM a copy named by the digest and verified after copying, so an artifact swapped on the
    shared volume between the check and vLLM's load is never what gets served."""
    from adaptloop.artifacts import artifact_digest, pinned_copy, unpin
    from adaptloop.errors import ArtifactError

    shared = tmp_path / "artifacts" / "v1"
    shared.mkdir(parents=True)
    (shared / "adapter_config.json").write_text('{"r": 8}')
    (shared / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    digest = artifact_digest(shared)
    pinned = pinned_copy(shared, digest, tmp_path / "pinned")
    assert pinned.name == digest.removeprefix("sha256:") and artifact_digest(pinned) == digest
    assert all(not (p.stat().st_mode & 0o222) for p in [pinned, *pinned.rglob("*")])  # read-only
    (shared / "adapter_model.safetensors").write_bytes(b"\x01" * 64)  # swapped after the check
    assert (pinned / "adapter_model.safetensors").read_bytes() == b"\x00" * 64
    assert pinned_copy(shared, digest, tmp_path / "pinned") == pinned  # reused, checked again
    with pytest.raises(ArtifactError, match="digest mismatch"):
        pinned_copy(shared, "sha256:" + "0" * 64, tmp_path / "pinned")  # the changed content is refused
    assert [p.name for p in (tmp_path / "pinned").iterdir()] == [pinned.name]  # no staging left behind
    unpin(digest, tmp_path / "pinned")
    assert not pinned.exists()
