"""The window agent's body: count curated examples per (tenant, task) and send training requests, at least once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from faust.types import EventT

from adaptloop.schemas import SerdeContext
from adaptloop.streams import stages
from adaptloop.streams.metrics import ADMITTED
from adaptloop.streams.stages import SourceRef
from adaptloop.streams.state import stamped
from adaptloop.streams.windows import training_request, window_fired, window_update

log = logging.getLogger(__name__)


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
