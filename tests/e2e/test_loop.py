"""The whole loop on real components, nothing by hand, two tenants, two tasks:
gateway traffic -> curation -> training request -> Ray job -> gated release -> vLLM hot-load ->
the gateway serves it, it is better, and the report is written from the topics.

A shorter configuration of the same code path as ``adaptloop demo``: one cycle of 16 TRAIN examples
per (tenant, task), trained for two passes, instead of three cycles; fewer final cases. Later cycles
on a growing dataset, and a gate that rejects a candidate, are the same code again: `adaptloop demo`
(see deploy/README.md) runs the first, tests/integration/test_trainer.py the second."""

from __future__ import annotations

import pytest

from adaptloop.ops.demo import DemoConfig, run_demo, summary

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

PAIRS = (("acme", "order-extract"), ("globex", "ticket-triage"))


def test_two_tenants_two_tasks_get_better_through_the_loop(tmp_path):
    # Two passes over the 16 examples: after one (4 steps) the served adapter's success on fresh
    # order-extract cases spread from 31% to 94% between runs, the training draw deciding.
    # The tool-using task has its own end-to-end test (test_tool_task.py).
    result = run_demo(DemoConfig(home=tmp_path / "stack", pairs=PAIRS, cycles=1, window_size=16, eval_cases=16,
                                 trainer_epochs=2, free_ports=True, tool_cycles=0))
    print(f"\nE2E: {summary(result, PAIRS)}\ncounts {result.counts}; stages {result.timings_s}")
    for tenant, task in PAIRS:
        series = result.series(tenant, task)
        assert len(series) == 2, series  # base, then the released adapter on fresh cases
        assert series[-1] > series[0] + 0.3, (tenant, task, series)
    served = [r for r in result.releases if r["state"] == "RELEASED"]
    assert {(r["tenant"], r["task"]) for r in served} == set(PAIRS)
    for release in served:
        assert release["digest"].startswith("sha256:") and release["lineage"]["train_example_ids"]
    assert result.counts["training_requests"] >= len(PAIRS)
    # Every served release has a loop latency with its slowest stage named.
    assert {l["version"] for l in result.loop_latency} == {r["version"] for r in served}
    assert all(l["slowest"] and l["total_s"] > 0 for l in result.loop_latency)
    # The report: one page per (tenant, task) with its three plots, read back from the real topics.
    report = tmp_path / "stack" / "report"
    for tenant, task in PAIRS:
        page = (report / f"{tenant}--{task}.html").read_text()
        assert "RELEASED" in page and "Data funnel" in page
        for png in ("success", "loss", "funnel"):
            assert (report / f"{tenant}--{task}-{png}.png").stat().st_size > 5000
