"""The window agent's body: count curated examples per (tenant, task) and send training requests, at least once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from faust.types import TP, EventT

from adaptloop.schemas import SerdeContext
from adaptloop.streams import stages
from adaptloop.streams.metrics import ADMITTED
from adaptloop.streams.stages import SourceRef
from adaptloop.streams.state import stamped
from adaptloop.streams.windows import training_request, window_fired, window_update

log = logging.getLogger(__name__)

#: How long a hole in a partition's records may wait for the re-read asked for it before it is asked again.
HOLE_RESEEK_S = 5.0


class WindowAgent:
    """Mixed into ``adaptloop.streams.curation.Curation``: uses its window tables, catalogue, settings and sends."""

    def window_size(self, task: str) -> int:
        """The task's own window (its catalogue entry), else the worker's."""
        spec = self.catalogue.tasks.get(task)
        return (spec.window_size if spec else None) or self.settings.window_size

    def min_examples(self, task: str) -> int:
        spec = self.catalogue.tasks.get(task)
        return (spec.min_examples if spec else None) or self.settings.window_min_examples

    async def on_curated(self, event: EventT) -> None:
        """One curated example: count it for its (tenant, task) and fire a training request when due."""
        ref = SourceRef(event.message.topic, event.message.partition, event.message.offset)
        if not self._in_offset_order(ref):
            return
        example = self.curated_serde.deserialize(event.value, SerdeContext(ref.topic, ref.partition, ref.offset))
        key = stages.curated_key(example["tenant"], example["task"])
        counted_key = f"{key}/{example['example_id']}"
        counted = self.counted.get(counted_key)
        counted_offset = counted["o"] if isinstance(counted, dict) else counted  # a bare offset: written before "at"
        repeat = example["admitted"] and counted is not None and counted_offset != ref.offset
        previous = self.staged_windows.get(key)
        state, fire = window_update(previous, example | {"admitted": example["admitted"] and not repeat},
                                           partition=ref.partition, offset=ref.offset,
                                           window_size=self.window_size(example["task"]))
        if previous is not None and state["newest"] == previous.get("newest"):
            log.info("curated %s@%d: replayed, already counted", ref.topic, ref.offset)
            return
        if example["admitted"] and not repeat:
            self.counted[counted_key] = stamped({"o": ref.offset}, now=stages.now_ms(), partition=ref.partition)
            self.metrics.record(stages.STAGE_WINDOW, ADMITTED, tenant_task=key)
        state["p"] = ref.partition
        if fire:
            await self._fire(key, example["tenant"], example["task"], state, trigger=f"count>={self.window_size(example['task'])}")
        else:
            self.staged_windows.stage(key, state, event)

    def _in_offset_order(self, ref: SourceRef) -> bool:
        """Whether ``ref`` is the partition's next record (or a replay of an earlier one).

        A window's request names the curated records up to its newest offset, so it may only count in
        offset order. Around a rebalance Faust's stream can skip records (see ``streams.faust_app``); the
        consumer re-reads them later, which would count them after newer ones, outside the windows that
        already named them. So a record past a hole is left alone (the commit stays at the hole) and the
        partition is read again from the hole at once; the records after it come again.
        """
        tp = TP(ref.topic, ref.partition)
        expected = self._window_next.get(tp)
        if expected is None:
            expected = self.app.consumer.next_needed(tp)
        if expected is not None and ref.offset > expected:
            sought = self._window_sought.get(tp)
            now = time.monotonic()
            if sought is None or sought[0] != expected or now - sought[1] >= HOLE_RESEEK_S:
                log.warning("%s[%d]: offset %d came before %d (records the stream skipped); reading again from %d",
                            ref.topic, ref.partition, ref.offset, expected, expected)
                self._window_sought[tp] = (expected, now)
                self.app.consumer.read_again_from(tp, expected)
            return False
        self._window_next[tp] = ref.offset + 1
        return True

    async def _fire(self, key: str, tenant: str, task: str, state: dict[str, Any], *, trigger: str) -> None:
        """Decide the request, make the decision durable (table + flush), then send it."""
        if state.get("pending"):
            # The previous window's request, decided before a crash and not sent yet: it goes out first
            # (deciding this one replaces it in the table, and that window would have no request).
            await self._send_request(key, state)
        request = training_request(tenant, task, state, curated_topic=self.curated.get_topic_name(),
                                          trigger=trigger, task_digest=self.catalogue.get(task).digest)
        state = window_fired(state, request)
        self.staged_windows.discard(key)
        self.staged_windows.write()
        self.windows[key] = state
        self._requests_in_flight[request["request_id"]] = asyncio.Event()  # the tick must not resend it meanwhile
        await self.app.producer.flush()  # the pending request is in the changelog before it is sent
        self._crash_point("request_pending")
        await self._send_request(key, state, owned=True)

    async def _send_request(self, key: str, state: dict[str, Any], *, owned: bool = False) -> None:
        request = state["pending"]
        if not owned:
            sending = self._requests_in_flight.get(request["request_id"])
            if sending is not None:  # another task sends it: done when that send is
                await sending.wait()
                return
            self._requests_in_flight[request["request_id"]] = asyncio.Event()
        try:
            topic = self.training_requests.get_topic_name()
            await self._send(self.training_requests, key, self.request_serde.serialize(request, SerdeContext(topic)))
        finally:
            self._requests_in_flight.pop(request["request_id"]).set()
        log.info("training request %s for %s (%s): %d train, %d holdout", request["request_id"][:12], key,
                 request["trigger"], request["train_count"], request["holdout_count"])
        self._crash_point("request_sent")
        # Re-read: the window agent may have counted more examples while this one was being sent.
        current = dict(self.windows.get(key) or state)
        if (current.get("pending") or {}).get("request_id") == request["request_id"]:
            self.windows[key] = current | {"pending": None}

    def _crash_point(self, point: str) -> None:
        """Crash drills (``ADAPTLOOP_STREAMS_CRASH_POINT``): a real SIGKILL at an exact point, as a power cut would."""
        if self.settings.crash_point == point:
            log.warning("crash point %s reached: SIGKILL", point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
