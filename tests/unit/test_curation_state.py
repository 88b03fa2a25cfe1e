"""Curation's tables stay bounded and erased records leave them (``adaptloop.streams.state``), on plain mappings;
the worker's own tables under a long run: ``adaptloop.streams.bench.soak`` and tests/integration/test_curation.py."""

from __future__ import annotations

from adaptloop.erasure import ErasureSet, build_erasure
from adaptloop.streams.state import ERASED_MARK, Swept, Sweeper, stamped

HOUR_MS = 3_600_000


def side(tenant: str, session: str) -> dict:
    return {"record": {"tenant": tenant, "interaction_id": f"i-{session}", "session_id": session},
            "ref": {}, "redactions": {}, "subjects": []}


def test_entries_leave_one_horizon_after_their_last_write_in_their_own_partition():
    now = 100 * HOUR_MS
    joins = {"waiting": stamped({"interaction": side("acme", "s1")}, now=now - 2 * HOUR_MS, partition=0),
             "orphan": stamped({"outcomes": [side("acme", "s2")]}, now=now - 2 * HOUR_MS, partition=0),
             "fresh": stamped({"emitted": "SUCCESS"}, now=now - 10, partition=0),
             "other partition": stamped({"emitted": "SUCCESS"}, now=now - 2 * HOUR_MS, partition=1),
             "before the policy": {"emitted": "SUCCESS"}}
    seen = {"kept": stamped({"decision": {"admitted": True}}, now=0, partition=0),
            "rejected": stamped({"decision": {"admitted": False}}, now=0, partition=0)}
    evicted = []
    sweeper = Sweeper({"joins": Swept(joins, on_evict=lambda key, entry: evicted.append(key)),
                       "dedupe_seen": Swept(seen, lasting=lambda entry: entry["decision"]["admitted"])},
                      ttl_ms=HOUR_MS, every_ms=60_000)
    assert sweeper.due(0, now)
    assert sweeper.sweep(0, now, skip=lambda key: key == "orphan") == 2
    assert sorted(joins) == ["before the policy", "fresh", "orphan", "other partition"]
    assert evicted == ["waiting"] and list(seen) == ["kept"]
    assert not sweeper.due(0, now + 1) and sweeper.due(1, now + 1)
    assert sweeper.sweep(0, now + 60_000) == 1 and evicted == ["waiting", "orphan"]
    assert sweeper.evicted == {"joins": 2, "dedupe_seen": 1}
    assert sweeper.sizes() == {"joins": 3, "dedupe_seen": 1}


def test_a_new_erasure_replaces_the_pending_entries_that_hold_its_records_by_the_marker():
    now = HOUR_MS
    joins = {"i-s1": stamped({"interaction": side("acme", "s1")}, now=now, partition=0),
             "i-s2": stamped({"interaction": side("acme", "s2"), "outcomes": [side("acme", "s2")]}, now=now, partition=0),
             "other tenant": stamped({"interaction": side("globex", "s1")}, now=now, partition=0)}
    episodes = {"acme/run-1": stamped({"last": side("acme", "s1"), "outcomes": []}, now=now, partition=0)}
    sweeper = Sweeper({"joins": Swept(joins, holds_records=True), "episodes": Swept(episodes, holds_records=True)},
                      ttl_ms=HOUR_MS, every_ms=60_000)
    erasures = ErasureSet()
    assert sweeper.erase(0, erasures, now) == 0
    erasures.add(build_erasure(tenant="acme", scope="SESSION", key="s1"))
    assert sweeper.erase(1, erasures, now) == 0                # not this partition's entries
    assert sweeper.erase(0, erasures, now) == 2
    assert joins["i-s1"] == {"emitted": ERASED_MARK, "at": now, "p": 0}
    assert episodes["acme/run-1"]["emitted"] == ERASED_MARK and "last" not in episodes["acme/run-1"]
    assert "interaction" in joins["i-s2"] and "interaction" in joins["other tenant"]
    assert sweeper.erase(0, erasures, now) == 0                # checked once per growth of the feed
