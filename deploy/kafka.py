"""confluent-kafka plumbing shared by every process: producers that confirm delivery, topic
creation with explicit partitions, and reading a topic by counting (Tansu's watermarks lie)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from adaptloop.errors import BrokerError, DeliveryError
from adaptloop.settings import KafkaSettings, Topics

log = logging.getLogger(__name__)

#: Tansu waits half of session.timeout.ms before a group join completes; 2 s causes rebalance storms.
SESSION_TIMEOUT_MS = 6000
DEFAULT_DELIVERY_TIMEOUT_S = 30.0


def producer_config(settings: KafkaSettings, **overrides) -> dict:
    config = settings.client_config() | {
        "acks": "all",
        "enable.idempotence": settings.idempotence,
        "retries": 20,
        "retry.backoff.ms": 100,
        "linger.ms": 5,
        "delivery.timeout.ms": int(settings.delivery_timeout_s * 1000),
        "message.max.bytes": 4_000_000,
    }
    if not settings.idempotence:
        # Without idempotence, retries may reorder a partition; downstream dedupes by record id.
        config["max.in.flight.requests.per.connection"] = 5
    return config | overrides


def consumer_config(settings: KafkaSettings, group_id: str, **overrides) -> dict:
    return settings.client_config() | {
        "group.id": group_id,
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "auto.offset.reset": "earliest",  # never "latest": Tansu's latest offsets are wrong
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    } | overrides


class DeliveryTracker:
    """A producer whose every record is confirmed or reported: ``send`` then ``flush`` raises on any loss."""

    def __init__(self, settings: KafkaSettings, **overrides) -> None:
        self.producer = Producer(producer_config(settings, **overrides))
        self.failures: list[str] = []
        self.delivered = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failures.append(f"{msg.topic()}: {err}")
        else:
            self.delivered += 1

    def send(self, topic: str, value: bytes, key: bytes | str | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery)
                break
            except BufferError:
                self.producer.poll(0.05)  # local queue full: serve callbacks and retry
        self.producer.poll(0)

    def flush(self, timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S) -> int:
        """Wait for every record sent so far; raise ``DeliveryError`` if any was not acknowledged."""
        remaining = self.producer.flush(timeout_s)
        if remaining:
            raise DeliveryError(f"{remaining} records not acknowledged within {timeout_s}s")
        if self.failures:
            failures, self.failures = self.failures, []
            raise DeliveryError(f"{len(failures)} records failed: {failures[:3]}")
        return self.delivered

    def send_sync(self, topic: str, value: bytes, key: bytes | str | None = None,
                  timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S) -> None:
        self.send(topic, value, key)
        self.flush(timeout_s)


def admin(settings: KafkaSettings) -> AdminClient:
    return AdminClient(settings.client_config())


def replication_config(settings: KafkaSettings) -> dict[str, str]:
    """The topic config a cluster's durability asks for, beside each topic's own."""
    return {"min.insync.replicas": str(settings.min_insync_replicas)} if settings.min_insync_replicas else {}


def ensure_topics(settings: KafkaSettings, topics: Topics, timeout_s: float = 30.0) -> list[str]:
    """Create every topic of ``topics.layout()`` that does not exist yet; return the names created."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout_s).topics)
    wanted = [NewTopic(name, num_partitions=partitions, replication_factor=settings.replication_factor,
                       config=config | replication_config(settings))
              for name, (partitions, config) in topics.layout().items() if name not in existing]
    created = []
    for name, future in (client.create_topics(wanted, request_timeout=timeout_s).items() if wanted else []):
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BrokerError(f"cannot create topic {name}: {exc}") from exc
    return created


def wait_for_broker(settings: KafkaSettings, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin(settings).list_topics(timeout=2)
            return
        except KafkaException as exc:
            last = exc
            time.sleep(0.2)
    raise BrokerError(f"broker at {settings.bootstrap_servers} not ready after {timeout_s}s: {last}")


#: A metadata request that times out is asked again: on two cores busy with training and generation a broker
#: answered one after more than 10 s (CI), and a reader that gives up on the first one fails a whole cycle.
TRANSIENT_METADATA_ERRORS = (KafkaError._TIMED_OUT, KafkaError._TRANSPORT)


def partitions_of(settings: KafkaSettings, topic: str, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            metadata = admin(settings).list_topics(topic, timeout=max(min(timeout_s / 3, deadline - time.monotonic()), 0.5))
            break
        except KafkaException as exc:
            if exc.args[0].code() not in TRANSIENT_METADATA_ERRORS or time.monotonic() >= deadline:
                raise BrokerError(f"no metadata for {topic} from {settings.bootstrap_servers} "
                                  f"within {timeout_s:.0f}s: {exc}") from exc
            log.warning("metadata for %s: %s; asking again", topic, exc)
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        raise BrokerError(f"topic {topic} does not exist")
    return sorted(metadata.topics[topic].partitions)


@dataclass(frozen=True)
class Range:
    """Records [start, end) of one partition; ``end=None`` means up to whatever is there now."""

    partition: int
    start: int = 0
    end: int | None = None


def read_ranges(settings: KafkaSettings, topic: str, ranges: list[Range] | None = None, *,
                idle_s: float = 2.0, timeout_s: float = 60.0, first_record_s: float = 5.0) -> Iterator[Message]:
    """Read ``ranges`` of ``topic`` (default: everything) without a consumer group.

    Bounded ranges end at their end offset; open ones end after ``idle_s`` without a record
    (Tansu's high watermarks are not trustworthy). Raises ``BrokerError`` if a bounded range
    is not complete within ``timeout_s``. Before the first record, the wait is at least
    ``first_record_s``: joining and the first fetch take longer than later gaps.
    """
    if ranges is None:
        ranges = [Range(p) for p in partitions_of(settings, topic)]
    ranges = [r for r in ranges if r.end is None or r.end > r.start]
    if not ranges:
        return
    consumer = Consumer(consumer_config(settings, group_id=f"adaptloop-reader-{time.monotonic_ns()}",
                                        **{"fetch.wait.max.ms": 100}))
    try:
        consumer.assign([TopicPartition(topic, r.partition, r.start if r.start else OFFSET_BEGINNING) for r in ranges])
        open_ends = {r.partition: r.end for r in ranges}
        deadline = time.monotonic() + timeout_s
        last_record = time.monotonic()
        quiet_s = max(idle_s, first_record_s)
        while open_ends:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} {ranges} did not finish within {timeout_s}s")
            msg = consumer.poll(0.2)
            if msg is None:
                if all(end is None for end in open_ends.values()) and time.monotonic() - last_record > quiet_s:
                    return
                continue
            if msg.error():
                raise BrokerError(f"reading {topic}: {msg.error()}")
            last_record, quiet_s = time.monotonic(), idle_s
            end = open_ends.get(msg.partition(), -1)
            if end == -1 or (end is not None and msg.offset() >= end):
                continue
            yield msg
            if end is not None and msg.offset() + 1 >= end:
                del open_ends[msg.partition()]
                consumer.incremental_unassign([TopicPartition(topic, msg.partition())])
    finally:
        consumer.close()


def read_topics(kafka: KafkaSettings, names: Iterable[str], *, idle_s: float = 1.0,
                first_record_s: float = 3.0, timeout_s: float = 300.0) -> dict[str, list[Any]]:
    """Every message of every named topic that exists, read by ONE consumer without a group.

    ``read_ranges`` reads one topic and waits ``first_record_s`` on each empty one; status and lineage
    read up to seven topics, so they share one assignment and one idle wait (Tansu's watermarks lie:
    the end is "nothing new for ``idle_s``"). Missing topics read as empty.
    """
    names = list(dict.fromkeys(names))
    out: dict[str, list[Any]] = {name: [] for name in names}
    try:
        metadata = admin(kafka).list_topics(timeout=min(timeout_s, 15.0))
    except KafkaException as exc:
        raise BrokerError(f"cannot list topics on {kafka.bootstrap_servers}: {exc}") from exc
    assignment = [TopicPartition(name, p, OFFSET_BEGINNING)
                  for name in names if name in metadata.topics and metadata.topics[name].error is None
                  for p in sorted(metadata.topics[name].partitions)]
    if not assignment:
        return out
    consumer = Consumer(consumer_config(kafka, group_id=f"adaptloop-lineage-{time.monotonic_ns()}",
                                        **{"fetch.wait.max.ms": 100}))
    try:
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        last_record, quiet_s = time.monotonic(), max(idle_s, first_record_s)
        while time.monotonic() - last_record <= quiet_s:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {names} did not go quiet within {timeout_s}s")
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error():
                    if msg.error().fatal():
                        raise BrokerError(f"reading {msg.topic()}: {msg.error()}")
                    continue
                out[msg.topic()].append(msg)
                last_record, quiet_s = time.monotonic(), idle_s
    finally:
        consumer.close()
    return out


def count_messages(settings: KafkaSettings, topic: str, idle_s: float = 2.0) -> int:
    return sum(1 for _ in read_ranges(settings, topic, idle_s=idle_s, timeout_s=600))
