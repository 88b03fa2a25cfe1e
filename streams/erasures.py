"""Every curation worker follows the whole erasures topic (no consumer group: each needs all of it).

    feed = ErasureFeed(kafka, topics); feed.catch_up(timeout_s=10)   # before curating
    feed.poll()                                                       # then on every tick (non-blocking)
    feed.erasures.match(record)                                       # -> the erasure, or None

Matching uses ``adaptloop.erasure.ErasureSet`` (the same rules as ``adaptloop forget`` and the trainer's
snapshots). A record that cannot be decoded is logged and skipped here: the erasures topic is written by
our own CLI, and a bad record there must not stop curation (it is not ours to dead-letter).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from adaptloop.erasure import ErasureSet
from adaptloop.errors import DeserializationError
from adaptloop.kafka import consumer_config
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import KafkaSettings, Topics

log = logging.getLogger(__name__)


class ErasureFeed:
    def __init__(self, kafka: KafkaSettings, topics: Topics) -> None:
        self.topic = topics.name("erasures")
        self.erasures = ErasureSet()
        self._decode = serde_for("erasure", kafka.schema_registry_url).deserialize
        self._consumer = Consumer(consumer_config(kafka, group_id=f"adaptloop-erasures-{time.monotonic_ns()}",
                                                  **{"fetch.wait.max.ms": 100}))
        self._assigned = False

    def _assign(self) -> bool:
        if self._assigned:
            return True
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=5)
        except KafkaException as exc:
            log.warning("erasures topic %s: %s", self.topic, exc)
            return False
        info = metadata.topics.get(self.topic)
        if info is None or info.error is not None or not info.partitions:
            return False  # not created yet: nothing was ever erased
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in info.partitions])
        self._assigned = True
        return True

    def poll(self, max_records: int = 500) -> int:
        """Fold whatever arrived since the last call; never blocks."""
        if not self._assign():
            return 0
        folded = 0
        for message in self._consumer.consume(max_records, timeout=0):
            if message.error():
                log.warning("erasures topic: %s", message.error())
                continue
            try:
                self.erasures.add(self._decode(message.value(), SerdeContext(self.topic, message.partition(), message.offset())))
                folded += 1
            except DeserializationError as exc:
                log.error("erasure record skipped (%s@%d): %s", self.topic, message.offset(), exc)
        return folded

    def catch_up(self, timeout_s: float = 10.0, idle_s: float = 1.0) -> int:
        """Read until nothing new arrives for ``idle_s`` (Tansu's end offsets are not trustworthy)."""
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        total = 0
        while time.monotonic() < deadline and time.monotonic() - quiet_since < idle_s:
            got = self.poll()
            if got:
                total += got
                quiet_since = time.monotonic()
            else:
                time.sleep(0.05)
        return total

    def close(self) -> None:
        self._consumer.close()
