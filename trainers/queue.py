"""The trainer's queue: training requests served fairly across tenants, never one tenant behind another's backlog.

Requests arrive on one partition in the order their windows fired. The trainer reads ahead of the request it
works on and serves, each time, the tenant served longest ago (a tenant that never was, first) among those
waiting, its oldest request first: two tenants' requests alternate, whatever order they arrived in, and no
tenant waits behind more than one job of each other tenant.

Offsets are committed in order (Kafka's model): after a request is done the committable offset is the first
one still waiting or in work, so a crash replays at most the requests read ahead of it, and the trainer
already answers a replayed request with the release it published (``TrainerService.handle``).

    queue = FairQueue()
    queue.add(offset, request)               # every request polled, as soon as it is polled
    offset, request = queue.next(busy)       # the one to train now, none of an alias in ``busy`` (None: nothing)
    commit = queue.done(offset)              # the offset to commit now, or None (an earlier one is pending)
    queue.waiting(now_ms)                    # [(tenant, task, request id, waited ms)] in serving order
"""

from __future__ import annotations

from typing import Any, Collection, Mapping


class FairQueue:
    def __init__(self) -> None:
        self._waiting: dict[int, Mapping[str, Any]] = {}  # offset -> request, in arrival order
        self._working: set[int] = set()
        self._served_at: dict[str, int] = {}  # tenant -> the turn it was last served
        self._turn = 0
        self._read_to = -1  # the highest offset done
        self._committed: int | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def clear(self) -> None:
        """Forget what was read ahead (the partition moved to another consumer: it reads them again)."""
        self._waiting.clear()
        self._working.clear()
        self._committed = None

    def add(self, offset: int, request: Mapping[str, Any]) -> None:
        if offset not in self._working:
            self._waiting.setdefault(offset, request)

    @staticmethod
    def _first(waiting: Mapping[int, Mapping[str, Any]], served_at: Mapping[str, int]) -> int:
        """The offset to serve next: the tenant served longest ago (never, first), then its oldest request."""
        return min(waiting, key=lambda o: (served_at.get(waiting[o]["tenant"], -1), o))

    def _order(self) -> list[int]:
        """Waiting offsets in the order ``next`` serves them (if nothing else arrives)."""
        served_at, waiting, order = dict(self._served_at), dict(self._waiting), []
        while waiting:
            offset = self._first(waiting, served_at)
            served_at[waiting.pop(offset)["tenant"]] = self._turn + len(order)
            order.append(offset)
        return order

    def next(self, busy: Collection[tuple[str, str]] = ()) -> tuple[int, Mapping[str, Any]] | None:
        """The request to train now, or None; none of a (tenant, task) in ``busy`` (one in training already: the
        next of an alias is gated against what the one before it releases)."""
        ready = {o: r for o, r in self._waiting.items() if (r["tenant"], r["task"]) not in busy}
        if not ready:
            return None
        offset = self._first(ready, self._served_at)
        request = self._waiting.pop(offset)
        self._working.add(offset)
        self._served_at[request["tenant"]] = self._turn
        self._turn += 1
        return offset, request

    def done(self, offset: int) -> int | None:
        """Mark ``offset`` done; the position to commit now (the first offset a restart must read: the oldest
        one not done), or None when that has not moved."""
        self._working.discard(offset)
        self._read_to = max(self._read_to, offset)
        pending = list(self._waiting) + list(self._working)
        position = min(pending) if pending else self._read_to + 1
        if position == self._committed:
            return None
        self._committed = position
        return position

    def waiting(self, now_ms: int) -> list[dict[str, Any]]:
        """What waits, in the order it will be served, with how long each has waited (from its window firing)."""
        return [{"tenant": r["tenant"], "task": r["task"], "request_id": r["request_id"],
                 "waited_s": round(max(0, now_ms - int(r["created_at"])) / 1000, 1)}
                for r in (self._waiting[offset] for offset in self._order())]
