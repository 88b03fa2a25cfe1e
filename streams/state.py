"""Curation's state stays bounded, and erased content leaves it.

Every entry of the per-record tables carries ``at`` (wall clock, ms, of its last write) and ``p`` (the
partition whose changelog holds it). The tick agent sweeps each partition it owns every ``state_sweep_s``
(``Sweeper.sweep``), in that partition's event context, so a deletion goes to the right changelog partition:

===============  ==========================================================  ==========================================
table            entry                                                       leaves
===============  ==========================================================  ==========================================
joins            an interaction waiting for its outcome; outcomes waiting    one outcome horizon after its last write;
                 for their interaction; the marker of a curated one          outcomes whose interaction never came are
                                                                             counted (rejected, ``orphan_outcome``)
episodes         an episode's newest turn and outcomes, or its marker        the same
window_counted   an example id its window counted (a repeat is an            the same
                 at-least-once redelivery, seconds or minutes later)
dedupe_seen      a rejected example's dedupe decision (a replay decides      the same
                 the same)
dedupe_seen      an admitted example's hash and MinHash signature            once its (tenant, task) index holds
                                                                             ``dedupe_max_per_task`` newer ones
windows          one per (tenant, task)                                      never: bounded by the catalogue
===============  ==========================================================  ==========================================

So a worker's memory is bounded by the traffic of one outcome horizon plus, per (tenant, task),
``dedupe_max_per_task`` signatures (64 ints each), however long it runs: ``python -m
adaptloop.streams.bench.soak`` measures it. An entry written by a version before this policy (no ``at``)
is left alone.

Erasure: when the erasure feed has grown, each partition's pending join and episode entries are checked
on its next tick; one that holds a matching record becomes the ERASED marker, so its (redacted) content
leaves the table at once. The changelog topic keeps the older records of that key until its retention or
a compaction removes them (the raw input topics' retention, ``ADAPTLOOP_TOPICS_RAW_RETENTION_MS``,
bounds what the broker keeps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from adaptloop.erasure import ErasureSet

log = logging.getLogger(__name__)

ERASED_MARK = "ERASED"


def stamped(entry: Mapping[str, Any], *, now: int, partition: int) -> dict[str, Any]:
    """``entry`` with when it was written and where its changelog record goes."""
    return dict(entry) | {"at": now, "p": partition}


def expired(entry: Any, *, now: int, ttl_ms: int) -> bool:
    return isinstance(entry, Mapping) and entry.get("at") is not None and now - int(entry["at"]) > ttl_ms


def holds_erased(entry: Mapping[str, Any], erasures: ErasureSet) -> bool:
    """Whether a pending join or episode entry holds a record that ``erasures`` match (sides as curation stores
    them: the redacted record, and the subject keys of what was redacted from it)."""
    sides = [entry.get("interaction"), entry.get("last"), *(entry.get("outcomes") or [])]
    return any(erasures.match(dict(side["record"]) | {"subjects": side.get("subjects") or []}) is not None
               for side in sides if side)


@dataclass(frozen=True)
class Swept:
    """A table the sweeper keeps bounded. ``on_evict(key, entry)`` sees each entry deleted for age (to count
    what never completed); ``lasting(entry)`` exempts entries bounded otherwise; ``holds_records``: its
    unfinished entries hold (redacted) records, which an erasure removes."""

    table: Any
    on_evict: Callable[[str, Mapping[str, Any]], None] | None = None
    lasting: Callable[[Mapping[str, Any]], bool] | None = None
    holds_records: bool = False


class Sweeper:
    """Deletes expired entries of one partition's tables and erases the pending ones an erasure matches."""

    def __init__(self, tables: Mapping[str, Swept], *, ttl_ms: int, every_ms: int) -> None:
        self.tables = tables
        self.ttl_ms = ttl_ms
        self.every_ms = every_ms
        self._swept_at: dict[int, int] = {}
        self._erasures_seen: dict[int, int] = {}
        self.evicted: dict[str, int] = {name: 0 for name in tables}
        self.erased = 0

    def due(self, partition: int, now: int) -> bool:
        return now - self._swept_at.get(partition, 0) >= self.every_ms

    def sweep(self, partition: int, now: int, *, skip: Callable[[str], bool] = lambda key: False) -> int:
        """Delete this partition's expired entries (``skip``: keys being written or sent right now); the number."""
        self._swept_at[partition] = now
        deleted = 0
        for name, swept in self.tables.items():
            for key, entry in list(swept.table.items()):
                if (skip(key) or not expired(entry, now=now, ttl_ms=self.ttl_ms) or entry.get("p") != partition
                        or (swept.lasting is not None and swept.lasting(entry))):
                    continue
                if swept.on_evict is not None:
                    swept.on_evict(key, entry)
                del swept.table[key]
                deleted += 1
                self.evicted[name] += 1
        if deleted:
            log.info("partition %d: %d table entries past the outcome horizon deleted", partition, deleted)
        return deleted

    def erase(self, partition: int, erasures: ErasureSet | None, now: int, *,
              skip: Callable[[str], bool] = lambda key: False) -> int:
        """After the feed grew: replace this partition's pending entries that hold an erased record by the marker."""
        if erasures is None or self._erasures_seen.get(partition) == len(erasures):
            return 0
        self._erasures_seen[partition] = len(erasures)
        erased = 0
        for swept in self.tables.values():
            if not swept.holds_records:
                continue
            table = swept.table
            for key, entry in list(table.items()):
                if (isinstance(entry, Mapping) and entry.get("p") == partition and not entry.get("emitted")
                        and not skip(key) and holds_erased(entry, erasures)):
                    table[key] = stamped({"emitted": ERASED_MARK}, now=now, partition=partition)
                    erased += 1
        if erased:
            log.info("partition %d: %d pending entries held erased records: erased", partition, erased)
        self.erased += erased
        return erased

    def sizes(self) -> dict[str, int]:
        return {name: len(swept.table) for name, swept in self.tables.items()}
