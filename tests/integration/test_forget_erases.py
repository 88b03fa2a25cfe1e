"""After ``adaptloop forget``, no file adaptloop keeps holds the erased content (issue 24, "Erasure that erases").

    python -m pytest tests/integration/test_forget_erases.py -m integration -v

On the session's real Tansu broker: a session's interactions (with an e-mail address and an order code no
other record has) go through a gateway's outbox as the gateway records them; their curated examples are
on the curated topic; a snapshot of them is in the artifact store as the trainer writes it, and an adapter
trained from it (its folder, checkpoints and Ray run state) with its release record. ``adaptloop forget
--session ... --retire`` then runs as a user runs it (``main``, settings from the environment), and every
file under the artifact store and the outbox is searched. No training, no vLLM: seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from adaptloop.erasure import ErasureSet
from adaptloop.kafka import Range, read_topics
from adaptloop.ops import forget
from adaptloop.ops.lineage import LineageRecords
from adaptloop.records import read_decoded
from adaptloop.sdk import build_interaction
from adaptloop.serving.recording import InteractionLog
from adaptloop.settings import GatewaySettings
from adaptloop.trainers.snapshot import REWRITTEN, build_snapshot, read_snapshot, write_snapshot
from curation_helpers import produce

pytestmark = pytest.mark.integration

TENANT, TASK = "acme", "order-extract"
WAIT_S = 30.0


async def record_through_the_outbox(settings: GatewaySettings, interactions: list[dict]) -> None:
    """As the gateway records calls in outbox mode: each in the outbox first, then produced; wait until acknowledged."""
    log = InteractionLog(settings)
    log.start()
    try:
        for interaction in interactions:
            log.enqueue(interaction)
        deadline = time.monotonic() + WAIT_S
        while log.outbox.unacknowledged_bytes:
            assert time.monotonic() < deadline, f"{log.outbox.unacknowledged_bytes} outbox bytes never acknowledged"
            await asyncio.sleep(0.05)
    finally:
        log.begin_close()
        log.close()
        log.close_outbox()


def curated(interaction: dict, split: str, offset: int) -> dict:
    """The CuratedExample curation writes for a validated interaction (curated_example.v3)."""
    return {
        "example_id": interaction["interaction_id"], "tenant": TENANT, "task": TASK,
        "session_id": interaction["session_id"], "episode_id": "", "turn": 1, "scope": "CALL", "split": split,
        "kind": "SUCCESS", "admitted": True, "reject_reason": None,
        "prompt_messages": [{"role": m["role"], "content": m["content"].replace(EMAIL, "[EMAIL]"),
                             "tool_calls": [], "tool_call_id": None, "name": None}
                            for m in interaction["request_messages"]],
        "tools_json": None, "completion": interaction["response"], "completion_tool_calls": [],
        "rejected": None, "rejected_tool_calls": [], "score": 1.0, "scorer": "order_json@1",
        "curated_at": int(time.time() * 1000),
        "lineage": {"interaction": {"topic": "agent.interactions", "partition": 0, "offset": offset},
                    "outcomes": [], "outcome_ids": [], "code_version": "test", "winning_outcome_id": None},
        "served_by": None, "event_time": interaction["event_time"], "outcome_source": "VALIDATOR",
        "redactions": [{"rule": "email", "count": 1}] if EMAIL in json.dumps(interaction) else [],
        "content_hash": "", "near_duplicate_of": None, "subjects": [],
    }




def train_adapter(artifacts: Path, request_id: str, learned: bytes) -> Path:
    """What the trainer writes for a request (``trainers.ray_job``): the adapter, its checkpoints and Ray's copy,
    each holding ``learned`` as weights that memorised it would."""
    adapter = artifacts / request_id / "adapter"
    for folder in (adapter, artifacts / request_id / "checkpoints" / "checkpoint-2",
                   artifacts / "ray" / request_id / "checkpoint_000000"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
        (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 32 + learned)
    return adapter


def release(version: str, request: dict, adapter: Path, snapshot, state: str = "RELEASED") -> dict:
    return {
        "version": version, "tenant": TENANT, "task": TASK, "state": state, "reason": "gate passed",
        "base_model": "smollm2-135m-instruct", "artifact_uri": str(adapter), "digest": "sha256:" + "1" * 64,
        "lora_rank": 8, "method": "sft",
        "evaluation": {"metric": "success_rate:order_json@1", "holdout_count": len(snapshot.holdout),
                       "candidate_score": 0.9, "incumbent": "base", "incumbent_score": 0.0, "margin": 0.05},
        "lineage": {"request_id": request["request_id"], "dataset_digest": snapshot.digest,
                    "examples": request["examples"], "train_example_ids": snapshot.train_ids, "code_version": "test",
                    "config_json": "{}", "dataset_uri": snapshot.uri, "parent_version": None},
        "created_at": int(time.time() * 1000), "regression": [], "decided_by": "gate", "evidence_json": "{}",
        "training_json": "{}", "base_model_digest": None,
    }


def readable(path: Path) -> bytes:
    """A file's bytes, and for a Parquet file its decoded rows too (its pages are compressed: a text can be in
    it without its bytes being)."""
    data = path.read_bytes()
    if data.startswith(b"PAR1") and data.endswith(b"PAR1"):
        import pyarrow.parquet as pq

        data += json.dumps(pq.read_table(path).to_pylist()).encode()
    return data


def files_holding(roots: list[Path], needles: list[str]) -> dict[str, list[str]]:
    """needle -> every file under ``roots`` that holds it (Parquet files decoded)."""
    found: dict[str, list[str]] = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                data = readable(path)
                for needle in needles:
                    if needle.encode() in data:
                        found.setdefault(needle, []).append(str(path))
    return found


EMAIL = f"zq.{uuid.uuid4().hex[:8]}@harlow-example.com"
ORDER = f"zebra-quartz-{uuid.uuid4().hex[:8]}"


def test_after_forget_no_file_of_the_artifact_store_or_the_outbox_holds_the_erased_text(kafka, topics, tmp_path,
                                                                                      monkeypatch, capsys):
    artifacts, outbox = tmp_path / "artifacts", tmp_path / "gateway-outbox"
    erased_session, run = "s-erased", uuid.uuid4().hex[:6]

    # 1. The calls, recorded by a gateway's outbox on the real broker: 3 of the erased session, 7 others.
    calls = [build_interaction(
        tenant=TENANT, agent="bot", task=TASK, session_id=erased_session if i < 3 else f"s-{i}",
        interaction_id=f"i-{run}-{i}", base_model="smollm2-135m-instruct", response=f'{{"sku": "A{i}", "qty": {i}}}',
        messages=[{"role": "user", "content": f"ship {i} crates of {ORDER} to {EMAIL}" if i < 3
                   else f"ship {i} crates of bolts"}]) for i in range(10)]
    asyncio.run(record_through_the_outbox(GatewaySettings(kafka=kafka, topics=topics, outbox_dir=outbox), calls))
    received = read_topics(kafka, [topics.name("interactions")])[topics.name("interactions")]
    assert len(received) == 10 and any(EMAIL.encode() in m.value() for m in received)

    # 2. Their curated examples (redacted: the order code stays, the address does not), then a training request.
    examples = [curated(c, "HOLDOUT" if i in (2, 9) else "TRAIN", i) for i, c in enumerate(calls)]
    produce(kafka, topics.name("curated"), "curated_example", examples, key=lambda r: f"{TENANT}/{TASK}")
    ranges = [{"topic": topics.name("curated"), "partition": 0, "start_offset": 0, "end_offset": 10}]
    request = {"request_id": f"req-{run}", "tenant": TENANT, "task": TASK, "created_at": int(time.time() * 1000),
               "trigger": "count>=8", "examples": ranges, "train_count": 8, "holdout_count": 2, "code_version": "test"}
    produce(kafka, topics.name("training_requests"), "training_request", [request], key=lambda r: f"{TENANT}/{TASK}")

    # 3. The trainer's snapshot of the request (as TrainerService.snapshot reads and writes it) and the adapter.
    positioned = [(p.partition, p.offset, p.record)
                  for p in read_decoded(kafka, topics.name("curated"), "curated_example", [Range(0, 0, 10)])]
    snapshot = write_snapshot(build_snapshot(positioned, tenant=TENANT, task=TASK, ranges=ranges,
                                             erasures=ErasureSet()), str(artifacts))
    assert {f"i-{run}-0", f"i-{run}-1"} <= set(snapshot.train_ids)
    adapter = train_adapter(artifacts, request["request_id"], ORDER.encode())
    version = f"{TENANT}--{TASK}--{run}"
    # Another tenant's adapter, trained on nothing erased: it must be left alone.
    bystander = train_adapter(artifacts, f"req-other-{run}", b"other weights")
    produce(kafka, topics.name("releases"), "adapter_release", [release(version, request, adapter, snapshot)],
            key=lambda r: r["version"])

    erased_ids = [f"i-{run}-{i}" for i in range(3)]
    before = files_holding([artifacts, outbox], [ORDER, EMAIL, *erased_ids])
    assert set(before) == {ORDER, *erased_ids}  # the snapshot and the adapter hold them (the address was redacted)
    assert len(before[ORDER]) == 5  # the snapshot's two splits, the adapter, its checkpoint and Ray's copy

    # 4. forget, as a user runs it.
    for name, value in {"ADAPTLOOP_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                        "ADAPTLOOP_KAFKA_EMBEDDED": str(kafka.embedded).lower(),
                        "ADAPTLOOP_TOPICS_PREFIX": topics.prefix,
                        "ADAPTLOOP_TRAINER_ARTIFACT_DIR": str(artifacts)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ADAPTLOOP_TRAINER_DATASET_STORE", raising=False)
    started = time.monotonic()
    code = forget.main(["--session", erased_session, "--tenant", TENANT, "--retire", "--json"])
    took = time.monotonic() - started
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out["store"]["problems"]
    assert sorted(out["matched_examples"]) == erased_ids
    assert [(a["version"], a["new_state"]) for a in out["adapters"]] == [(version, "RETIRED")]

    # The must-show: nothing under the artifact store or the outbox holds the text, the address or the examples.
    assert files_holding([artifacts, outbox], [ORDER, EMAIL, *erased_ids]) == {}
    assert not adapter.exists() and not (artifacts / "ray" / request["request_id"]).exists()
    assert (bystander / "adapter_model.safetensors").read_bytes().endswith(b"other weights")
    # The old snapshot folder keeps a note; readers of the release's dataset_uri get the content without them.
    assert [p.name for p in Path(snapshot.uri).iterdir()] == [REWRITTEN]
    (note,) = out["store"]["snapshots"]
    assert note["digest"] == snapshot.digest and note["rows_removed"] == 3
    now = read_snapshot(snapshot.uri)
    assert now.digest == note["rewritten_into"] and len(now.train) + len(now.holdout) == 7
    assert not set(erased_ids) & {r["example_id"] for r in now.train + now.holdout}
    latest = [p.record for p in LineageRecords.read(kafka, topics).releases if p.record["version"] == version][-1]
    assert (latest["state"], latest["decided_by"]) == ("RETIRED", "erasure")

    # Once more: the same erasure, nothing left to do, nothing published twice.
    assert forget.main(["--session", erased_session, "--tenant", TENANT, "--retire", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["store"]["snapshots"] == [] and again["store"]["problems"] == []
    assert [a["action"] for a in again["adapters"]] == ["none (already decided)"]
    print(f"\nforget took {took:.1f}s")
