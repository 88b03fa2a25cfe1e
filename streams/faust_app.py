"""``faust.App`` with two fixes to its Kafka clients (aiokafka, the transport adaptloop uses).

**The consumer: a partition never committed to is rewound after a rebalance.**

Faust drops records it fetched but had not handed to an agent when a rebalance begins (its fetch loop
stops when the flow is suspended or the generation changes), and relies on the seek that ends every
rebalance to fetch them again: ``perform_seek`` moves each partition back to its committed offset.
A partition with no committed offset (a new group, or a worker killed before its first commit) is
not moved: aiokafka seeks only to offsets above 0. Its position stays after the dropped records, and
they are never processed: seen here as a restarted curation worker that read none of its inputs
(positions at the end, nothing read, nothing committed) after its predecessor was SIGKILLed.

Here such a partition is moved to its first offset instead, which is where ``auto_offset_reset =
earliest`` starts it: the same at-least-once replay a committed partition gets.

**The producer, on Tansu (``one_record_changelog_batches``): one record per batch for changelogs only.**
Tansu reports a partition's end as its newest *batch's* first offset + 1, and Faust's table recovery
stops reading a changelog at that end: records after it in a multi-record batch would be lost from
the table on restart. So each changelog record gets a batch of its own. Every other topic keeps
aiokafka's batching: a batch size of 1 for all topics (what this replaces) made each send to a
partition wait until the previous one had gone out in a request of its own, one broker round trip
per record, which undid the batched acknowledgement of ``adaptloop.streams.delivery``.
"""

from __future__ import annotations

from typing import Any, Callable

import aiokafka
import faust
from aiokafka.producer.message_accumulator import MessageAccumulator
from faust.transport.drivers import aiokafka as aiokafka_driver


class RewindingConsumer(aiokafka_driver.Consumer):
    async def perform_seek(self) -> None:
        await super().perform_seek()
        changelogs = self.app.tables.changelog_topics  # table recovery positions these itself
        # Faust keeps a committed 0 as None too: both start at the first offset.
        never_committed = {tp for tp in self.assignment()
                           if tp.topic not in changelogs and not self._committed_offset.get(tp)}
        if never_committed:
            earliest = await self.earliest_offsets(*never_committed)
            await self.seek_wait({tp: offset for tp, offset in earliest.items() if offset is not None})


class OneRecordBatchesAccumulator(MessageAccumulator):
    """aiokafka's accumulator, except that a topic ``one_record`` names gets batches of one record each."""

    one_record: Callable[[str], bool] = staticmethod(lambda topic: False)

    def _append_batch(self, builder: Any, tp: Any) -> Any:
        if builder.record_count() == 0 and self.one_record(tp.topic):
            # A builder with room for one record; synchronous, so no other task sees the size change.
            full_size, self._batch_size = self._batch_size, 1
            try:
                builder = self.create_builder()
            finally:
                self._batch_size = full_size
        return super()._append_batch(builder, tp)


class ChangelogSafeProducer(aiokafka_driver.Producer):
    def _new_producer(self, transactional_id: str | None = None) -> aiokafka.AIOKafkaProducer:
        producer = super()._new_producer(transactional_id)
        if getattr(self.app, "one_record_changelog_batches", False):
            # aiokafka builds its accumulator inside the producer (and hands it to its sender), so the
            # instance is given the subclass rather than replaced.
            accumulator = producer._message_accumulator
            accumulator.__class__ = OneRecordBatchesAccumulator
            accumulator.one_record = self._is_changelog
        return producer

    def _is_changelog(self, topic: str) -> bool:
        return topic in self.app.tables.changelog_topics


class _Transport(aiokafka_driver.Transport):
    Consumer = RewindingConsumer
    Producer = ChangelogSafeProducer


class App(faust.App):
    """Only ``kafka://`` brokers (aiokafka), the transport adaptloop uses.

    ``one_record_changelog_batches=True`` (Tansu): changelog records go one per batch (see above)."""

    def __init__(self, *args: Any, one_record_changelog_batches: bool = False, **kwargs: Any) -> None:
        self.one_record_changelog_batches = one_record_changelog_batches
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)
