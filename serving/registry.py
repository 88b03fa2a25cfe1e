"""The adapter registry as the serving side reads it: the releases topic, newest record per version.

The topic keeps every decision (never compacted, never expired: each is lineage), so every reader consumes
it whole from its beginning, without a consumer group or committed offsets, and folds it: the record read last
for a version wins.
``ReleaseReader`` does that in a background thread and hands each batch of changes to a
callback; ``caught_up`` is set once it has read everything the topic held when it started
(position at the reported high watermark and nothing new for ``idle_s``: Tansu's watermarks
undercount, so the idle check is what makes it true there).

A record that does not decode is not skipped silently: it is kept in ``undecodable`` (offset and
reason), logged at ERROR, and shown by the sidecar's ``/adapters``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from adaptloop.errors import BrokerError, DeserializationError
from adaptloop.kafka import consumer_config, ensure_topics, partitions_of
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import SERVABLE
from adaptloop.settings import KafkaSettings, Topics

log = logging.getLogger(__name__)


DEFAULT_IDLE_S = 1.5
DEFAULT_BATCH = 500
WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class Release:
    """The fields of an AdapterRelease record that serving acts on."""

    version: str
    tenant: str
    task: str
    state: str
    digest: str | None
    artifact_uri: str | None
    lora_rank: int
    base_model: str
    created_at: int  # ms since the epoch
    offset: int
    base_model_digest: str | None = None
    #: Its own share of the alias's calls while a canary (adapter_release.v3; an undecided gate's small share);
    #: None: the gateway's ``canary_share``.
    canary_share: float | None = None
    #: The decoded record itself, so that a decision can be written as "this record, new state".
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], offset: int) -> "Release":
        created = record["created_at"]
        # fastavro returns timestamp-millis as an aware datetime.
        created_ms = int(created.timestamp() * 1000) if hasattr(created, "timestamp") else int(created)
        return cls(version=record["version"], tenant=record["tenant"], task=record["task"],
                   state=record["state"], digest=record.get("digest"), artifact_uri=record.get("artifact_uri"),
                   lora_rank=int(record["lora_rank"]), base_model=record["base_model"],
                   created_at=created_ms, offset=offset, base_model_digest=record.get("base_model_digest"),
                   canary_share=record.get("canary_share"), record=dict(record))

    @property
    def servable(self) -> bool:
        return self.state in SERVABLE


def newest_servable(releases: Mapping[str, Release], tenant: str, task: str,
                    loaded: Callable[[str], bool]) -> Release | None:
    """The newest (by ``created_at``) servable release of (tenant, task) for which ``loaded`` is true."""
    candidates = [r for r in releases.values() if r.tenant == tenant and r.task == task and r.servable and loaded(r.version)]
    return max(candidates, key=lambda r: (r.created_at, r.offset), default=None)


class ReleaseReader:
    """Reads ``topics.name("releases")`` from the beginning in a thread; the newest record per version wins.

    ``on_batch(changed)`` (optional) is called from the reader thread with the releases changed by
    each batch, already folded (so a release retired within the same batch is never loaded).
    """

    def __init__(self, kafka: KafkaSettings, topics: Topics, *,
                 on_batch: Callable[[dict[str, Release]], None] | None = None,
                 idle_s: float = DEFAULT_IDLE_S, name: str = "release-reader") -> None:
        self.kafka = kafka
        self.topics = topics
        self.topic = topics.name("releases")
        self.on_batch = on_batch
        self.idle_s = idle_s
        self.name = name
        self.caught_up = threading.Event()
        self.error: BaseException | None = None
        self.undecodable: dict[str, str] = {}
        self._releases: dict[str, Release] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = float("-inf")
        self._deserialize = serde_for("adapter_release", kafka.schema_registry_url).deserialize

    def releases(self) -> dict[str, Release]:
        with self._lock:
            return dict(self._releases)

    def start(self) -> "ReleaseReader":
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_caught_up(self, timeout_s: float) -> bool:
        return self.caught_up.wait(timeout_s)

    def _partitions(self) -> list[int]:
        try:
            return partitions_of(self.kafka, self.topic)
        except BrokerError:
            # A fresh deployment: nobody has created the topics yet. Create them with their layout.
            ensure_topics(self.kafka, self.topics)
            return partitions_of(self.kafka, self.topic)

    def _run(self) -> None:
        try:
            self._consume()
        except Exception as exc:  # surfaced through .error / .alive: the owning process decides to exit
            log.exception("%s stopped", self.name)
            self.error = exc

    def _consume(self) -> None:
        partitions = self._partitions()
        consumer = Consumer(consumer_config(self.kafka, group_id=f"adaptloop-registry-{time.time_ns()}",
                                            **{"fetch.wait.max.ms": 100}))
        try:
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            last_record = time.monotonic()
            while not self._stop.is_set():
                try:
                    messages = consumer.consume(DEFAULT_BATCH, timeout=0.2)
                except KafkaException as exc:
                    raise BrokerError(f"reading {self.topic}: {exc}") from exc
                changed: dict[str, Release] = {}
                for msg in messages:
                    if msg.error():
                        self._on_error(msg.error())
                        continue
                    self._fold(msg, changed)
                if messages:
                    last_record = time.monotonic()
                    with self._lock:
                        self._releases.update(changed)
                    if changed and self.on_batch is not None:
                        self.on_batch(changed)
                elif not self.caught_up.is_set() and time.monotonic() - last_record > self.idle_s \
                        and self._at_high_watermark(consumer, partitions):
                    log.info("%s caught up with %s (%d versions)", self.name, self.topic, len(self._releases))
                    self.caught_up.set()
        finally:
            consumer.close()

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka reconnects by itself after transport errors; only a fatal one ends the reader."""
        if error.fatal():
            raise BrokerError(f"reading {self.topic}: {error}")
        now = time.monotonic()
        if now - self._last_warning > WARN_EVERY_S:
            log.warning("%s: %s (retrying)", self.topic, error)
            self._last_warning = now

    def _fold(self, msg, changed: dict[str, Release]) -> None:
        ctx = SerdeContext(msg.topic(), msg.partition(), msg.offset())
        try:
            release = Release.from_record(self._deserialize(msg.value(), ctx), msg.offset())
        except (DeserializationError, KeyError, TypeError, ValueError) as exc:
            where = f"{msg.partition()}:{msg.offset()}"
            log.error("undecodable release at %s %s: %s", self.topic, where, exc)
            self.undecodable[where] = f"{type(exc).__name__}: {exc}"
            return
        changed[release.version] = release

    def _at_high_watermark(self, consumer: Consumer, partitions: list[int]) -> bool:
        """Necessary, not sufficient on Tansu (its high watermark undercounts); the idle time does the rest."""
        positions = consumer.position([TopicPartition(self.topic, p) for p in partitions])
        for tp in positions:
            low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            position = tp.offset if tp.offset >= 0 else low
            if position < high:
                return False
        return True
