"""Serving: vLLM with a registry sidecar (``adaptloop serve``), the OpenAI-compatible gateway
(``adaptloop gateway``, API keys in ``keys``) and the canary controller (``adaptloop canary``,
manual ``adaptloop release``). The processes share only the registry reader below; each is built
in its own ``main()`` (``server.main``, ``gateway.main``, ``canary.main``; the gateway's app by
``gateway.create_app``). Benchmarks: ``bench`` (vLLM itself), ``bench_gateway`` (the gateway's
overhead, publish -> first answer).
"""

from adaptloop.schemas.contract import SERVABLE, WITHDRAWN
from adaptloop.serving.registry import Release, ReleaseReader, newest_servable

__all__ = ["SERVABLE", "WITHDRAWN", "Release", "ReleaseReader", "newest_servable"]
