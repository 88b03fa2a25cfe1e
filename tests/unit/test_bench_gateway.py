"""The gateway benchmark reads the gateway's server-timing header and brackets a p99 difference."""

from __future__ import annotations

from adaptloop.serving.bench.gateway import server_timing


def test_server_timing_reads_every_metric_with_a_duration():
    assert server_timing("upstream;dur=76.125, gateway;dur=77.5") == {"upstream": 76.125, "gateway": 77.5}
    assert server_timing("cache;desc=hit, upstream;dur=3") == {"upstream": 3.0}
    assert server_timing("") == {}


def test_the_p99_difference_interval_brackets_a_known_shift_and_notices_none():
    import random

    from adaptloop.serving.bench.gateway import difference_interval

    rng = random.Random(1)
    direct = [70 + rng.expovariate(0.2) for _ in range(600)]
    low, high = difference_interval([v + 1.0 for v in direct], direct, 0.99)
    assert low <= 1.0 <= high
    low, high = difference_interval([v + 30.0 for v in direct], direct, 0.99)
    assert low > 0  # a shift far beyond the tails' noise is told apart from none

