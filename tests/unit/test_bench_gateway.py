"""The gateway benchmark reads the gateway's server-timing header."""

from __future__ import annotations

from adaptloop.serving.bench_gateway import server_timing


def test_server_timing_reads_every_metric_with_a_duration():
    assert server_timing("upstream;dur=76.125, gateway;dur=77.5") == {"upstream": 76.125, "gateway": 77.5}
    assert server_timing("cache;desc=hit, upstream;dur=3") == {"upstream": 3.0}
    assert server_timing("") == {}
