"""The gateway's ``/stats``: per alias and served version, its recent calls' latency and upstream errors."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from adaptloop.artifacts import alias as make_alias
from adaptloop.serving.routing import Route

#: Calls kept per (alias, version) for /stats.
STATS_WINDOW = 5000


class Stats:
    """Per alias and served version: the recent calls' (time, latency or None for an upstream error).

    ``/stats?alias=A&since_ms=T`` sums the calls since T, so that the canary controller compares the
    canary and the incumbent over the same period.
    """

    def __init__(self, window: int = STATS_WINDOW) -> None:
        self.window = window
        self.calls: dict[tuple[str, str], deque] = {}
        self.unrecorded = 0

    def add(self, route: Route, latency_ms: float | None) -> None:
        key = (make_alias(route.tenant, route.task), route.version or "base")
        self.calls.setdefault(key, deque(maxlen=self.window)).append((int(time.time() * 1000), latency_ms))

    @staticmethod
    def summary(calls: list[tuple[int, float | None]]) -> dict[str, Any]:
        latencies = sorted(latency for _, latency in calls if latency is not None)
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else 0.0
        return {"requests": len(calls), "errors": len(calls) - len(latencies), "p95_ms": round(p95, 2)}

    def as_dict(self, alias_name: str | None = None, since_ms: int = 0) -> dict[str, Any]:
        aliases: dict[str, dict[str, Any]] = {}
        for (name, served), calls in list(self.calls.items()):
            if alias_name is None or name == alias_name:
                aliases.setdefault(name, {})[served] = self.summary([c for c in calls if c[0] >= since_ms])
        return {"aliases": aliases, "unrecorded": self.unrecorded, "window": self.window}
