"""``faust.App`` with three fixes to its consumer (aiokafka, the transport adaptloop uses), and
``new_app``: such an app configured for adaptloop's brokers (TLS/SASL, Tansu), as every worker starts it.

**A partition never committed to is rewound after a rebalance.**
Faust drops records it fetched but had not handed to an agent when a rebalance begins (its fetch loop
stops when the flow is suspended or the generation changes), and relies on the seek that ends every
rebalance to fetch them again: ``perform_seek`` moves each partition back to its committed offset.
A partition with no committed offset (a new group, or a worker killed before its first commit) is
not moved: aiokafka seeks only to offsets above 0. Its position stays after the dropped records, and
they are never processed: seen here as a restarted curation worker that read none of its inputs
(positions at the end, nothing read, nothing committed) after its predecessor was SIGKILLed.

Here such a partition is moved to its first offset instead, which is where ``auto_offset_reset =
earliest`` starts it: the same at-least-once replay a committed partition gets.

**No offset is committed that no agent acknowledged; a record the stream skipped is read again.**
Around a rebalance Faust can hand an agent a partition's records with one missing: a record fetched
before the seek to the committed offset and dropped (the stream skips records that arrive while its
flow is suspended; the fetch loop drops records below a read offset a stale fetch moved forward;
faust-streaming #216). Two parts of its commit logic then made the loss permanent, seen here as a
curated example missing after one of two workers died: a forward jump in offsets is recorded as a
gap and counted as acknowledged (meant for compacted topics and transaction markers; the topics
adaptloop's agents read are neither), and a missing offset right at the committed one was committed
past (``min(acked) - committed > 1`` instead of ``> 0``; faust-streaming #606). Here offsets are
committed only up to the first one not acknowledged, and a partition whose first unacknowledged offset
was handed to the stream but has not been taken by an agent for ``SKIPPED_RECORD_GRACE_S`` is sought
back to it: the skipped record is processed (and the ones after it again: at least once, as after a
crash).

**On Tansu (``batch_counted_ends=True``), table recovery reads each changelog to its real end.**
Tansu reports a partition's end as its newest *batch's* first offset + 1, and Faust's table recovery
stops reading a changelog at the end it was told: the records after the first one of a multi-record
batch would be missing from the table after a restart. The end of each changelog partition is
therefore read from the log itself: the records of the batch that holds the reported end's offset - 1
(the newest batch), whose last offset + 1 is the end. Producers then batch every topic, changelogs
included (the alternative, one record per changelog batch, cost a fifth of curation's throughput).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Mapping

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from mode import Service

from adaptloop.settings import KafkaSettings, StreamsSettings

log = logging.getLogger(__name__)

#: How long a partition's first unacknowledged offset may stay handed to the stream but not taken by an
#: agent before the partition is read again from it (an agent's queue drains in a few seconds even
#: under full load; a false alarm costs a replay of what followed it, never a loss).
SKIPPED_RECORD_GRACE_S = 10.0

#: How long reading one changelog partition's newest batch may take (a broker that does not answer
#: within it fails the recovery, and the worker's restart tries again).
BATCH_END_TIMEOUT_S = 30.0


async def batch_counted_end(consumer: AIOKafkaConsumer, tp: TopicPartition, reported_end: int, *,
                            timeout_s: float = BATCH_END_TIMEOUT_S) -> int:
    """The real end of ``tp`` on a broker that reports the newest batch's first offset + 1 as its end.

    ``consumer`` is assigned to nothing else; the records fetched at ``reported_end - 1`` are the newest
    batch (and whatever was appended since), all returned by one fetch."""
    if reported_end <= 0:
        return reported_end
    consumer.assign([tp])
    consumer.seek(tp, reported_end - 1)
    records = await consumer.getmany(tp, timeout_ms=int(timeout_s * 1000))
    offsets = [record.offset for record in records.get(tp, ())]
    if not offsets:
        raise TimeoutError(f"{tp.topic}[{tp.partition}]: no record at offset {reported_end - 1} within {timeout_s}s")
    return max(reported_end, max(offsets) + 1)


#: The longest a fetch waits for records. Faust fixes it at 1500 ms, and Tansu holds a fetch of several
#: partitions until then even when a record arrives meanwhile: each hop through an agent waited up to 1.5 s
#: (the loop's "request" stage, curated -> training request, took 1.5 s in every loop-bench run). At 100 ms a
#: record produced to a partition of a subscribed topic was read within 7-74 ms, against 56-1423 ms.
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by its fetcher when it starts
        return consumer


class Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holes_since: dict[TP, tuple[int, float]] = {}  # tp -> (committed offset, first seen)
        self._rereads: set[asyncio.Task] = set()
        self._first_offsets: dict[TP, int] = {}  # where never-committed partitions were rewound to

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Not a gap: a skipped record (see above). Nothing is counted as acknowledged."""
        log.info("%s[%d]: offsets %d..%d arrived out of order; not counted as processed",
                 tp.topic, tp.partition, offset_from, offset_to)

    def next_needed(self, tp: TP) -> int | None:
        """The first offset of ``tp`` no agent has acknowledged yet (None: unknown)."""
        committed = self._committed_offset.get(tp)
        return committed if committed is not None else self._first_offsets.get(tp)

    def read_again_from(self, tp: TP, offset: int) -> None:
        """Seek ``tp`` back to ``offset`` soon (in a task of its own: an agent calls this mid-batch)."""
        task = asyncio.get_running_loop().create_task(self._read_again(tp, offset))
        self._rereads.add(task)
        task.add_done_callback(self._rereads.discard)

    def _new_offset(self, tp: TP) -> int | None:
        needed, acked = self.next_needed(tp), self._acked.get(tp)
        if needed is not None and acked and min(acked) > needed:
            return None  # a hole at the head: nothing past it is committed (_find_skipped_records reads it)
        return super()._new_offset(tp)

    def _position(self, tp: TP) -> int | None:
        """aiokafka's position in ``tp``: the offset after the last record it handed to Faust's fetch loop."""
        consumer = self._thread._consumer  # the aiokafka consumer (None before it starts)
        state = consumer._fetcher._subscriptions.subscription.assignment.state_value(
            TopicPartition(tp.topic, tp.partition)) if consumer is not None and consumer._fetcher else None
        return state.position if state is not None and state.has_valid_position else None

    def _skipped(self, tp: TP) -> int | None:
        """The offset of ``tp`` that was handed to the stream but neither acknowledged nor being processed."""
        needed, position = self.next_needed(tp), self._position(tp)
        if needed is None or position is None or position <= needed or needed in self._acked_index[tp]:
            return None
        if any(m.tp == tp and m.offset == needed for m in list(self._unacked_messages)):
            return None  # taken by an agent, not acknowledged yet
        return needed

    @Service.timer(SKIPPED_RECORD_GRACE_S / 4)
    async def _find_skipped_records(self) -> None:
        self.read_skipped_records_again(time.monotonic())

    def read_skipped_records_again(self, now: float) -> None:
        """Seek each partition whose skipped record has waited ``SKIPPED_RECORD_GRACE_S`` back to it."""
        if not self.app.flow_control.is_active() or self.app.rebalancing:
            self._holes_since.clear()
            return
        changelogs = self.app.tables.changelog_topics
        for tp in self.assignment():
            skipped = None if tp.topic in changelogs else self._skipped(tp)
            since = self._holes_since.get(tp)
            if skipped is None:
                self._holes_since.pop(tp, None)
            elif since is None or since[0] != skipped:
                self._holes_since[tp] = (skipped, now)
            elif now - since[1] >= SKIPPED_RECORD_GRACE_S:
                del self._holes_since[tp]
                log.warning("%s[%d]: offset %d was handed to the stream %.0fs ago and never processed (a record "
                            "skipped around a rebalance): reading again from it", tp.topic, tp.partition,
                            skipped, now - since[1])
                self.read_again_from(tp, skipped)

    async def _read_again(self, tp: TP, offset: int) -> None:
        try:
            await self.seek_wait({tp: offset})
        except Exception as exc:  # revoked meanwhile: the next owner starts from the committed offset anyway
            log.warning("%s[%d]: could not seek back to %d: %r", tp.topic, tp.partition, offset, exc)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        changelogs = self.app.tables.changelog_topics  # table recovery positions these itself
        # Faust keeps a committed 0 as None too: both start at the first offset.
        never_committed = {tp for tp in self.assignment()
                           if tp.topic not in changelogs and not self._committed_offset.get(tp)}
        if never_committed:
            earliest = await self.earliest_offsets(*never_committed)
            self._first_offsets.update({tp: offset for tp, offset in earliest.items() if offset is not None})
            await self.seek_wait({tp: offset for tp, offset in earliest.items() if offset is not None})

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        """Partition ends; on a broker that counts them by batch, changelogs' are read from the log."""
        ends = dict(await super().highwaters(*partitions))
        changelogs = self.app.tables.changelog_topics
        wanted = {tp: end for tp, end in ends.items() if tp.topic in changelogs and end}
        if not getattr(self.app, "batch_counted_ends", False) or not wanted:
            return ends
        reader = AIOKafkaConsumer(bootstrap_servers=[f"{url.host}:{url.port or 9092}" for url in self.app.conf.broker],
                                  group_id=None, enable_auto_commit=False, client_id=f"{self.app.conf.id}-changelog-ends",
                                  request_timeout_ms=int(BATCH_END_TIMEOUT_S * 1000))
        await reader.start()
        try:
            for tp, end in wanted.items():
                ends[tp] = await batch_counted_end(reader, TopicPartition(tp.topic, tp.partition), end)
                if ends[tp] != end:
                    log.info("changelog %s[%d]: the broker reports its end at %d, the log ends at %d",
                             tp.topic, tp.partition, end, ends[tp])
        finally:
            await reader.stop()
        return ends


class _Transport(aiokafka_driver.Transport):
    Consumer = Consumer


class App(faust.App):
    """Only ``kafka://`` brokers (aiokafka), the transport adaptloop uses.

    ``batch_counted_ends=True`` (Tansu): the broker's partition ends count batches (see above)."""

    def __init__(self, *args: Any, batch_counted_ends: bool = False, **kwargs: Any) -> None:
        self.batch_counted_ends = batch_counted_ends
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)


def _broker_options(kafka: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "broker": [f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
    }
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(kafka.ssl_ca_location) if kafka.ssl_ca_location else None)
    if kafka.security_protocol.startswith("SASL"):
        options["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username, password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism, ssl_context=context)
    elif context is not None:
        options["broker_credentials"] = faust.SSLCredentials(context)
    return options


def _tansu_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Tansu's partition ends count batches, not records: table recovery reads changelogs' ends from the
    log (``App`` above). Only on the embedded broker, the same switch that turns producer idempotence off."""
    return {"batch_counted_ends": True} if kafka.embedded else {}


def new_app(settings: StreamsSettings) -> App:
    """A Faust app for ``settings`` on adaptloop's brokers; nothing global, nothing started. The curation
    app and the streams bench's pass-through both start from it, so the baseline runs as curation does."""
    return App(
        settings.app_id,
        **_broker_options(settings.kafka),
        # Tansu: a group join waits half the session timeout; 2 s causes rebalance storms.
        broker_session_timeout=6,
        # Tansu has no transactions: at least once, consumers de-duplicate by id.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_request_timeout=settings.kafka.delivery_timeout_s,
        **_tansu_options(settings.kafka),
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        topic_disable_leader=True,
        # Timers and in-memory indexes scan only active partitions' state; standbys would be stale copies.
        table_standby_replicas=0,
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        datadir=str(settings.data_dir),
        web_port=settings.web_port,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        autodiscover=False,
    )
