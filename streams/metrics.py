"""Curation counters per stage and per (tenant, task), as Prometheus text and as JSON.

Counters are per worker process and start at zero when it starts (as Prometheus counters do);
sum them over workers. Reasons are reduced to short codes (``reason_code``) so label values
stay few: "unknown task 'x'; known: [...]" becomes ``unknown_task``.

JSON shape (``CurationMetrics.snapshot()``, served at ``GET /adaptloop/metrics``)::

    {"stages": {"decode": {"admitted": 0, "rejected": {}, "dead_lettered": {"unknown_task": 1}, "erased": 0}, ...},
     "tenants": {"acme/order-extract": {"admitted": 9, "rejected": {"near_duplicate": 1},
                                        "dead_lettered": {}, "erased": 0, "redactions": {"email": 2}}},
     "consumer_lag": {"agent.interactions/0": 0, ...},
     "state": {"entries": {"joins": 12, ...}, "evicted": {"joins": 3, ...}}}   (adaptloop.streams.state)
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the web view)

ADMITTED, REJECTED, DEAD_LETTERED, ERASED = "admitted", "rejected", "dead_lettered", "erased"
UNKNOWN = "-"
CURATED_STAGE = "dedupe"  # the stage that writes the curated topic  # tenant/task label when the record could not be decoded

_NOISE = re.compile(r"'[^']*'|\"[^\"]*\"|\([^)]*\)|\[[^\]]*\]|\b[-+]?\d[\w.:-]*")


def reason_code(reason: str) -> str:
    """A short, low-cardinality code for a reason text: quoted values, numbers and parentheses dropped."""
    head = _NOISE.sub(" ", reason.split(";")[0].split(":")[0])
    words = re.findall(r"[a-z_]+", head.lower())[:4]
    return "_".join(words) or "other"


def _entry() -> dict[str, Any]:
    return {ADMITTED: 0, REJECTED: defaultdict(int), DEAD_LETTERED: defaultdict(int), ERASED: 0}


class CurationMetrics:
    """One registry per app (no global state): record(...) updates Prometheus and the JSON view together."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._records = Counter("adaptloop_streams_records", "Records per stage, tenant/task, result and reason",
                                ["stage", "tenant_task", "result", "reason"], registry=self.registry)
        self._redactions = Counter("adaptloop_streams_redactions", "PII redactions per tenant/task and rule",
                                   ["tenant_task", "rule"], registry=self.registry)
        self._lag = Gauge("adaptloop_streams_consumer_lag", "Records behind the partition's end",
                          ["topic", "partition"], registry=self.registry)
        self._state = Gauge("adaptloop_streams_state_entries", "Entries per table (this worker's store)",
                            ["table"], registry=self.registry)
        self.state: dict[str, dict[str, int]] = {"entries": {}, "evicted": {}}
        self.stages: dict[str, dict[str, Any]] = defaultdict(_entry)
        self.tenants: dict[str, dict[str, Any]] = defaultdict(lambda: _entry() | {"redactions": defaultdict(int)})
        self.lag: dict[str, int] = {}

    def record(self, stage: str, result: str, *, tenant_task: str = UNKNOWN, reason: str = "") -> None:
        code = reason_code(reason) if reason else ""
        self._records.labels(stage, tenant_task, result, code).inc()
        buckets = [self.stages[stage]]
        if result != ADMITTED or stage == CURATED_STAGE:  # a tenant's "admitted": examples that reached the curated topic
            buckets.append(self.tenants[tenant_task])
        for bucket in buckets:
            if result in (REJECTED, DEAD_LETTERED):
                bucket[result][code] += 1
            else:
                bucket[result] += 1

    def redactions(self, tenant_task: str, counts: dict[str, int]) -> None:
        for rule, n in counts.items():
            self._redactions.labels(tenant_task, rule).inc(n)
            self.tenants[tenant_task]["redactions"][rule] += n

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self._lag.labels(topic, str(partition)).set(lag)
        self.lag[f"{topic}/{partition}"] = lag

    def set_state(self, entries: dict[str, int], evicted: dict[str, int]) -> None:
        for table, n in entries.items():
            self._state.labels(table).set(n)
        self.state = {"entries": dict(entries), "evicted": dict(evicted)}

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return {k: plain(v) for k, v in value.items()} if isinstance(value, dict) else value
        return {"stages": plain(dict(self.stages)), "tenants": plain(dict(self.tenants)), "consumer_lag": dict(self.lag),
                "state": self.state}
