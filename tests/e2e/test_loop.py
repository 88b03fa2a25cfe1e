"""The whole loop on real components, nothing by hand: gateway traffic -> curation -> training
request -> Ray job -> gated release -> vLLM hot-load -> the gateway serves it, and it is better."""

from __future__ import annotations

import pytest

from adaptloop.demo import DemoConfig, run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def test_one_cycle_makes_the_served_agent_better(tmp_path):
    result = run_demo(DemoConfig(home=tmp_path / "stack", free_ports=True))
    print(f"\nE2E: validator success before {result.before:.0%} -> after {result.after:.0%} "
          f"with {result.adapter}; gate {result.release['evaluation']}; counts {result.counts}; "
          f"stages {result.timings_s}")
    assert result.release["state"] == "RELEASED"
    assert result.release["digest"].startswith("sha256:")
    assert result.release["lineage"]["train_example_ids"]
    assert result.counts["training_requests"] >= 1 and result.counts["curated"] >= result.release["evaluation"]["holdout_count"]
    assert result.after > result.before + 0.3, (result.before, result.after)
