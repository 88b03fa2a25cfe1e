"""Serving: vLLM with a registry sidecar (``adaptloop serve``) and the OpenAI-compatible gateway
(``adaptloop gateway``). The two processes share only the registry reader below; each is built
in its own ``main()`` (``server.main``, ``gateway.main``; the gateway's app by ``gateway.create_app``).
"""

from adaptloop.serving.registry import SERVABLE, WITHDRAWN, Release, ReleaseReader, newest_servable

__all__ = ["SERVABLE", "WITHDRAWN", "Release", "ReleaseReader", "newest_servable"]
