"""``faust.App`` with one fix to its consumer: a partition never committed to is rewound after a rebalance.

Faust drops records it fetched but had not handed to an agent when a rebalance begins (its fetch loop
stops when the flow is suspended or the generation changes), and relies on the seek that ends every
rebalance to fetch them again: ``perform_seek`` moves each partition back to its committed offset.
A partition with no committed offset (a new group, or a worker killed before its first commit) is
not moved: aiokafka seeks only to offsets above 0. Its position stays after the dropped records, and
they are never processed: seen here as a restarted curation worker that read none of its inputs
(positions at the end, nothing read, nothing committed) after its predecessor was SIGKILLed.

Here such a partition is moved to its first offset instead, which is where ``auto_offset_reset =
earliest`` starts it: the same at-least-once replay a committed partition gets.
"""

from __future__ import annotations

import faust
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


class _Transport(aiokafka_driver.Transport):
    Consumer = RewindingConsumer


class App(faust.App):
    """Only ``kafka://`` brokers (aiokafka), the transport adaptloop uses."""

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)
