"""Reading a small topic whole, decoded: what tools and tests that watch the loop from outside use."""

from __future__ import annotations

from adaptloop.kafka import read_ranges
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import KafkaSettings, Topics


def read_topic(kafka: KafkaSettings, topics: Topics, which: str, stem: str) -> list[dict]:
    """Every record of one (small) topic, decoded, in order."""
    topic = topics.name(which)
    decode = serde_for(stem, kafka.schema_registry_url).deserialize
    return [decode(m.value(), SerdeContext(topic, m.partition(), m.offset()))
            for m in read_ranges(kafka, topic, idle_s=0.5)]
