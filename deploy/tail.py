"""A small topic followed from its beginning by a background thread: every record decoded, in order, current
when asked.

    with TopicTail(kafka, topics.name("erasures"), "erasure").start() as erasures:
        rows = erasures.records()       # everything written before this call, and what came with it

For a service that needs a whole small topic on every request (the trainer: every release and every erasure,
per training request). Reading it afresh each time pays a consumer join, a first fetch and an idle wait, since
Tansu's high watermarks undercount and the end of a topic is known only by waiting: 5 to 11 s per training
request, most of it on an empty erasures topic. A tail pays the join once; ``records`` waits until the thread
has polled the broker empty twice since the call and nothing new came for ``settle_s``, the same rule as a
fresh read's idle wait, without the join or the first fetch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from adaptloop.errors import BrokerError
from adaptloop.kafka import consumer_config, partitions_of
from adaptloop.records import Positioned, decode_all
from adaptloop.settings import KafkaSettings

log = logging.getLogger(__name__)

POLL_S = 0.1
#: A topic that does not exist yet is looked for again this often (it holds nothing until it does).
MISSING_TOPIC_RETRY_S = 2.0


#: How long nothing new must come after a ``records`` call's two empty polls. The polls already show the tail is
#: current; every caller waited only this long (a second, for each of the trainer's two tails, was 2 of the 3 s
#: a request took from pickup to snapshot).
SETTLE_S = 0.2
#: An assignment's first fetch takes a broker round trip or more; polls that come back empty before then say
#: nothing about the topic, so they count only this long after the assignment (with only the settle wait, a
#: first call returned [] for a topic of three records: ``tests/integration/test_tail.py``).
FIRST_FETCH_S = 1.0


class TopicTail:
    """``topic`` decoded as ``stem`` records, followed until ``close``; a record that does not decode raises
    from ``records`` (a reader that acts on every record must not act on a subset silently)."""

    def __init__(self, kafka: KafkaSettings, topic: str, stem: str, *, settle_s: float = SETTLE_S) -> None:
        self.kafka, self.topic, self.stem, self.settle_s = kafka, topic, stem, settle_s
        self._records: list[Positioned] = []
        self._empty_polls: list[float] = []  # the times of the last two polls that returned nothing
        self._last_record = float("-inf")
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tail-{topic}", daemon=True)

    def start(self) -> "TopicTail":
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> "TopicTail":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def records(self, timeout_s: float = 60.0) -> list[Positioned]:
        """Every record of the topic up to now, in order per partition. Raises ``BrokerError`` if the tail
        stopped, or if it cannot tell within ``timeout_s`` that it has read what was there at the call."""
        asked = time.monotonic()
        deadline = asked + timeout_s
        with self._changed:
            while True:
                if self._error is not None:
                    raise BrokerError(f"following {self.topic}: {self._error}") from self._error
                now = time.monotonic()
                polled_since = len(self._empty_polls) == 2 and self._empty_polls[0] > asked
                if polled_since and now - max(self._last_record, asked) >= self.settle_s:
                    return list(self._records)
                if now > deadline:
                    raise BrokerError(f"following {self.topic}: not current within {timeout_s}s")
                if not self._thread.is_alive() and self._error is None:
                    raise BrokerError(f"following {self.topic}: the tail is not running")
                self._changed.wait(POLL_S)

    def _run(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # handed to the next records() call: its caller decides
            log.exception("tail of %s stopped", self.topic)
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def _partitions(self) -> list[int] | None:
        try:
            return partitions_of(self.kafka, self.topic)
        except BrokerError as exc:
            if "does not exist" in str(exc):
                return None
            raise

    def _follow(self) -> None:
        partitions = self._partitions()
        while partitions is None:  # nothing was ever written there: empty, and current, until it exists
            self._note_empty_poll()
            if self._stop.wait(MISSING_TOPIC_RETRY_S):
                return
            partitions = self._partitions()
        consumer = Consumer(consumer_config(self.kafka, group_id=f"adaptloop-tail-{time.time_ns()}",
                                            **{"fetch.wait.max.ms": 100}))
        try:
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            fetching_from = time.monotonic() + FIRST_FETCH_S
            while not self._stop.is_set():
                try:
                    messages = consumer.consume(500, timeout=POLL_S)
                except KafkaException as exc:
                    raise BrokerError(str(exc)) from exc
                errors = [m.error() for m in messages if m.error()]
                fatal = [e for e in errors if e.fatal() or e.code() == KafkaError.UNKNOWN_TOPIC_OR_PART]
                if fatal:
                    raise BrokerError(str(fatal[0]))
                decoded = decode_all([m for m in messages if not m.error()], self.stem, self.kafka.schema_registry_url)
                if decoded:
                    with self._changed:
                        self._records.extend(decoded)
                        self._last_record = time.monotonic()
                        self._changed.notify_all()
                elif not messages and time.monotonic() >= fetching_from:
                    self._note_empty_poll()
        finally:
            consumer.close()

    def _note_empty_poll(self) -> None:
        with self._changed:
            self._empty_polls = (self._empty_polls + [time.monotonic()])[-2:]
            self._changed.notify_all()
