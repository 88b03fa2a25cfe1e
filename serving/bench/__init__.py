"""Benchmarks of serving: vLLM start-up and latency (``startup``), the gateway's overhead per call (``gateway``)."""
