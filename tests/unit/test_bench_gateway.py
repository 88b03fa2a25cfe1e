"""The gateway benchmark reads the gateway's server-timing header and toggles the latency settings."""

from __future__ import annotations

import os
import subprocess

import pytest

from adaptloop.processes import CPU_LATENCY_DEVICE, cpu_wake_latency_now, sched_slice_us
from adaptloop.serving.bench_gateway import LatencySettingsAB, server_timing


def test_server_timing_reads_every_metric_with_a_duration():
    assert server_timing("upstream;dur=76.125, gateway;dur=77.5") == {"upstream": 76.125, "gateway": 77.5}
    assert server_timing("cache;desc=hit, upstream;dur=3") == {"upstream": 3.0}
    assert server_timing("") == {}


def test_the_p99_difference_interval_brackets_a_known_shift_and_notices_none():
    import random

    from adaptloop.serving.bench_gateway import difference_interval

    rng = random.Random(1)
    direct = [70 + rng.expovariate(0.2) for _ in range(600)]
    low, high = difference_interval([v + 1.0 for v in direct], direct, 0.99)
    assert low <= 1.0 <= high
    low, high = difference_interval([v + 30.0 for v in direct], direct, 0.99)
    assert low > 0  # a shift far beyond the tails' noise is told apart from none


@pytest.mark.skipif(not os.access(CPU_LATENCY_DEVICE, os.W_OK), reason="needs root: /dev/cpu_dma_latency")
def test_the_ab_toggle_turns_both_latency_settings_on_and_off_from_outside():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        default_slice, default_wake = sched_slice_us(sleeper.pid), cpu_wake_latency_now()
        toggle = LatencySettingsAB(sleeper.pid)
        toggle(11)  # odd iterations: tuned
        assert (sched_slice_us(sleeper.pid), cpu_wake_latency_now()) == (100, 0)
        toggle(12)
        assert (sched_slice_us(sleeper.pid), cpu_wake_latency_now()) == (default_slice, default_wake)
        toggle(13)
        toggle.close()
        assert (sched_slice_us(sleeper.pid), cpu_wake_latency_now()) == (default_slice, default_wake)
        assert set(toggle.cpu_s) == {"plain", "tuned"}
    finally:
        sleeper.kill()
        sleeper.wait(10)
