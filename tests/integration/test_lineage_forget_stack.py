"""status, lineage and forget on the real broker; forget -> retrain with the real trainer service.

    python -m pytest tests/integration/test_lineage_forget_stack.py -m integration -v -s

The first test drives the three commands as a user does (subprocesses of ``adaptloop``) against
the session's Tansu broker, with a real gateway process for status to ask. The second is the
issue's test: forget an interaction that fed a promoted adapter -> the adapter is flagged, the
next snapshot excludes the record, the retrained adapter's lineage no longer contains it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from adaptloop.demo_tasks import OrderGenerator
from adaptloop.kafka import read_topics
from adaptloop.ops.forget import FLAG_REASON, Forgetter, erasure_id_for, retrain_request_id
from adaptloop.ops.lineage import LineageRecords, adapter_lineage, interaction_lineage
from adaptloop.ops.stack import StackPorts, service_env, start_service
from adaptloop.processes import write_state
from adaptloop.records import decode_all
from adaptloop.schemas import serde_for
from adaptloop.sdk import Recorder
from adaptloop.settings import KafkaSettings, Topics, TrainerSettings
from adaptloop.tasks import example_catalogue
from curation_helpers import produce

pytestmark = pytest.mark.integration

TENANT, TASK = "acme", "order-extract"
CLI_TIMEOUT_S = 120


def curated(case, example_id: str, split: str, *, session: str, offset: int) -> dict:
    """A CuratedExample (v2) as curation writes it for a corrected answer."""
    return {
        "example_id": example_id, "tenant": TENANT, "task": TASK, "session_id": session, "split": split,
        "kind": "CORRECTION", "admitted": True, "reject_reason": None,
        "prompt_messages": [{"role": "system", "content": example_catalogue().get("order-extract").system_prompt}, {"role": "user", "content": case.sentence}],
        "completion": case.answer, "rejected": "{}", "score": 0.0, "scorer": example_catalogue().get(TASK).scorer,
        "curated_at": int(time.time() * 1000),
        "lineage": {"interaction": {"topic": "agent.interactions", "partition": 0, "offset": offset},
                    "outcomes": [], "outcome_ids": [], "code_version": "test", "winning_outcome_id": None},
        "served_by": None, "event_time": int(time.time() * 1000), "outcome_source": "HUMAN", "redactions": [],
        "content_hash": "", "near_duplicate_of": None, "subjects": [],
    }




def write_examples(kafka: KafkaSettings, topics: Topics, train: int, holdout: int, seed: int) -> list[dict]:
    cases = OrderGenerator(seed=seed).cases(train + holdout)
    records = [curated(c, f"i-{i:03d}-{uuid.uuid4().hex[:6]}", "TRAIN" if i < train else "HOLDOUT",
                       session=f"s-{i % 5}", offset=i) for i, c in enumerate(cases)]
    # One key: every example of (tenant, task) on one partition, as curation keys them.
    produce(kafka, topics.name("curated"), "curated_example", records, key=lambda r: f"{TENANT}/{TASK}")
    return records


def request_over(kafka: KafkaSettings, topics: Topics, train: int, holdout: int) -> dict:
    """A training request over everything on the curated topic now (ranges counted by reading)."""
    curated_topic = topics.name("curated")
    ends: dict[int, int] = {}
    for msg in read_topics(kafka, [curated_topic])[curated_topic]:
        ends[msg.partition()] = msg.offset() + 1
    return {"request_id": f"req-{uuid.uuid4().hex}", "tenant": TENANT, "task": TASK,
            "created_at": int(time.time() * 1000), "trigger": f"count>={train}",
            "examples": [{"topic": curated_topic, "partition": p, "start_offset": 0, "end_offset": end}
                         for p, end in sorted(ends.items())],
            "train_count": train, "holdout_count": holdout, "code_version": "test"}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "adaptloop.cli", *args], env=env, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, f"adaptloop {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def releases_of(kafka: KafkaSettings, topics: Topics) -> list[dict]:
    records = LineageRecords.read(kafka, topics)
    assert records.undecodable == []
    return [p.record for p in records.releases]


def test_status_lineage_and_forget_commands_on_the_real_broker(kafka, topics, tmp_path):
    # The loop's records as its processes write them: the SDK's interactions and outcomes, curated
    # examples, a training request, a release the gate passed and the canary promoted, a dead letter.
    with Recorder(kafka, topics) as recorder:
        ids = [recorder.interaction(tenant=TENANT, agent="bot", task=TASK, session_id=f"s-{i % 5}",
                                    messages=[{"role": "user", "content": f"order {i}"}], response="{}",
                                    interaction_id=f"i-{i:03d}") for i in range(6)]
        for iid in ids[:4]:
            recorder.outcome(iid, tenant=TENANT, source="VALIDATOR", success=True)
    examples = write_examples(kafka, topics, train=8, holdout=2, seed=5)
    request = request_over(kafka, topics, 8, 2)
    produce(kafka, topics.name("training_requests"), "training_request", [request], key=lambda r: f"{TENANT}/{TASK}")
    version = f"{TENANT}--{TASK}--0123456789abcdef"
    released = {
        "version": version, "tenant": TENANT, "task": TASK, "state": "RELEASED", "reason": "candidate 0.9 >= base",
        "base_model": "smollm2-135m-instruct", "artifact_uri": str(tmp_path / "adapter"), "digest": "sha256:" + "1" * 64,
        "lora_rank": 8, "method": "sft",
        "evaluation": {"metric": "success_rate:order_json@1", "holdout_count": 2, "candidate_score": 0.9,
                       "incumbent": "base", "incumbent_score": 0.0, "margin": 0.05},
        "lineage": {"request_id": request["request_id"], "dataset_digest": "sha256:" + "d" * 64,
                    "examples": request["examples"], "train_example_ids": [e["example_id"] for e in examples[:8]],
                    "code_version": "test", "config_json": "{}"},
        "created_at": int(time.time() * 1000),
    }
    promoted = released | {"state": "PROMOTED", "decided_by": "canary", "reason": "canary beat the incumbent",
                           "evidence_json": json.dumps({"canary_success": 0.9, "incumbent_success": 0.1})}
    produce(kafka, topics.name("releases"), "adapter_release", [released, promoted], key=lambda r: r["version"])
    dead = {"source_topic": topics.name("interactions"), "source_partition": 0, "source_offset": 99, "key": None,
            "value": b"junk", "stage": "decode", "error_type": "DeserializationError", "reason": "not avro",
            "failed_at": int(time.time() * 1000)}
    produce(kafka, topics.name("dead_letters"), "dead_letter", [dead], key=lambda r: None)

    home = tmp_path / "stack"
    ports = StackPorts.free()
    # A key for the gateway's /v1/models once it checks keys (serving.keys' form; ignored before).
    key = "alk_0a1b2c3d_" + uuid.uuid4().hex + uuid.uuid4().hex
    env = service_env(kafka, topics, home) | ports.env() | {"ADAPTLOOP_GATEWAY_API_KEYS": f"{TENANT}={key}"}
    cli_env = {**os.environ, **env, "ADAPTLOOP_STATUS_HOME": str(home), "ADAPTLOOP_STATUS_GATEWAY_KEY": key,
               "ADAPTLOOP_STATUS_GATEWAY_URL": ports.gateway_url,
               "ADAPTLOOP_STATUS_SIDECAR_URL": f"http://127.0.0.1:{ports.sidecar}",
               "ADAPTLOOP_STATUS_STREAMS_URL": f"http://127.0.0.1:{ports.streams_web}"}
    gateway = start_service("gateway", home, env, timeout_s=120)
    try:
        write_state(home / "stack.json", [gateway])
        started = time.monotonic()
        snapshot = json.loads(cli(cli_env, "status", "--json").stdout)
        print(f"\nstatus --json took {time.monotonic() - started:.1f}s (collect {snapshot['collect_seconds']}s)")
        text = cli(cli_env, "status", "--once").stdout
    finally:
        gateway.stop()

    assert snapshot["processes"] == [{"name": "gateway", "pid": gateway.pid, "alive": True}]
    counts = {t["topic"]: t["messages"] for t in snapshot["topics"]}
    assert counts[topics.name("interactions")] == 6 and counts[topics.name("outcomes")] == 4
    assert counts[topics.name("curated")] == 10 and counts[topics.name("releases")] == 2
    stage = snapshot["stages"][f"{TENANT}/{TASK}"]
    assert (stage["interactions"], stage["outcomes"]) == (6, 4)
    assert (stage["curated_admitted_train"], stage["curated_admitted_holdout"]) == (8, 2)
    assert stage["training_requests"] == 1 and stage["releases"] == {"PROMOTED": 1}
    assert snapshot["dead_letters"] == {f"{topics.name('interactions')} decode DeserializationError": 1}
    assert [(r["version"], r["state"], r["decided_by"]) for r in snapshot["releases"]] == [(version, "PROMOTED", "canary")]
    # The real gateway answered: it lists the alias (routed to base: no sidecar reports the adapter loaded).
    assert snapshot["gateway"]["ok"], snapshot["gateway"]
    assert {r["model"]: r["routes_to"] for r in snapshot["gateway"]["routes"]}[f"{TENANT}/{TASK}"] == "base"
    assert not snapshot["sidecar"]["ok"] and not snapshot["streams_metrics"]["ok"]
    assert snapshot["problems"] == [] and snapshot["undecodable"] == {}
    for expected in ("gateway", "alive", topics.name("curated"), f"{TENANT}/{TASK}", "PROMOTED", "8/2"):
        assert expected in text, expected

    # lineage, both directions, as JSON.
    adapter = json.loads(cli(cli_env, "lineage", version, "--json").stdout)
    assert [(d["state"], d["decided_by"]) for d in adapter["decisions"]] == [("RELEASED", "gate"), ("PROMOTED", "canary")]
    assert adapter["request"]["request_id"] == request["request_id"]
    assert adapter["dataset"]["source_ranges"] == request["examples"]
    assert "PROMOTED    by canary" in cli(cli_env, "lineage", version).stdout
    target = examples[3]["example_id"]
    forward = json.loads(cli(cli_env, "lineage", "--interaction", target, "--json").stdout)
    assert [e["example_id"] for e in forward["examples"]] == [target]
    assert [r["request_id"] for r in forward["requests"]] == [request["request_id"]]
    assert [(a["version"], a["uses"][target]) for a in forward["adapters"]] == [(version, "train")]

    # forget the interaction (tenant inferred), twice: the second run publishes nothing new.
    out = json.loads(cli(cli_env, "forget", "--interaction", target, "--json", "--reason", "test").stdout)
    erasure_id = erasure_id_for(TENANT, "INTERACTION", target)
    assert out["erasure"]["erasure_id"] == erasure_id and out["matched_examples"] == [target]
    assert [(a["version"], a["action"], a["new_state"]) for a in out["adapters"]] == [(version, "flag", "PROMOTED")]
    again = json.loads(cli(cli_env, "forget", "--interaction", target, "--json").stdout)
    assert [a["action"] for a in again["adapters"]] == ["none (already decided)"]
    raw = read_topics(kafka, [topics.name("erasures"), topics.name("training_requests")])
    erasures = [p.record for p in decode_all(raw[topics.name("erasures")], "erasure")]
    assert [(e["erasure_id"], e["scope"], e["key"], e["reason"]) for e in erasures] == \
        [(erasure_id, "INTERACTION", target, "test")]
    requests = [p.record for p in decode_all(raw[topics.name("training_requests")], "training_request")]
    assert [r["request_id"] for r in requests] == [request["request_id"],
                                                    retrain_request_id(request["request_id"], erasure_id)]
    assert requests[1]["trigger"] == f"erasure:{erasure_id}" and requests[1]["examples"] == request["examples"]
    assert (requests[1]["train_count"], requests[1]["holdout_count"]) == (7, 2)
    decisions = [r for r in releases_of(kafka, topics) if r["version"] == version]
    assert [(d["state"], d["decided_by"]) for d in decisions] == [("RELEASED", "gate"), ("PROMOTED", "canary"),
                                                                  ("PROMOTED", "erasure")]
    assert decisions[-1]["reason"].startswith(FLAG_REASON)
    assert json.loads(decisions[-1]["evidence_json"])["matched_example_ids"] == [target]

    # --retire for a whole session: the adapter leaves service, no retraining request.
    session = examples[0]["session_id"]
    retired = json.loads(cli(cli_env, "forget", "--session", session, "--tenant", TENANT, "--retire", "--json").stdout)
    assert sorted(retired["matched_examples"]) == sorted(e["example_id"] for e in examples if e["session_id"] == session)
    assert [(a["action"], a["new_state"], a["retrain_request_id"]) for a in retired["adapters"]] == \
        [("retire", "RETIRED", None)]
    assert releases_of(kafka, topics)[-1]["state"] == "RETIRED"
    # An unknown interaction without --tenant is refused with a clear message.
    refused = subprocess.run([sys.executable, "-m", "adaptloop.cli", "forget", "--interaction", "nobody"], env=cli_env,
                             capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert refused.returncode == 2 and "pass --tenant" in refused.stderr


def test_forget_an_interaction_that_fed_a_promoted_adapter_retrains_without_it(kafka, topics, tmp_path):
    """The issue's test, with the real trainer service (real Ray, the real base model)."""
    from adaptloop.trainers import ray_job
    from adaptloop.trainers.service import TrainerService

    # The gate is not under test here (the test is about lineage): with a margin of -1 and two holdout examples,
    # which cannot tell candidate and base apart, a candidate no worse than the base goes out (undecided).
    # Nothing else computes meanwhile, so training uses both cores (as in test_trainer.py).
    settings = TrainerSettings(kafka=kafka, topics=topics, artifact_dir=tmp_path / "artifacts",
                               group_id=f"trainer-{uuid.uuid4().hex[:8]}", max_new_tokens=48, gate_margin=-1.0,
                               torch_threads=2)
    train, holdout = 12, 2
    examples = write_examples(kafka, topics, train=train, holdout=holdout, seed=23)
    request = request_over(kafka, topics, train, holdout)
    produce(kafka, topics.name("training_requests"), "training_request", [request], key=lambda r: f"{TENANT}/{TASK}")
    service = TrainerService(settings)
    try:
        started = time.monotonic()
        first = service.process(request)
        first_s = time.monotonic() - started
        assert first is not None and first["state"] == "RELEASED", first and first["reason"]
        # The canary promotes it (the record the canary controller writes).
        service.publish(first | {"state": "PROMOTED", "decided_by": "canary", "reason": "canary won",
                                 "evidence_json": json.dumps({"canary": "test"})})
        target = examples[4]["example_id"]
        assert target in first["lineage"]["train_example_ids"]

        plan = Forgetter(kafka, topics).forget(scope="INTERACTION", key=target, tenant=TENANT, requested_by="dpo")
        flagged = [a for a in plan.adapters if a.version == first["version"]]
        assert len(flagged) == 1 and flagged[0].action == "flag" and flagged[0].retrain_request is not None
        latest = [r for r in releases_of(kafka, topics) if r["version"] == first["version"]][-1]
        assert (latest["state"], latest["decided_by"]) == ("PROMOTED", "erasure")
        assert latest["reason"].startswith(FLAG_REASON)

        # The retraining request as the trainer reads it from the topic.
        raw = read_topics(kafka, [topics.name("training_requests")])[topics.name("training_requests")]
        retrain = serde_for("training_request").deserialize(raw[-1].value())
        assert retrain["request_id"] == flagged[0].retrain_request["request_id"]
        started = time.monotonic()
        second = service.process(retrain)
        second_s = time.monotonic() - started
    finally:
        ray_job.stop_ray()
    print(f"\nfirst training {first_s:.0f}s, retraining after the erasure {second_s:.0f}s; "
          f"first {first['version']}, retrained {second and second['version']}")
    assert second is not None and second["state"] in ("RELEASED", "REJECTED")
    # The next snapshot excludes the erased record: the retrained adapter never saw it ...
    assert target not in second["lineage"]["train_example_ids"], \
        "the retraining snapshot still holds the erased example (the trainer does not honour erasures)"
    assert len(second["lineage"]["train_example_ids"]) == train - 1
    assert second["lineage"]["dataset_digest"] != first["lineage"]["dataset_digest"]
    snapshot = Path(settings.artifact_dir) / retrain["request_id"] / "dataset.json"
    if snapshot.exists():  # today's trainer keeps its snapshot here; issue 4's names it in lineage.dataset_uri
        assert target not in snapshot.read_text()
    # ... and lineage agrees: from the interaction only the flagged adapter is reached.
    records = LineageRecords.read(kafka, topics)
    forward = interaction_lineage(target, records)
    assert [a["version"] for a in forward["adapters"] if a["learned_from"]] == [first["version"]]
    assert adapter_lineage(second["version"], records)["request"]["trigger"] == f"erasure:{plan.erasure['erasure_id']}"
