"""The trainer's fair queue (``adaptloop.trainers.queue``): tenants alternate, commits never pass a request not done."""

from __future__ import annotations

from adaptloop.trainers.queue import FairQueue


def request(tenant: str, n: int) -> dict:
    return {"tenant": tenant, "task": "t", "request_id": f"{tenant}-{n}", "created_at": 1000 * n}


def test_a_tenant_with_a_backlog_does_not_hold_up_another():
    queue = FairQueue()
    for offset, (tenant, n) in enumerate([("acme", 1), ("acme", 2), ("acme", 3), ("globex", 4), ("acme", 5)]):
        queue.add(offset, request(tenant, n))
    assert [r["request_id"] for r in queue.waiting(now_ms=10_000)][:2] == ["acme-1", "globex-4"]
    served = []
    while (item := queue.next()) is not None:
        served.append(item[1]["request_id"])
        if item[1]["request_id"] == "acme-2":  # a newcomer arrives meanwhile: it is next, not last
            queue.add(5, request("initech", 6))
    assert served == ["acme-1", "globex-4", "acme-2", "initech-6", "acme-3", "acme-5"]


def test_the_commit_position_is_the_oldest_request_not_done():
    queue = FairQueue()
    for offset, tenant in enumerate(["acme", "acme", "globex"]):
        queue.add(offset, request(tenant, offset))
    first, second = queue.next(), queue.next()
    assert (first[0], second[0]) == (0, 2)  # globex's request (offset 2) goes before acme's second
    assert queue.done(2) == 0                   # offset 0 is in work, 1 waits: nothing new to commit past them
    assert queue.done(0) == 1
    assert queue.done(0) is None                # unchanged
    queue.add(1, request("acme", 1))            # polled again after a rebalance: still one request
    assert len(queue) == 1 and queue.next()[0] == 1 and queue.done(1) == 3
    assert queue.waiting(now_ms=5000) == []


def test_waiting_shows_how_long_each_request_has_waited_in_serving_order():
    queue = FairQueue()
    queue.add(7, request("acme", 2))
    queue.add(8, request("globex", 3))
    queue.next()
    queue.add(9, request("acme", 4))
    assert queue.waiting(now_ms=6000) == [
        {"tenant": "globex", "task": "t", "request_id": "globex-3", "waited_s": 3.0},
        {"tenant": "acme", "task": "t", "request_id": "acme-4", "waited_s": 2.0}]


def test_two_at_once_never_take_two_requests_of_one_alias():
    """With two jobs in work, the second is another alias's request: the next of an alias waits for its gate."""
    queue = FairQueue()
    for offset, (tenant, n) in enumerate([("acme", 1), ("acme", 2), ("globex", 3)]):
        queue.add(offset, request(tenant, n))
    first = queue.next()
    busy = {("acme", "t")}
    second = queue.next(busy)
    assert (first[1]["request_id"], second[1]["request_id"]) == ("acme-1", "globex-3")
    assert queue.next(busy | {("globex", "t")}) is None and len(queue) == 1
    assert queue.done(0) == 1 and queue.next({("globex", "t")})[1]["request_id"] == "acme-2"
