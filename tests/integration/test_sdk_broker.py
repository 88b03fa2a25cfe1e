"""The SDK against the real Tansu broker: nothing lost, nothing altered, evolution both ways."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka import Producer

from adaptloop.errors import DeliveryError
from adaptloop.kafka import producer_config, read_ranges
from adaptloop.schemas import AvroDeserializer, AvroSerializer, SchemaStore, SerdeContext, bundled_store
from adaptloop.sdk import Recorder, build_outcome
from adaptloop.settings import KafkaSettings
from adaptloop.demo_tasks import OrderGenerator

pytestmark = pytest.mark.integration


def test_ten_thousand_interactions_come_back_identical(kafka, topics):
    cases = OrderGenerator(seed=3).cases(50)
    sent = {}
    started = time.monotonic()
    with Recorder(kafka, topics) as recorder:
        for i in range(10_000):
            case = cases[i % len(cases)]
            iid = recorder.interaction(
                tenant=f"tenant-{i % 3}", agent="bench", task="order-extract", session_id=f"s{i // 4}",
                messages=[{"role": "system", "content": "extract"}, {"role": "user", "content": case.sentence}],
                response=case.answer, latency_ms=12.5 + i, prompt_tokens=40, completion_tokens=30,
                attributes={"i": str(i), "utf8": "Zoë ✓"})
            sent[iid] = None
    produced_s = time.monotonic() - started
    topic = topics.name("interactions")
    decode = AvroDeserializer("interaction")
    received = {}
    for msg in read_ranges(kafka, topic, idle_s=3.0, timeout_s=120):
        record = decode(msg.value(), SerdeContext(topic, msg.partition(), msg.offset()))
        assert msg.key().decode() == record["interaction_id"]
        received[record["interaction_id"]] = record
    print(f"\n10,000 interactions: produced+acked in {produced_s:.2f}s, read back in "
          f"{time.monotonic() - started - produced_s:.2f}s")
    assert set(received) == set(sent)
    sample = received[next(iter(sent))]
    assert sample["attributes"]["utf8"] == "Zoë ✓" and sample["request_messages"][1]["role"] == "user"
    assert sorted(int(r["attributes"]["i"]) for r in received.values()) == list(range(10_000))


def test_schema_evolution_through_the_broker(kafka, topics):
    v1 = bundled_store().latest("outcome").raw
    v2 = json.loads(json.dumps(v1))
    v2["fields"].append({"name": "confidence", "type": ["null", "double"], "default": None})
    both = SchemaStore({"outcome.v1.avsc": json.dumps(v1), "outcome.v2.avsc": json.dumps(v2)})
    old_only = SchemaStore({"outcome.v1.avsc": json.dumps(v1)})
    old_reader = AvroDeserializer("outcome", both)
    old_reader.reader = both.versions["outcome"][0]
    new_reader = AvroDeserializer("outcome", both)

    topic = topics.name("outcomes")
    base = build_outcome("i-1", tenant="acme", source="HUMAN", success=False, correction="{}")
    producer = Producer(producer_config(kafka))
    producer.produce(topic, AvroSerializer("outcome", both)(base | {"confidence": 0.75}), key="i-1")
    producer.produce(topic, AvroSerializer("outcome", old_only)(base), key="i-1")
    assert producer.flush(30) == 0

    new_msg, old_msg = sorted(read_ranges(kafka, topic, idle_s=2.0), key=lambda m: m.offset())
    assert old_reader(new_msg.value()) == base                       # new writer, old reader
    assert new_reader(old_msg.value()) == base | {"confidence": None}  # old writer, new reader
    assert new_reader(new_msg.value())["confidence"] == 0.75


def test_unreachable_broker_is_an_error_for_the_caller(topics):
    unreachable = KafkaSettings(bootstrap_servers="127.0.0.1:9", embedded=False, delivery_timeout_s=1.5)
    recorder = Recorder(unreachable, topics)
    recorder.interaction(tenant="a", agent="b", task="order-extract", session_id="s",
                         messages=[{"role": "user", "content": "x"}], response="y")
    with pytest.raises(DeliveryError):
        recorder.flush(timeout_s=10)
