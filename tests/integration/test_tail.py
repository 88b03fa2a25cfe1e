"""A followed topic (``adaptloop.tail``) against the real broker: what was written before a call is in its answer,
and so is what was written later, by a later call; an empty or missing topic is empty; a poison record is an
error, not a shorter list. The trainer follows its releases and erasures this way."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Producer

from adaptloop.erasure import build_erasure
from adaptloop.errors import BrokerError
from adaptloop.kafka import producer_config
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.tail import TopicTail

pytestmark = pytest.mark.integration


def write(kafka, topic: str, records: list[dict], raw: bytes | None = None) -> None:
    producer = Producer(producer_config(kafka))
    serialize = serde_for("erasure", kafka.schema_registry_url).serialize
    for record in records:
        producer.produce(topic, serialize(record, SerdeContext(topic)), key=record["erasure_id"])
    if raw is not None:
        producer.produce(topic, raw, key=b"poison")
    assert producer.flush(30) == 0


def erasures(n: int) -> list[dict]:
    return [build_erasure(tenant="acme", scope="SUBJECT", key=f"subj:{uuid.uuid4().hex}") for _ in range(n)]


def test_a_call_sees_everything_written_before_it_and_a_later_call_what_came_after(kafka, topics):
    topic = topics.name("erasures")
    first, second = erasures(3), erasures(2)
    write(kafka, topic, first)
    with TopicTail(kafka, topic, "erasure").start() as tail:
        started = time.monotonic()
        assert [p.record["erasure_id"] for p in tail.records()] == [r["erasure_id"] for r in first]
        first_s = time.monotonic() - started
        write(kafka, topic, second)
        started = time.monotonic()
        seen = [p.record["erasure_id"] for p in tail.records()]
        later_s = time.monotonic() - started
    assert seen == [r["erasure_id"] for r in first + second]
    print(f"\nfirst call {first_s:.2f}s (join + catch-up), a later one {later_s:.2f}s")


def test_an_empty_topic_and_a_missing_one_are_empty_until_written(kafka, topics):
    with TopicTail(kafka, topics.name("erasures"), "erasure").start() as tail:
        assert tail.records() == []
    missing = f"never-{uuid.uuid4().hex[:8]}"
    with TopicTail(kafka, missing, "erasure").start() as tail:
        assert tail.records() == []


def test_a_record_that_does_not_decode_is_an_error_not_a_shorter_list(kafka, topics):
    topic = topics.name("erasures")
    write(kafka, topic, erasures(1), raw=b"\x00\x00\x00\x00\x07not avro")
    with TopicTail(kafka, topic, "erasure").start() as tail:
        with pytest.raises(BrokerError, match="following"):
            tail.records(timeout_s=30)
