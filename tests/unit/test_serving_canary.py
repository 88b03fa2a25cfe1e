"""The canary decision, the traffic split and the records a decision writes: pure functions."""

from __future__ import annotations

import json
import math

import pytest

from adaptloop.errors import ServingError
from adaptloop.serving.canary import Outcomes, canary_and_incumbent, decisions_for
from adaptloop.serving.canary_decision import RequestStats, Tally, Thresholds, decide, msprt_log_lambda
from adaptloop.serving.routing import Router, take_canary
from adaptloop.serving.registry import Release
from adaptloop.settings import Replica

T = Thresholds(alpha=0.05, tau=0.3, min_samples=10, max_samples=200, max_error_rate=0.1, min_requests=10,
               max_latency_ratio=1.5, latency_slack_ms=20)
QUIET = RequestStats()


def release(version: str, state: str, created_at: int, tenant: str = "acme", task: str = "extract",
            canary_share: float | None = None) -> Release:
    record = {"version": version, "tenant": tenant, "task": task, "state": state, "reason": "r", "base_model": "b",
              "artifact_uri": "/a", "digest": "sha256:x", "lora_rank": 8, "method": "sft", "created_at": created_at,
              "decided_by": "gate", "evidence_json": "{}", "canary_share": canary_share}
    return Release.from_record(record, offset=created_at)


@pytest.mark.parametrize("canary,incumbent,action", [
    (Tally(12, 12), Tally(0, 28), "promote"),
    (Tally(0, 12), Tally(28, 28), "rollback"),
    (Tally(60, 100), Tally(58, 100), None),      # no real difference: keep watching
    (Tally(9, 9), Tally(0, 9), None),            # clear, but under min_samples
])
def test_sequential_test_promotes_better_rolls_back_worse_waits_otherwise(canary, incumbent, action):
    decision = decide(canary, incumbent, QUIET, QUIET, T)
    assert decision.action == action, decision
    test = decision.evidence["test"]
    assert decision.evidence["canary"]["n"] == canary.n and decision.evidence["incumbent"]["n"] == incumbent.n
    if action:
        assert test["log_lambda"] >= test["log_threshold"] == pytest.approx(math.log(20), abs=1e-3)


def test_evidence_grows_with_samples_at_the_same_rates():
    small = msprt_log_lambda(Tally(8, 10), Tally(5, 10), 0.3)[1]
    large = msprt_log_lambda(Tally(80, 100), Tally(50, 100), 0.3)[1]
    assert large > math.log(20) > small


def test_undecided_after_max_samples_is_rolled_back():
    decision = decide(Tally(120, 200), Tally(118, 200), QUIET, QUIET, T)
    assert decision.action == "rollback" and "undecided" in decision.reason


def test_errors_and_latency_roll_back_before_any_outcome():
    errors = decide(Tally(), Tally(), RequestStats(20, 3, 100.0), RequestStats(20, 0, 100.0), T)
    assert errors.action == "rollback" and "error rate" in errors.reason
    slow = decide(Tally(), Tally(), RequestStats(20, 0, 400.0), RequestStats(20, 0, 100.0), T)
    assert slow.action == "rollback" and "latency" in slow.reason
    fine = decide(Tally(), Tally(), RequestStats(20, 0, 160.0), RequestStats(20, 0, 100.0), T)
    assert fine.action is None
    few = decide(Tally(), Tally(), RequestStats(5, 5, 900.0), RequestStats(20, 0, 100.0), T)
    assert few.action is None  # too few canary requests to judge


def test_outcomes_count_each_example_once_from_the_canary_start():
    outcomes = Outcomes()
    for i, (served, kind, t) in enumerate([("v2", "SUCCESS", 100), ("v2", "FAILURE", 100), (None, "SUCCESS", 50),
                                           (None, "CORRECTION", 150)]):
        outcomes.add({"example_id": f"e{i}", "tenant": "acme", "task": "extract", "served_by": served,
                      "kind": kind, "event_time": t})
    outcomes.add({"example_id": "e0", "tenant": "acme", "task": "extract", "served_by": "v2", "kind": "SUCCESS",
                  "event_time": 100})  # redelivered
    assert outcomes.tally("acme", "extract", "v2", 0) == Tally(1, 2)
    assert outcomes.tally("acme", "extract", "base", 100) == Tally(0, 1)
    assert outcomes.tally("other", "extract", "v2", 0) == Tally(0, 0)


def test_canary_is_the_newest_released_after_the_incumbent():
    releases = {r.version: r for r in [release("v1", "PROMOTED", 10), release("v0", "RELEASED", 5),
                                        release("v2", "RELEASED", 20), release("x", "RELEASED", 30, task="other")]}
    canary, incumbent = canary_and_incumbent(releases, "acme", "extract")
    assert (canary.version, incumbent.version) == ("v2", "v1")
    assert canary_and_incumbent({"v0": releases["v0"]}, "acme", "extract")[0].version == "v0"


def test_an_undecided_canary_keeps_the_rest_of_the_traffic_when_a_newer_one_comes():
    """The gate compared v3 with v2, which served the alias until v3 came: the rest stays on v2, not on v1."""
    releases = {r.version: r for r in [release("v1", "PROMOTED", 10), release("v2", "RELEASED", 20),
                                        release("v3", "RELEASED", 30), release("v0", "RELEASED", 5)]}
    canary, incumbent = canary_and_incumbent(releases, "acme", "extract")
    assert (canary.version, incumbent.version) == ("v3", "v2")
    without_promotion = {v: r for v, r in releases.items() if v != "v1"}
    assert [r.version for r in canary_and_incumbent(without_promotion, "acme", "extract")] == ["v3", "v2"]
    rolled_back = {v: r for v, r in releases.items() if v != "v3"}  # v2 is the canary again, against v1
    assert [r.version for r in canary_and_incumbent(rolled_back, "acme", "extract")] == ["v2", "v1"]
    only = {"v3": releases["v3"]}
    assert canary_and_incumbent(only, "acme", "extract") == (releases["v3"], None)


def test_promotion_retires_the_other_live_versions_rollback_touches_only_the_canary():
    releases = {r.version: r for r in [release("v1", "PROMOTED", 10), release("v0", "RETIRED", 5),
                                        release("v2", "RELEASED", 20), release("y", "PROMOTED", 1, tenant="other")]}
    promoted = decisions_for(releases, "v2", "promote", reason="better", decided_by="canary", evidence={"n": 3})
    assert [(r["version"], r["state"], r["decided_by"]) for r in promoted] == [
        ("v2", "PROMOTED", "canary"), ("v1", "RETIRED", "canary")]
    assert json.loads(promoted[0]["evidence_json"]) == {"n": 3} and promoted[0]["digest"] == "sha256:x"
    rolled = decisions_for(releases, "v2", "rollback", reason="worse", decided_by="manual", evidence={})
    assert [(r["version"], r["state"], r["decided_by"]) for r in rolled] == [("v2", "ROLLED_BACK", "manual")]
    with pytest.raises(ServingError):
        decisions_for(releases, "nope", "promote", reason="", decided_by="manual", evidence={})


def test_canary_stride_gives_the_exact_share():
    for share in (0.0, 0.1, 0.25, 0.3, 1.0):
        assert sum(take_canary(i, share) for i in range(100)) == round(100 * share)


class Registry:
    """The part of ReleaseReader the router reads (a plain dict; routing is pure)."""

    def __init__(self, releases: list[Release]) -> None:
        self._releases = {r.version: r for r in releases}

    def releases(self) -> dict[str, Release]:
        return dict(self._releases)


def test_router_splits_by_share_keeps_tenants_apart_and_uses_replicas_that_have_the_version():
    replicas = [Replica(vllm_url="http://a", sidecar_url="http://a-s"), Replica(vllm_url="http://b", sidecar_url="http://b-s")]
    router = Router(Registry([release("v1", "PROMOTED", 10), release("v2", "RELEASED", 20)]), "base", replicas, 0.25,
                    frozenset({"extract", "chat"}))
    router.replicas[0].loaded, router.replicas[0].healthy = frozenset({"v1", "v2"}), True
    router.replicas[1].loaded, router.replicas[1].healthy = frozenset({"v1"}), True
    routes = [router.route("acme/extract", "acme", {}) for _ in range(40)]
    canary = [r for r in routes if r.role == "canary"]
    assert len(canary) == 10 and all(r.version == "v2" and r.replica.vllm_url == "http://a" for r in canary)
    assert all(r.fallback == "v1" for r in canary)
    incumbent = [r for r in routes if r.role == "incumbent"]
    assert {r.version for r in incumbent} == {"v1"} and {r.replica.vllm_url for r in incumbent} == {"http://a", "http://b"}
    with pytest.raises(LookupError):
        router.route("acme/extract", "globex", {})
    base = router.route("base", "globex", {"x-adaptloop-task": "chat"})
    assert (base.tenant, base.task, base.version) == ("globex", "chat", None)
    # Every task of the catalogue is an alias of every tenant (the base answers it until a release does);
    # a task outside the catalogue is no alias, and no task header either.
    assert [m["id"] for m in router.models("globex")] == ["base", "globex/chat", "globex/extract"]
    assert [(m["id"], m["adapter"]) for m in router.models("acme")] == [
        ("base", None), ("acme/chat", None), ("acme/extract", "v1")]
    with pytest.raises(LookupError):
        router.route("acme/other", "acme", {})
    with pytest.raises(LookupError):
        router.route("base", "acme", {"x-adaptloop-task": "x" * 10_000})
    # A replica whose sidecar stops answering gets no calls while another has the version; the
    # canary, loaded only there, still goes there (its last known set) rather than nowhere.
    router.replicas[0].healthy = False
    routes = [router.route("acme/extract", "acme", {}) for _ in range(8)]
    assert {r.replica.vllm_url for r in routes if r.role == "incumbent"} == {"http://b"}
    assert {r.replica.vllm_url for r in routes if r.role == "canary"} == {"http://a"}


def test_router_gives_a_release_its_own_share_never_more_than_the_gateways():
    """An undecided gate's release carries a small share of its own; the gateway's setting is the most any canary gets."""
    def canary_calls(own: float | None, gateway_share: float, calls: int = 400) -> int:
        router = Router(Registry([release("v1", "PROMOTED", 10), release("v2", "RELEASED", 20, canary_share=own)]),
                        "base", [Replica(vllm_url="http://a", sidecar_url="http://a-s")], gateway_share,
                        frozenset({"extract"}))
        router.replicas[0].loaded, router.replicas[0].healthy = frozenset({"v1", "v2"}), True
        routes = [router.route("acme/extract", "acme", {}) for _ in range(calls)]
        assert {r.version for r in routes if r.role == "canary"} <= {"v2"}
        return sum(r.role == "canary" for r in routes)

    assert Release.from_record({**release("v", "RELEASED", 1).record, "canary_share": 0.01}, 1).canary_share == 0.01
    assert canary_calls(None, 0.25) == 100  # no share of its own: the gateway's
    assert canary_calls(0.025, 0.25) == 10  # its own, smaller one
    assert canary_calls(0.01, 1.0) == 4  # a gateway that gives canaries everything gives an undecided one 1%
    assert canary_calls(0.5, 0.1) == 40  # never more than the gateway's
    assert canary_calls(0.05, 0.0) == 0  # canaries off at this gateway: off for every release


def test_gateway_stats_count_errors_and_only_calls_since_the_canary_started():
    from adaptloop.serving.call_stats import Stats
    from adaptloop.serving.gateway import bearer
    from adaptloop.serving.routing import Route

    stats = Stats(window=100)
    v2 = Route("acme", "extract", "v2", "v2", "acme/extract")
    base = Route("acme", "extract", "base", None, None)
    for latency in (10.0, 20.0, None, 30.0):
        stats.add(v2, latency)
    stats.add(base, 5.0)
    summary = stats.as_dict("acme/extract")["aliases"]["acme/extract"]
    assert summary["v2"] == {"requests": 4, "errors": 1, "p95_ms": 30.0}
    assert summary["base"]["requests"] == 1
    assert stats.as_dict("acme/extract", since_ms=2**62)["aliases"]["acme/extract"]["v2"]["requests"] == 0
    assert stats.as_dict("other/alias")["aliases"] == {}
    assert bearer({"authorization": "Bearer alk_1_x"}) == "alk_1_x"
    assert bearer({"authorization": "alk_1_x"}) is None and bearer({}) is None
