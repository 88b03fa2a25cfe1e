"""Acknowledged delivery, one broker round trip per batch of input records instead of one per record.

An input record counts as processed only after the broker acknowledged everything it produced
(at least once; Tansu has no transactions). Awaiting each acknowledgement before taking the next
record makes a stage as slow as the broker's round trip; here an agent takes up to ``max_events``
records (or what arrived within ``within_s``), handles them one by one, sends without waiting,
and awaits all acknowledgements together before Faust acks (and may commit) the batch.

    @app.agent(topic)
    async def stage(stream):
        await run_batched(stream, handle, max_events=256, within_s=0.005, timeout_s=30.0)

Inside a batch, ``send_acknowledged`` collects the delivery instead of awaiting it, and
``after_delivery(fn)`` defers what may only happen once the records are in the log (the join table's
"emitted" flag: written earlier, a crash would leave it set for an example that was never sent).
Outside a batch (timers, the tick agent) both act at once, as before. A record the broker does not
acknowledge in time ends the worker at once, uncommitted (``stop_now``, exit status 75).

Faust tables find a key's changelog partition through the *current event* of the task; ``take_events``
sets it in its background reader, not in the agent's task, so each record's event is made current
while it is handled, and again for its deferred actions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, NoReturn

import faust
from aiokafka.errors import KafkaError
from faust.streams import _current_event  # the contextvar faust.streams.current_event() reads
from faust.streams import current_event
from faust.types import EventT

from adaptloop.errors import DeliveryError

log = logging.getLogger(__name__)

#: The worker's exit status when a record it produced was not acknowledged.
DELIVERY_FAILED_EXIT = 75


@dataclass
class _Batch:
    pending: list[tuple[str, Awaitable[Any]]] = field(default_factory=list)
    after: list[tuple[EventT | None, Callable[[], None]]] = field(default_factory=list)


_current_batch: ContextVar[_Batch | None] = ContextVar("adaptloop_delivery_batch", default=None)


@contextmanager
def event_context(event: EventT | None) -> Iterator[None]:
    """Table writes in here go to ``event``'s changelog partition; the caller's event is current again after."""
    token = _current_event.set(weakref.ref(event) if event is not None else None)
    try:
        yield
    finally:
        _current_event.reset(token)


class StagedWrites:
    """A table's writes kept in memory during a batch, then written once per key (its newest value), each
    in the changelog partition of the record that staged it: one changelog record per key and batch, as
    Kafka Streams' record cache does. Reads (``get``) see staged values first."""

    def __init__(self, table: faust.TableT) -> None:
        self.table = table
        self._staged: dict[Any, tuple[EventT | None, Any]] = {}

    def get(self, key: Any) -> Any:
        staged = self._staged.get(key)
        return staged[1] if staged else self.table.get(key)

    def stage(self, key: Any, value: Any, event: EventT | None = None) -> None:
        """Keep ``value`` for ``key``, to be written in ``event``'s (default: the current event's) partition."""
        self._staged[key] = (event if event is not None else current_event(), value)

    def discard(self, key: Any) -> None:
        self._staged.pop(key, None)

    def holds(self, key: Any) -> bool:
        """Whether ``key`` has a value waiting for the batch's end."""
        return key in self._staged

    def put(self, key: Any, value: Any) -> None:
        """Write at once (in the current event's changelog partition), superseding a staged value."""
        self.discard(key)
        self.table[key] = value

    def staged_items(self) -> list[tuple[Any, Any]]:
        return [(key, value) for key, (_, value) in self._staged.items()]

    def write(self) -> None:
        staged, self._staged = self._staged, {}
        for key, (event, value) in staged.items():
            with event_context(event):
                self.table[key] = value


def stop_now(error: DeliveryError) -> NoReturn:
    """Exit at once, skipping Faust's graceful stop: it commits the offsets of every record already
    acked (a batch's, as ``take_events`` acks in its ``finally``), which would lose the inputs whose
    outputs never reached the broker. A restarted worker resumes from the last commit (at least once)."""
    log.critical("%s; exiting without committing offsets (a restart resumes from the last commit)", error)
    logging.shutdown()
    os._exit(DELIVERY_FAILED_EXIT)


async def _acknowledged(topic_name: str, pending: Awaitable[Any], timeout_s: float) -> Any:
    try:
        return await asyncio.wait_for(pending, timeout_s)
    except (asyncio.TimeoutError, KafkaError) as exc:
        stop_now(DeliveryError(f"{topic_name}: not acknowledged within {timeout_s}s: {exc!r}"))


async def send_acknowledged(topic: faust.TopicT, key: str | bytes | None, value: bytes, *, timeout_s: float) -> None:
    """Send now; inside a batch the acknowledgement is awaited with the batch's, else here.

    If none comes in time the worker exits at once (``stop_now``) and its restart resumes from the
    last commit.
    """
    name = topic.get_topic_name()
    try:
        pending = await topic.send(key=key.encode() if isinstance(key, str) else key, value=value, force=True)
    except KafkaError as exc:
        stop_now(DeliveryError(f"{name}: not sent: {exc!r}"))
    batch = _current_batch.get()
    if batch is None:
        await _acknowledged(name, pending, timeout_s)
    else:
        batch.pending.append((name, pending))


def after_delivery(action: Callable[[], None]) -> None:
    """Run ``action`` once everything sent so far in this batch is acknowledged (at once outside a batch)."""
    batch = _current_batch.get()
    if batch is None:
        action()
    else:
        batch.after.append((current_event(), action))


async def _settle(batch: _Batch, timeout_s: float) -> None:
    if batch.pending:
        names = [name for name, _ in batch.pending]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(pending for _, pending in batch.pending),
                                                            return_exceptions=True), timeout_s)
        except asyncio.TimeoutError:
            stop_now(DeliveryError(f"{len(names)} records (to {sorted(set(names))}) not all acknowledged "
                                   f"within {timeout_s}s"))
        failed = [(name, r) for name, r in zip(names, results) if isinstance(r, BaseException)]
        if failed:
            name, first = failed[0]
            stop_now(DeliveryError(f"{len(failed)} of {len(names)} records not acknowledged; first ({name}): {first!r}"))
    for event, action in batch.after:
        with event_context(event):
            action()


async def run_batched(stream: faust.StreamT, handle: Callable[[EventT], Awaitable[None]], *, max_events: int,
                      within_s: float, timeout_s: float, before_settle: Callable[[], None] | None = None) -> None:
    """Handle every record of ``stream``; a batch is acked only after its deliveries are acknowledged.

    ``before_settle`` runs once the batch's records are handled, before its deliveries are awaited
    (to write state the batch kept in memory)."""
    async for events in stream.take_events(max_events, within=within_s):
        batch = _Batch()
        token = _current_batch.set(batch)
        try:
            for event in events:
                with event_context(event):
                    await handle(event)
        finally:
            _current_batch.reset(token)
        if before_settle is not None:
            before_settle()
        await _settle(batch, timeout_s)
