"""A real Faust curation worker (subprocess, its own venv) against the session's Tansu broker.

    ~/.cache/adaptloop/venv/bin/python -m pytest tests/integration/test_streams.py -m integration
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from adaptloop.demo_tasks import OrderGenerator
from adaptloop.kafka import consumer_config, partitions_of, read_ranges
from adaptloop.ops.stack import free_port, service_env, start_service
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import code_version
from adaptloop.sdk import Recorder, build_interaction
from adaptloop.settings import KafkaSettings, Topics
from adaptloop.streams import stages, windows
from adaptloop.tasks import example_catalogue
from curation_helpers import read_all, wait_until

pytestmark = pytest.mark.integration

TASK = "order-extract"
TENANT = "acme"
WINDOW_SIZE = 2
HOLDOUT_PERCENT = 30
READY_TIMEOUT_S = 90.0
RESULT_TIMEOUT_S = 60.0


@pytest.fixture
def worker_env(kafka: KafkaSettings, topics: Topics, tmp_path: Path) -> dict[str, str]:
    """The environment of one curation worker on this test's topics, under a unique app id."""
    return service_env(kafka, topics, tmp_path / "home") | {
        "ADAPTLOOP_STREAMS_WINDOW_SIZE": str(WINDOW_SIZE),
        "ADAPTLOOP_STREAMS_HOLDOUT_PERCENT": str(HOLDOUT_PERCENT),
        "ADAPTLOOP_STREAMS_WEB_PORT": str(free_port()),
        "ADAPTLOOP_STREAMS_APP_ID": f"curation-{uuid.uuid4().hex[:8]}",
        "ADAPTLOOP_STREAMS_DATA_DIR": str(tmp_path / "faust"),
        "ADAPTLOOP_STREAMS_OUTCOME_GRACE_S": "1",
        "ADAPTLOOP_STREAMS_TICK_S": "0.5",
    }


@pytest.fixture
def worker(worker_env: dict[str, str], tmp_path: Path):
    """One curation worker, ready (partitions assigned); stopped afterwards whatever happened."""
    process = start_service("streams", tmp_path / "home", worker_env, timeout_s=READY_TIMEOUT_S)
    try:
        yield process
    finally:
        process.stop()


def test_worker_curates_joins_dead_letters_and_requests_training(kafka, topics, worker):
    cases = OrderGenerator(seed=7).cases(12)
    sessions = [f"u{i // 2}" for i in range(len(cases))]  # two turns per session
    expected: dict[str, tuple[str, str]] = {}  # interaction id -> (kind, session)
    with Recorder(kafka, topics) as recorder:
        for i, (case, session) in enumerate(zip(cases, sessions)):
            iid = f"i-{i}-{uuid.uuid4().hex[:6]}"
            messages = [{"role": "system", "content": example_catalogue().get(TASK).system_prompt},
                        {"role": "user", "content": case.sentence}]
            if i % 3 == 0:
                response, outcome = case.answer, {"success": True}
                kind = stages.SUCCESS
            elif i % 3 == 1:
                response, outcome = "Sure! The order is for a lamp.", {"success": False, "correction": case.answer}
                kind = stages.CORRECTION
            else:
                response, outcome = "no idea", {"success": False}
                kind = stages.FAILURE
            expected[iid] = (kind, session)
            interaction = build_interaction(interaction_id=iid, tenant=TENANT, agent="bot", task=TASK,
                                            session_id=session, messages=messages, response=response,
                                            base_model="smollm2-135m-instruct", latency_ms=12.5)
            if i % 4 == 0:  # the outcome arrives first
                recorder.outcome(iid, tenant=TENANT, source="VALIDATOR", wait=True, **outcome)
                recorder.send_interaction(interaction, wait=True)
            else:
                recorder.send_interaction(interaction)
                recorder.outcome(iid, tenant=TENANT, source="HUMAN", **outcome)
            if i == 5:  # a duplicate interaction and a second outcome must not make a second example
                recorder.send_interaction(interaction)
                recorder.outcome(iid, tenant=TENANT, source="HEURISTIC", success=True)
        # A contract violation through the SDK: a task nobody declared.
        recorder.interaction(tenant=TENANT, agent="bot", task="no-such-task", session_id="s-x",
                             messages=[{"role": "user", "content": "hi"}], response="hello")

    # Corrupt bytes from a plain producer, on both input topics.
    raw = Producer(kafka.client_config() | {"acks": "all"})
    good = serde_for("interaction").serialize(build_interaction(
        tenant=TENANT, agent="bot", task=TASK, session_id="s-y", messages=[{"role": "user", "content": "x"}],
        response="{}", base_model="m"), SerdeContext(topics.name("interactions")))
    corrupt = {
        (topics.name("interactions"), b"junk-1"): b"this is not avro",
        (topics.name("outcomes"), b"junk-2"): good[:14],  # a truncated record (and the wrong type)
    }
    for (topic, key), value in corrupt.items():
        raw.produce(topic, key=key, value=value)
    assert raw.flush(30) == 0

    curated = wait_until(kafka, topics.name("curated"), "curated_example",
                         lambda records: len(records) >= len(expected))
    dead = wait_until(kafka, topics.name("dead_letters"), "dead_letter", lambda records: len(records) >= 3)
    admitted_train = sum(1 for iid, (kind, session) in expected.items()
                         if kind != stages.FAILURE and stages.split(TENANT, TASK, session, HOLDOUT_PERCENT) == "TRAIN")
    assert admitted_train >= WINDOW_SIZE, "the fixed seed and sessions must fill at least one window"
    requests = wait_until(kafka, topics.name("training_requests"), "training_request",
                          lambda records: len(records) >= admitted_train // WINDOW_SIZE)

    # Give a late duplicate a chance to show up, then check exactly-one per interaction.
    time.sleep(2)
    curated = read_all(kafka, topics.name("curated"), "curated_example")
    by_id = Counter(record["example_id"] for _, _, record in curated)
    assert by_id == Counter({iid: 1 for iid in expected}), by_id
    for _, _, example in curated:
        kind, session = expected[example["example_id"]]
        assert example["kind"] == kind, example
        assert example["admitted"] == (kind != stages.FAILURE)
        assert example["split"] == stages.split(TENANT, TASK, session, HOLDOUT_PERCENT)
        assert example["lineage"]["interaction"]["topic"] == topics.name("interactions")
        assert example["lineage"]["outcomes"][0]["topic"] == topics.name("outcomes")
        assert example["lineage"]["code_version"] == code_version()
        if kind == stages.CORRECTION:
            assert example["rejected"] == "Sure! The order is for a lamp."
    splits_by_session: dict[str, set[str]] = {}
    for _, _, example in curated:
        splits_by_session.setdefault(example["session_id"], set()).add(example["split"])
    assert all(len(splits) == 1 for splits in splits_by_session.values()), splits_by_session
    assert {"TRAIN", "HOLDOUT"} <= {split for splits in splits_by_session.values() for split in splits}

    assert len(dead) == 3, [d["reason"] for _, _, d in dead]
    letters = {(d["source_topic"], d["key"]): d for _, _, d in dead}
    assert letters[(topics.name("interactions"), b"junk-1")]["value"] == b"this is not avro"
    assert letters[(topics.name("interactions"), b"junk-1")]["error_type"] == "DeserializationError"
    assert letters[(topics.name("outcomes"), b"junk-2")]["error_type"] == "DeserializationError"
    unknown = [d for d in letters.values() if d["error_type"] == "ContractError"]
    assert len(unknown) == 1 and "unknown task 'no-such-task'" in unknown[0]["reason"]
    assert all(d["stage"] == "decode" and d["reason"] for d in letters.values())

    # Each request names a prefix of the curated partition whose admitted counts it reports.
    assert len(requests) == admitted_train // WINDOW_SIZE
    for n, (_, _, request) in enumerate(requests, start=1):
        assert request["tenant"] == TENANT and request["task"] == TASK
        assert request["train_count"] == n * WINDOW_SIZE
        [span] = request["examples"]
        named = [example for partition, offset, example in curated
                 if partition == span["partition"] and span["start_offset"] <= offset < span["end_offset"]]
        assert sum(e["admitted"] and e["split"] == "TRAIN" for e in named) == request["train_count"]
        assert sum(e["admitted"] and e["split"] == "HOLDOUT" for e in named) == request["holdout_count"]
        assert request["request_id"] == windows.request_id(TENANT, TASK, request["examples"])

    assert worker.alive(), worker.tail()


def committed(kafka: KafkaSettings, group: str, topic: str) -> int:
    """Sum of the group's committed offsets over the topic's partitions (records it will not see again)."""
    consumer = Consumer(consumer_config(kafka, group))
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions_of(kafka, topic)], timeout=10)
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in offsets)


def test_a_killed_worker_recovers_half_joined_pairs(kafka, topics, worker_env, tmp_path):
    """Interactions joined into the table, the worker SIGKILLed, a new one started: the outcomes
    that arrive afterwards still find their interactions (table rebuilt from its changelog)."""
    home = tmp_path / "home"
    cases = OrderGenerator(seed=11).cases(24)  # enough for multi-record changelog batches
    ids = [f"k-{n}-{uuid.uuid4().hex[:6]}" for n in range(len(cases))]
    changelog = f"{worker_env['ADAPTLOOP_STREAMS_APP_ID']}-joins-changelog"
    first = start_service("streams", home, worker_env, timeout_s=READY_TIMEOUT_S)
    try:
        with Recorder(kafka, topics) as recorder:
            for iid, case in zip(ids, cases):
                recorder.interaction(interaction_id=iid, tenant=TENANT, agent="bot", task=TASK, session_id=iid,
                                     messages=[{"role": "user", "content": case.sentence}], response="?")
        # Kill only once every interaction is in the join table's changelog AND its offset is
        # committed: then no replay can bring the interactions back, only the changelog can.
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while (sum(1 for _ in read_ranges(kafka, changelog, idle_s=2.0, timeout_s=30)) < len(ids)
               or committed(kafka, worker_env["ADAPTLOOP_STREAMS_APP_ID"], topics.name("interactions")) < len(ids)):
            assert time.monotonic() < deadline, "interactions never reached the join table / were never committed"
            time.sleep(0.5)
        first.kill()
    finally:
        first.stop()

    second = start_service("streams", home, worker_env, timeout_s=READY_TIMEOUT_S)
    try:
        with Recorder(kafka, topics) as recorder:
            for iid, case in zip(ids, cases):
                recorder.outcome(iid, tenant=TENANT, source="HUMAN", success=False, correction=case.answer)
        curated = wait_until(kafka, topics.name("curated"), "curated_example",
                             lambda records: {r["example_id"] for _, _, r in records} >= set(ids))
        # At least once: a replay after the kill may repeat an example, never lose one.
        assert {r["example_id"] for _, _, r in curated} == set(ids)
        assert all(r["kind"] == "CORRECTION" and r["admitted"] for _, _, r in curated)
        assert second.alive(), second.tail()
    finally:
        second.stop()
