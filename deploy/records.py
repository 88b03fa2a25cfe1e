"""Reading topics back, decoded: the one way tools, services and tests read records (the stream stages
decode what their consumers hand them).

    read_decoded(kafka, topic, "curated_example")                       # a whole topic, with positions
    read_decoded(kafka, topic, "curated_example", [Range(0, 10, 20)])   # offset ranges of it
    decode_all(read_topics(kafka, names)[name], stem, registry_url)     # several topics read at once
    read_topic(kafka, topics, "releases", "adapter_release")            # a small topic's records
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from adaptloop.errors import DeserializationError
from adaptloop.kafka import Range, read_ranges
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import KafkaSettings, Topics


@dataclass(frozen=True)
class Positioned:
    """A decoded record with where it was read."""

    topic: str
    partition: int
    offset: int
    record: Mapping[str, Any]


def decode_all(messages: Iterable[Any], stem: str, registry_url: str | None = None,
               undecodable: list[str] | None = None) -> list[Positioned]:
    """``messages`` decoded as ``stem`` records. With ``undecodable``, a record that does not decode is listed
    there and left out; without, its ``DeserializationError`` is raised."""
    deserialize = serde_for(stem, registry_url).deserialize
    decoded = []
    for msg in messages:
        try:
            record = deserialize(msg.value(), SerdeContext(msg.topic(), msg.partition(), msg.offset()))
        except DeserializationError as exc:
            if undecodable is None:
                raise
            undecodable.append(str(exc))
            continue
        decoded.append(Positioned(msg.topic(), msg.partition(), msg.offset(), record))
    return decoded


def read_decoded(kafka: KafkaSettings, topic: str, stem: str, ranges: list[Range] | None = None, *,
                 undecodable: list[str] | None = None, idle_s: float = 2.0, timeout_s: float = 60.0,
                 first_record_s: float = 5.0) -> list[Positioned]:
    """``ranges`` of ``topic`` (default: all of it, ``adaptloop.kafka.read_ranges``) decoded as ``stem``
    records, in order per partition; ``undecodable`` as in ``decode_all``."""
    messages = read_ranges(kafka, topic, ranges, idle_s=idle_s, timeout_s=timeout_s, first_record_s=first_record_s)
    return decode_all(messages, stem, kafka.schema_registry_url, undecodable)


def read_topic(kafka: KafkaSettings, topics: Topics, which: str, stem: str) -> list[dict]:
    """Every record of one (small) topic, decoded, in order."""
    return [p.record for p in read_decoded(kafka, topics.name(which), stem, idle_s=0.5)]
