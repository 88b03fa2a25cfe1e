"""The gateway's view of its vLLM replicas: what each one's sidecar last reported, kept current by a watch.

The gateway watches each sidecar's report with a long poll (``serving.server``), so it hears of a load,
an unload or a vLLM restart as it happens; a replica whose sidecar stops answering counts as unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from adaptloop.settings import GatewaySettings

log = logging.getLogger("adaptloop.gateway")

#: Beyond a watch's own wait, how long a sidecar may take to answer before it counts as down.
SIDECAR_ANSWER_S = 2.0
#: What a call to a model server or sidecar may fail with (timeouts are asyncio's in aiohttp).
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass
class ReplicaState:
    """One vLLM replica as the gateway sees it: what its sidecar last reported."""

    vllm_url: str
    sidecar_url: str
    loaded: frozenset[str] = frozenset()
    healthy: bool = False


async def watch_sidecar(client: aiohttp.ClientSession, replica: ReplicaState, settings: GatewaySettings,
                        polled: Callable[[ReplicaState], None]) -> None:
    """Keep ``replica``'s loaded set and health current: a long poll on its sidecar's ``/adapters``
    (answered at once when the report changes, 304 after ``sidecar_watch_s`` when it does not)."""
    url = f"{replica.sidecar_url}/adapters?wait={settings.sidecar_watch_s:g}"
    timeout = aiohttp.ClientTimeout(total=settings.sidecar_watch_s + SIDECAR_ANSWER_S)
    tag: str | None = None
    while True:
        try:
            async with client.get(url, headers={"if-none-match": tag} if tag else {},
                                  timeout=timeout) as response:
                if response.status != 304:
                    response.raise_for_status()
                    report = await response.json()
                    tag = response.headers.get("etag")
                    apply_report(replica, report)
                    polled(replica)
            if tag is None:  # a sidecar that cannot be watched (an older one): ask again after a pause
                await asyncio.sleep(settings.sidecar_poll_s)
        except (*UPSTREAM_ERRORS, ValueError, KeyError) as exc:
            # Keep the last known set: vLLM rejects an adapter it lost, and the call falls back.
            if replica.healthy:
                log.warning("sidecar at %s does not answer (%s); no calls there while another answers", url, exc)
            replica.healthy = False
            tag = None
            polled(replica)
            await asyncio.sleep(settings.sidecar_poll_s)


def apply_report(replica: ReplicaState, report: dict[str, Any]) -> None:
    """``replica`` as its sidecar's report says: its loaded set, and healthy while its vLLM is up."""
    replica.loaded = frozenset(report["loaded"])
    vllm_up = bool(report.get("vllm", True))  # False while its sidecar restarts vLLM
    if vllm_up and not replica.healthy:
        log.info("replica %s answers: %d adapters loaded", replica.vllm_url, len(replica.loaded))
    elif replica.healthy and not vllm_up:
        log.warning("replica %s: vLLM is down (its sidecar restarts it)", replica.vllm_url)
    replica.healthy = vllm_up
