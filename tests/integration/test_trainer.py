"""The trainer service against a real Tansu broker, real Ray and the real base model (no mocks).

    HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_trainer.py -m integration -v -s

Prints the base model's and the adapter's holdout success and the training time.
"""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from adaptloop.artifacts import verify_digest
from adaptloop.kafka import DeliveryTracker, consumer_config, read_ranges
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import TrainerSettings
from adaptloop.tasks import ORDER_SYSTEM_PROMPT, OrderGenerator, task_spec

pytestmark = pytest.mark.integration

TENANT = "acme"
TASK = "order-extract"
TRAIN_N = 64
HOLDOUT_N = 24


def curated_record(case, index: int, split: str, *, tenant: str = TENANT) -> dict:
    """A CuratedExample (schemas/avro/curated_example.v1.avsc): a correction of a wrong answer."""
    example_id = f"ex-{index:04d}-{uuid.uuid4().hex[:8]}"
    return {
        "example_id": example_id, "tenant": tenant, "task": TASK, "session_id": f"s-{index}",
        "split": split, "kind": "CORRECTION", "admitted": True, "reject_reason": None,
        "prompt_messages": [{"role": "system", "content": ORDER_SYSTEM_PROMPT},
                            {"role": "user", "content": case.sentence}],
        "completion": case.answer, "rejected": "{}", "score": 0.0, "scorer": task_spec(TASK).scorer,
        "curated_at": int(time.time() * 1000),
        "lineage": {"interaction": {"topic": "agent.interactions", "partition": 0, "offset": index},
                    "outcomes": [], "outcome_ids": [], "code_version": "test"},
    }


def produce(kafka, topic: str, stem: str, records: list[dict], key: str | None = None) -> None:
    serde = serde_for(stem)
    producer = DeliveryTracker(kafka)
    for record in records:
        producer.send(topic, serde.serialize(record, SerdeContext(topic)), key=record[key] if key else None)
    producer.flush(30)


def ranges_of(kafka, topic: str) -> list[dict]:
    """[start, end) per partition of everything on ``topic`` (counted by reading: Tansu's watermarks lie)."""
    seen: dict[int, list[int]] = {}
    for msg in read_ranges(kafka, topic, idle_s=1.0, timeout_s=60):
        seen.setdefault(msg.partition(), []).append(msg.offset())
    return [{"topic": topic, "partition": p, "start_offset": min(o), "end_offset": max(o) + 1}
            for p, o in sorted(seen.items())]


def training_request(request_id: str, ranges: list[dict], train: int, holdout: int) -> dict:
    return {"request_id": request_id, "tenant": TENANT, "task": TASK, "created_at": int(time.time() * 1000),
            "trigger": "test", "examples": ranges, "train_count": train, "holdout_count": holdout,
            "code_version": "test"}


def releases_on(kafka, topics) -> list[dict]:
    serde = serde_for("adapter_release")
    topic = topics.name("releases")
    return [serde.deserialize(m.value(), SerdeContext(topic)) for m in read_ranges(kafka, topic, idle_s=1.0, timeout_s=60)]


@pytest.fixture
def settings(kafka, topics, tmp_path) -> TrainerSettings:
    # Order answers are at most ~45 tokens: 64 new tokens judge them fully and bound the base model's rambling.
    return TrainerSettings(kafka=kafka, topics=topics, artifact_dir=tmp_path / "artifacts",
                           group_id=f"trainer-{uuid.uuid4().hex[:8]}", max_new_tokens=64)


def test_request_trains_an_adapter_that_beats_the_base_and_replays_are_skipped(kafka, topics, settings):
    from adaptloop.trainers.service import TrainerService

    cases = OrderGenerator(seed=11).cases(TRAIN_N + HOLDOUT_N)
    records = [curated_record(c, i, "TRAIN" if i < TRAIN_N else "HOLDOUT") for i, c in enumerate(cases)]
    # Noise the dataset must drop: another tenant, a not-admitted example, an at-least-once duplicate.
    records.append(curated_record(cases[0], 900, "TRAIN", tenant="other"))
    records.append(curated_record(cases[1], 901, "TRAIN") | {"admitted": False, "reject_reason": "test"})
    records.append(records[2])
    produce(kafka, topics.name("curated"), "curated_example", records, key="example_id")
    ranges = ranges_of(kafka, topics.name("curated"))
    assert sum(r["end_offset"] - r["start_offset"] for r in ranges) == len(records)
    request = training_request(f"req-{uuid.uuid4().hex}", ranges, TRAIN_N, HOLDOUT_N)

    service = TrainerService(settings)
    started = time.monotonic()
    release = service.process(request)
    elapsed = time.monotonic() - started

    assert release is not None
    evaluation = release["evaluation"]
    print(f"\nholdout success on {evaluation['holdout_count']} examples: base {evaluation['incumbent_score']:.3f} "
          f"-> adapter {evaluation['candidate_score']:.3f}; request handled in {elapsed:.0f}s; {release['reason']}")
    assert release["state"] == "RELEASED", release["reason"]
    assert evaluation["incumbent"] == "base"
    assert evaluation["holdout_count"] == HOLDOUT_N
    assert evaluation["candidate_score"] > evaluation["incumbent_score"]
    assert release["lora_rank"] <= 16
    verify_digest(release["artifact_uri"], release["digest"])
    assert release["version"].startswith(f"{TENANT}--{TASK}--")
    lineage = release["lineage"]
    assert lineage["request_id"] == request["request_id"]
    assert lineage["dataset_digest"].startswith("sha256:")
    assert len(lineage["train_example_ids"]) == TRAIN_N
    assert lineage["examples"] == ranges
    published = [r for r in releases_on(kafka, topics) if r["lineage"]["request_id"] == request["request_id"]]
    assert [r["version"] for r in published] == [release["version"]]

    # A replay of the same request (a crash before the commit) trains nothing and publishes nothing.
    started = time.monotonic()
    assert service.process(request) is None
    assert time.monotonic() - started < 30
    published = [r for r in releases_on(kafka, topics) if r["lineage"]["request_id"] == request["request_id"]]
    assert len(published) == 1


def test_service_loop_rejects_an_empty_range_and_dead_letters_garbage(kafka, topics, settings):
    from adaptloop.trainers.service import run

    requests_topic = topics.name("training_requests")
    producer = DeliveryTracker(kafka)
    producer.send(requests_topic, b"not avro at all", key="junk")
    producer.flush(30)
    empty = training_request(f"req-{uuid.uuid4().hex}",
                             [{"topic": topics.name("curated"), "partition": 0, "start_offset": 0, "end_offset": 0}], 0, 0)
    produce(kafka, requests_topic, "training_request", [empty], key="request_id")

    assert run(settings, max_requests=2, poll_s=0.5) == 2

    rejected = [r for r in releases_on(kafka, topics) if r["lineage"]["request_id"] == empty["request_id"]]
    assert len(rejected) == 1
    assert rejected[0]["state"] == "REJECTED"
    assert "too few training examples: 0" in rejected[0]["reason"]
    assert rejected[0]["artifact_uri"] is None and rejected[0]["digest"] is None
    print(f"\nempty request: {rejected[0]['state']} {rejected[0]['version']}: {rejected[0]['reason']}")

    dead = [serde_for("dead_letter").deserialize(m.value(), SerdeContext(topics.name("dead_letters")))
            for m in read_ranges(kafka, topics.name("dead_letters"), idle_s=1.0, timeout_s=60)]
    assert len(dead) == 1 and dead[0]["value"] == b"not avro at all" and dead[0]["stage"] == "trainer"

    # Both requests were committed: a restarted trainer would not see them again.
    consumer = Consumer(consumer_config(kafka, settings.group_id))
    try:
        committed = consumer.committed([TopicPartition(requests_topic, 0)], timeout=30)
    finally:
        consumer.close()
    assert committed[0].offset == 2
