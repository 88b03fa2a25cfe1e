"""`adaptloop status`'s pure parts: processes, counts by stage, lag, routing, and the rendering."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from rich.console import Console

from adaptloop.ops.status import (dead_letter_counts, erasure_counts, group_lag, partition_ends, pid_alive, processes,
                                  release_rows, routing_rows, stage_counts, topic_rows, traffic_shares, trainer_queue)
from adaptloop.ops.status_view import render


@dataclass
class Msg:
    """What status reads of a consumed message: its partition and offset."""

    p: int
    o: int

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o


def test_processes_from_the_state_file(tmp_path):
    assert processes(tmp_path / "stack.json") == []
    (tmp_path / "stack.json").write_text(json.dumps({"broker": os.getpid(), "gateway": 2 ** 22 + 7}))
    rows = processes(tmp_path / "stack.json")
    assert rows == [{"name": "broker", "pid": os.getpid(), "alive": True},
                    {"name": "gateway", "pid": 2 ** 22 + 7, "alive": pid_alive(2 ** 22 + 7)}]
    assert rows[1]["alive"] is False
    (tmp_path / "stack.json").write_text("{not json")
    assert "unreadable" in processes(tmp_path / "stack.json")[0]["name"]


def test_topic_counts_and_group_lag_from_counted_ends():
    raw = {"a": [Msg(0, 0), Msg(0, 1), Msg(1, 0), Msg(1, 1), Msg(1, 2)], "b": [], "gone": []}
    rows = topic_rows(raw, {"a": [0, 1], "b": [0]})
    assert rows == [{"topic": "a", "exists": True, "messages": 5, "partitions": {"0": 2, "1": 3}},
                    {"topic": "b", "exists": True, "messages": 0, "partitions": {"0": 0}},
                    {"topic": "gone", "exists": False, "messages": 0, "partitions": {}}]
    ends = {t: partition_ends(m) for t, m in raw.items()}
    assert ends["a"] == {0: 2, 1: 3}
    lag = group_lag({"trainer": {("a", 0): 2, ("a", 1): 1}, "new": {("a", 0): -1001}}, ends)
    assert lag == [{"group": "new", "topic": "a", "lag": 5, "committed": {"0": -1001, "1": -1}},
                   {"group": "trainer", "topic": "a", "lag": 2, "committed": {"0": 2, "1": 1}}]


def test_stage_counts_per_tenant_and_task():
    interactions = [{"interaction_id": f"i{n}", "tenant": "acme", "task": "order-extract"} for n in range(4)] + \
                   [{"interaction_id": "g1", "tenant": "globex", "task": "triage"}]
    outcomes = [{"interaction_id": "i0", "tenant": "acme"}, {"interaction_id": "i1", "tenant": "acme"},
                {"interaction_id": "late", "tenant": "acme"}]
    curated = [
        {"example_id": "i0", "tenant": "acme", "task": "order-extract", "admitted": False, "split": "TRAIN",
         "reject_reason": "outcome is not a success and carries no correction", "reject_code": "NOT_A_SUCCESS"},
        # A re-emission of i0 supersedes its first record.
        {"example_id": "i0", "tenant": "acme", "task": "order-extract", "admitted": True, "split": "TRAIN"},
        {"example_id": "i1", "tenant": "acme", "task": "order-extract", "admitted": True, "split": "HOLDOUT"},
        {"example_id": "i2", "tenant": "acme", "task": "order-extract", "admitted": False, "split": "TRAIN",
         "reject_reason": "near duplicate of i0", "reject_code": "NEAR_DUPLICATE"},
    ]
    requests = [{"request_id": "r", "tenant": "acme", "task": "order-extract"}] * 2
    releases = [{"version": "v1", "tenant": "acme", "task": "order-extract", "state": "RELEASED"},
                {"version": "v1", "tenant": "acme", "task": "order-extract", "state": "PROMOTED"},
                {"version": "v2", "tenant": "acme", "task": "order-extract", "state": "REJECTED"}]
    stages = stage_counts({"interactions": interactions, "outcomes": outcomes, "curated": curated,
                           "training_requests": requests, "releases": releases})
    assert list(stages) == ["acme/?", "acme/order-extract", "globex/triage"]
    acme = stages["acme/order-extract"]
    assert (acme["interactions"], acme["outcomes"], acme["training_requests"]) == (4, 2, 1)
    assert (acme["curated_admitted_train"], acme["curated_admitted_holdout"]) == (1, 1)
    assert acme["curated_rejected"] == {"NEAR_DUPLICATE": 1}
    assert acme["releases"] == {"PROMOTED": 1, "REJECTED": 1}
    assert stages["acme/?"]["outcomes"] == 1 and stages["globex/triage"]["interactions"] == 1


def test_routing_release_rows_dead_letters_and_render():
    models = {"ok": True, "url": "u", "body": {"object": "list", "data": [
        {"id": "smollm2", "object": "model", "adapter": None},
        {"id": "acme/order-extract", "object": "model", "adapter": "v1", "canary": {"version": "v2", "share": 0.2}}]}}
    routes = routing_rows(models)
    assert routes == [{"model": "smollm2", "routes_to": "base", "extra": {}},
                      {"model": "acme/order-extract", "routes_to": "v1",
                       "extra": {"canary": {"version": "v2", "share": 0.2}}}]
    assert routing_rows({"ok": False, "error": "refused"}) == []
    evaluation = {"candidate_score": 0.9, "incumbent": "base", "incumbent_score": 0.1}
    rows = release_rows([{"version": "v1", "tenant": "acme", "task": "t", "state": "RELEASED", "reason": "gate",
                          "evaluation": evaluation},
                         {"version": "v1", "tenant": "acme", "task": "t", "state": "RETIRED", "reason": "erased",
                          "decided_by": "erasure", "evaluation": evaluation}])
    assert [(r["version"], r["state"], r["decided_by"]) for r in rows] == [("v1", "RETIRED", "erasure")]
    dead = [{"source_topic": "agent.interactions", "stage": "decode", "error_type": "DeserializationError"}] * 3
    assert dead_letter_counts(dead) == {"agent.interactions decode DeserializationError": 3}
    assert erasure_counts([{"erasure_id": "e", "tenant": "acme", "scope": "SESSION"}] * 2) == {"acme SESSION": 1}

    stats = {"ok": True, "body": {"aliases": {"acme/order-extract": {
        "v1": {"requests": 70, "errors": 0, "p95_ms": 80.0}, "v2": {"requests": 30, "errors": 1, "p95_ms": 90.0}}}}}
    traffic = traffic_shares(stats)
    assert traffic == {"acme/order-extract": {"v1": {"requests": 70, "errors": 0, "share": 0.7, "p95_ms": 80.0},
                                              "v2": {"requests": 30, "errors": 1, "share": 0.3, "p95_ms": 90.0}}}
    assert traffic_shares({"ok": False, "error": "404"}) == {}

    snapshot = {"at": 0, "bootstrap": "127.0.0.1:1", "collect_seconds": 0.1,
                "processes": [{"name": "broker", "pid": 1, "alive": True}],
                "topics": topic_rows({"agent.interactions": [Msg(0, 0)]}, {"agent.interactions": [0]}),
                "lag": [{"group": "g", "topic": "agent.interactions", "lag": 1, "committed": {"0": -1}}],
                "stages": {"acme/t": {"interactions": 1, "outcomes": 0, "curated_admitted_train": 0,
                                      "curated_admitted_holdout": 0, "curated_rejected": {}, "training_requests": 0,
                                      "releases": {"RETIRED": 1}}},
                "dead_letters": dead_letter_counts(dead), "erasures": {}, "releases": rows,
                "gateway": {"ok": True, "url": "u", "error": None, "routes": routes, "traffic": traffic},
                "sidecar": {"ok": False, "error": "ConnectError: refused"},
                "streams_metrics": {"ok": True, "body": {"curated": 3}}, "problems": ["consumer groups: x"],
                "undecodable": {"agent.interactions": {"count": 2, "first": "not avro"}},
                "trainer_queue": [{"tenant": "globex", "task": "t", "request_id": "abcdef123", "waited_s": 42.0}]}
    console = Console(record=True, width=200)
    console.print(render(snapshot))
    text = console.export_text()
    for expected in ("broker", "alive", "agent.interactions", "g: 1", "acme/t", "RETIRED:1", "v1", "erasure",
                     "acme/order-extract", '"share": 0.2', "sidecar: not answering", 'curation metrics: {"curated": 3}',
                     "problem: consumer groups: x", "undecodable records on agent.interactions: 2", "decode DeserializationError x3", "v1:70% (70) v2:30% (30)",
                     "globex/t abcdef12 waited 42s"):
        assert expected in text, expected


def test_the_trainer_queue_is_what_no_release_answers_in_the_order_the_trainer_serves_it():
    requests = [{"request_id": f"r{n}", "tenant": tenant, "task": "t", "created_at": 1000 * n}
                for n, tenant in enumerate(["acme", "acme", "acme", "globex"])]
    releases = [{"lineage": {"request_id": "r0"}}]
    queue = trainer_queue(requests + requests[1:2], releases, now_ms=10_000)  # a request read twice counts once
    assert [(q["request_id"], q["waited_s"]) for q in queue] == [("r1", 9.0), ("r3", 7.0), ("r2", 8.0)]
