"""``adaptloop gateway``: the OpenAI-compatible front door that authenticates, routes and records every call.

    adaptloop keys add acme --file keys.json             # prints acme's key once
    ADAPTLOOP_GATEWAY_API_KEYS_FILE=keys.json adaptloop gateway     # on 127.0.0.1:18080
    python - <<'EOF'
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:18080/v1", api_key="alk_...")
    reply = client.chat.completions.create(model="acme/order-extract",
                                           messages=[{"role": "user", "content": "hi"}])
    print(reply.id, reply.choices[0].message.content)     # the id is the interaction id
    EOF

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (both with ``"stream": true``),
``/v1/models``, ``/v1/feedback`` (an outcome for a call: ``serving.feedback``); errors in OpenAI's
shape. A body over ``max_body_bytes`` is a 413; one that is not JSON (NaN, an unpaired surrogate included), nested
too deep, or of a shape no model server takes (``serving.episodes.check_request``: roles, content, tools,
tool_choice, n, token limits, stream), a 400 before anything goes upstream or is recorded. ``/stats``
(requests, upstream errors and p95 latency per alias and served version, read by the canary controller) and
``/health``'s detail (replicas, every loaded adapter) take the deployment's admin key (``admin_key``, else
the 0600 file ``adaptloop up`` writes); ``/health`` without it says only whether the gateway is ready.

Keys: ``Authorization: Bearer <key>``; no key or an unknown one is a 401. A key reaches only its
tenant's aliases (``tenant/task``; another tenant's alias is a 404, as if it did not exist) and the
base model by name, recorded under the key's tenant (task from ``x-adaptloop-task``, default
``default``). Tasks are the catalogue's (``adaptloop.tasks``): an alias or a task header naming
another is refused, and a chat call without a system message gets its task's system prompt (as
training and evaluation give it). See ``serving.keys``.

Routing: an alias goes to its incumbent (newest PROMOTED version loaded on some replica, else the
base model), except for a share of its calls, which go to its canary (the newest RELEASED
version newer than the incumbent, loaded on some replica; the canary controller promotes or rolls
it back): the release's own ``canary_share`` where it carries one (the gate's smaller share for a
candidate it could not decide), never more than the gateway's ``canary_share``. The share is exact per gateway (a deterministic stride, not a coin), so a measured share
is the configured one. Among several replicas, a call goes only to replicas whose sidecar reports
the version loaded, round robin; a replica whose sidecar stops answering gets no calls while a
healthy one exists. The gateway watches each sidecar's report with a long poll (``serving.server``),
so it hears of a load, an unload or a vLLM restart as it happens. If vLLM answers 404 for the routed
version (unloaded since the sidecar last reported, e.g. during a swap) the call is answered by the
incumbent or base instead: swaps never fail a call.

Recording: every completed call becomes an Interaction on the interactions topic, keyed by its id,
naming the version that answered, and no answer leaves before its record is safe: a record that
cannot be kept is a 503 in OpenAI's error shape instead of the answer. ``record_mode`` says what
safe means:

- ``outbox`` (default): the record is written to this gateway's outbox (``serving.outbox``: a local
  append-only log, one ``write``, no fsync) and produced right after the answer went out; the
  broker's acknowledgement frees it later, off the response path. A record the broker refuses
  (down, unreachable) is produced again every ``OUTBOX_RETRY_S`` (``serving.recording``) until
  taken; a gateway killed with records in its outbox leaves them for the next one on the same
  folder, which sends them at start. Lost only with the host's disk, or the last moments before a
  power cut. The outbox is bounded (``outbox_max_mib``): past it, 503s. ``/stats`` shows
  ``outbox_bytes`` (waiting for the broker) and ``outbox_retries``.
- ``ack``: the answer waits for the broker's acknowledgement (one round trip: ``linger.ms=0``).

A caller picks per request with ``x-adaptloop-record: ack|outbox``. Why the outbox is the default:
on a host whose cores the model server also uses, the broker round trip was the larger part of our
own time per call (``serving.bench_gateway``: handler p50 1.5 / p99 3.9-7.7 ms with the ack wait,
0.36 / 1.3-3.1 ms without it), and a record the broker cannot take now should delay the record,
not fail the call. With ``"stream": true`` the chunks are relayed as they come and the record is
written when the stream ends: ``data: [DONE]`` follows only a kept record;
otherwise the stream ends with an error event (the ``openai`` client raises it).

Tools: ``tools``, ``tool_choice`` (none, auto, required, named) and ``parallel_tool_calls`` go to vLLM as
they are (it serves with tool calling on: ``adaptloop.chat``); streamed tool-call deltas are reassembled
for the record, which keeps every message of the request (an assistant's tool calls, a tool's result) and
the episode and turn of the call (``serving.episodes``).

Response headers: ``x-adaptloop-interaction-id``, ``x-adaptloop-episode``, ``x-adaptloop-adapter`` (version or
``base``) and ``x-adaptloop-role`` (``canary``, ``incumbent`` or ``base``); the response's ``id`` is the interaction id,
tagged with its tenant (``serving.feedback.InteractionIds``) so that feedback on it can be verified.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import logging
import hmac
import math
import signal
import sys
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import aiohttp
import uvicorn
import uvloop
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptloop.artifacts import alias as make_alias
from adaptloop.errors import AuthError, ConfigError, DeliveryError, SerializationError
from adaptloop.processes import mark_ready, pin_to_cpus
from adaptloop.sdk import build_interaction, tool_call_record
from adaptloop.serving.canary import canary_and_incumbent
from adaptloop.serving.episodes import (EPISODE_HEADER, BadEpisode, BadRequest, Episode, ToolCallAssembler, check_request,
                                        content_text, episode_of, request_messages, upstream_body)
from adaptloop.serving.feedback import InteractionIds, RequestRefused, outcome_of, parse_json, read_body
from adaptloop.serving.keys import KeyStore
from adaptloop.serving.outbox import OutboxError
from adaptloop.serving.recording import InteractionLog
from adaptloop.serving.registry import Release, ReleaseReader
from adaptloop.settings import GatewaySettings, Replica, admin_key, bearer_header
from adaptloop.tasks import Catalogue, load_catalogue

log = logging.getLogger("adaptloop.gateway")

#: Beyond a watch's own wait, how long a sidecar may take to answer before it counts as down.
SIDECAR_ANSWER_S = 2.0
#: What a call to a model server or sidecar may fail with (timeouts are asyncio's in aiohttp).
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
DEFAULT_TASK = "default"
AGENT_HEADER = "x-adaptloop-agent"
SESSION_HEADER = "x-adaptloop-session"
TASK_HEADER = "x-adaptloop-task"
RECORD_HEADER = "x-adaptloop-record"
RECORD_MODES = ("outbox", "ack")
INTERACTION_HEADER = "x-adaptloop-interaction-id"
ADAPTER_HEADER = "x-adaptloop-adapter"
ROLE_HEADER = "x-adaptloop-role"
#: Calls kept per (alias, version) for /stats.
STATS_WINDOW = 5000


def openai_error(status: int, message: str, type_: str, code: str | None = None, *,
                 headers: Mapping[str, str] | None = None, param: str | None = None) -> JSONResponse:
    """An error in the shape OpenAI's clients parse."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=dict(headers or {}))


@dataclass(frozen=True)
class Route:
    """Where one request goes: the name vLLM serves it under, on which replica, and what to record."""

    tenant: str
    task: str
    served_model: str
    version: str | None  # None: the base model
    adapter_name: str | None  # the alias, when an adapter serves it
    replica: "ReplicaState | None" = None
    role: str = "base"  # canary | incumbent | base
    fallback: str | None = None  # the incumbent's version (None = base) if the routed version is gone


class UnknownModel(LookupError):
    """A ``model`` that is neither ``tenant/task`` of the caller's tenant (a task of the catalogue) nor the base model."""


class UnknownTask(LookupError):
    """An ``x-adaptloop-task`` that names no task of the catalogue."""


@dataclass
class ReplicaState:
    """One vLLM replica as the gateway sees it: what its sidecar last reported."""

    vllm_url: str
    sidecar_url: str
    loaded: frozenset[str] = frozenset()
    healthy: bool = False


def take_canary(count: int, share: float) -> bool:
    """Call number ``count`` (0-based) of an alias goes to the canary: an exact stride, not a coin flip."""
    return math.floor((count + 1) * share) > math.floor(count * share)


class Router:
    """Alias -> a share to the newest RELEASED version, the rest to the incumbent (PROMOTED, else base).

    The share is the release's own ``canary_share`` if it has one, capped by ``canary_share`` (the gateway's
    setting, which is also the share of a release without one; 0 sends no call to any canary).
    """

    def __init__(self, reader: ReleaseReader, base_model: str, replicas: list[Replica], canary_share: float,
                 tasks: frozenset[str]) -> None:
        self.reader = reader
        self.tasks = tasks
        self.base_model = base_model
        self.replicas = [ReplicaState(r.vllm_url.rstrip("/"), r.sidecar_url.rstrip("/")) for r in replicas]
        self.canary_share = canary_share
        self._calls: dict[tuple[str, str], int] = {}
        self._turn = itertools.count()

    @property
    def loaded(self) -> frozenset[str]:
        """Versions loaded on at least one replica."""
        return frozenset().union(*(r.loaded for r in self.replicas))

    @staticmethod
    def parse_alias(model: str) -> tuple[str, str] | None:
        tenant, sep, task = model.partition("/")
        if sep and tenant and task and "/" not in task:
            return tenant, task
        return None

    def replica_for(self, version: str | None) -> ReplicaState | None:
        """Round robin over the healthy replicas that have ``version`` (any replica for the base)."""
        having = [r for r in self.replicas if version is None or version in r.loaded]
        healthy = [r for r in having if r.healthy] or having
        if not healthy:
            return None
        return healthy[next(self._turn) % len(healthy)]

    def live(self, tenant: str, task: str) -> tuple[Release | None, Release | None]:
        """(canary, incumbent) of an alias among the versions loaded somewhere."""
        loaded = self.loaded
        releases = {v: r for v, r in self.reader.releases().items()
                    if (r.tenant, r.task) == (tenant, task) and v in loaded}
        return canary_and_incumbent(releases, tenant, task)

    def share_of(self, canary: Release) -> float:
        """The share of its alias's calls ``canary`` gets."""
        own = canary.canary_share
        return self.canary_share if own is None else max(0.0, min(own, self.canary_share))

    def route(self, model: str, tenant: str, headers: Mapping[str, str]) -> Route:
        if model == self.base_model:
            task = headers.get(TASK_HEADER, DEFAULT_TASK)
            if task != DEFAULT_TASK and task not in self.tasks:
                raise UnknownTask(task)
            return Route(tenant, task, self.base_model, None, None, self.replica_for(None))
        parsed = self.parse_alias(model)
        if parsed is None or parsed[0] != tenant or parsed[1] not in self.tasks:
            raise UnknownModel(model)
        task = parsed[1]
        canary, incumbent = self.live(tenant, task)
        fallback = incumbent.version if incumbent else None
        share = self.share_of(canary) if canary is not None else 0.0
        if canary is not None and share > 0:
            count = self._calls.get((tenant, task), 0)
            self._calls[(tenant, task)] = count + 1
            if take_canary(count, share):
                return self.adapter_route(tenant, task, canary.version, "canary", fallback)
        if incumbent is not None:
            return self.adapter_route(tenant, task, incumbent.version, "incumbent", None)
        return Route(tenant, task, self.base_model, None, None, self.replica_for(None))

    def adapter_route(self, tenant: str, task: str, version: str, role: str, fallback: str | None) -> Route:
        return Route(tenant, task, version, version, make_alias(tenant, task), self.replica_for(version), role, fallback)

    def base_route(self, route: Route) -> Route:
        """Where a call goes when its routed version is gone: the incumbent, else the base."""
        if route.fallback and route.fallback != route.version:
            return self.adapter_route(route.tenant, route.task, route.fallback, "incumbent", None)
        return Route(route.tenant, route.task, self.base_model, None, None, self.replica_for(None))

    def models(self, tenant: str) -> list[dict[str, Any]]:
        """The base and an alias of ``tenant`` per catalogue task, with what it routes to now."""
        entries = [{"id": self.base_model, "object": "model", "created": 0, "owned_by": "adaptloop", "adapter": None}]
        for task in sorted(self.tasks):
            canary, incumbent = self.live(tenant, task)
            entries.append({"id": make_alias(tenant, task), "object": "model", "created": 0, "owned_by": tenant,
                            "adapter": incumbent.version if incumbent else (canary.version if canary else None),
                            "canary": canary.version if canary else None,
                            "incumbent": incumbent.version if incumbent else None})
        return entries


class Stats:
    """Per alias and served version: the recent calls' (time, latency or None for an upstream error).

    ``/stats?alias=A&since_ms=T`` sums the calls since T, so that the canary controller compares the
    canary and the incumbent over the same period.
    """

    def __init__(self, window: int = STATS_WINDOW) -> None:
        self.window = window
        self.calls: dict[tuple[str, str], deque] = {}
        self.unrecorded = 0

    def add(self, route: Route, latency_ms: float | None) -> None:
        key = (make_alias(route.tenant, route.task), route.version or "base")
        self.calls.setdefault(key, deque(maxlen=self.window)).append((int(time.time() * 1000), latency_ms))

    @staticmethod
    def summary(calls: list[tuple[int, float | None]]) -> dict[str, Any]:
        latencies = sorted(latency for _, latency in calls if latency is not None)
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else 0.0
        return {"requests": len(calls), "errors": len(calls) - len(latencies), "p95_ms": round(p95, 2)}

    def as_dict(self, alias_name: str | None = None, since_ms: int = 0) -> dict[str, Any]:
        aliases: dict[str, dict[str, Any]] = {}
        for (name, served), calls in list(self.calls.items()):
            if alias_name is None or name == alias_name:
                aliases.setdefault(name, {})[served] = self.summary([c for c in calls if c[0] >= since_ms])
        return {"aliases": aliases, "unrecorded": self.unrecorded, "window": self.window}


def bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Gateway:
    """Everything one gateway process holds: settings, keys, registry reader, router, interaction log, HTTP client."""

    def __init__(self, settings: GatewaySettings, catalogue: Catalogue | None = None) -> None:
        self.settings = settings
        self.catalogue = catalogue if catalogue is not None else load_catalogue()
        self.ids = (InteractionIds(settings.id_secret.get_secret_value().encode()) if settings.id_secret is not None
                    else InteractionIds.from_file(settings.id_secret_path()))
        self.admin_key = admin_key(settings.admin_key, settings.admin_key_file).encode()
        self.keys = KeyStore.load(settings.api_keys_file,
                                  settings.api_keys.get_secret_value() if settings.api_keys else None)
        if not len(self.keys):
            log.warning("no API keys configured: every request will be refused (see `adaptloop keys add`)")
        self.reader = ReleaseReader(settings.kafka, settings.topics, name="gateway-registry")
        self.router = Router(self.reader, settings.model.name, settings.replica_list(), settings.canary_share,
                             frozenset(self.catalogue))
        self.interactions = InteractionLog(settings)
        self.stats = Stats()
        self.client: aiohttp.ClientSession | None = None
        self.sidecar_polled = asyncio.Event()
        self._pollers: list[asyncio.Task] = []
        self._polled: set[str] = set()

    async def start(self) -> None:
        # aiohttp, not httpx: its C parser costs ~1 ms less CPU per proxied call (profiled with py-spy
        # under serving.bench_gateway), and this client is on every call's path.
        self.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s, connect=5.0),
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
            headers=bearer_header(self.settings.vllm_api_key))
        self.reader.start()
        self.interactions.start()
        self._pollers = [asyncio.create_task(self._watch_sidecar(r), name=f"sidecar-watch-{r.sidecar_url}")
                         for r in self.router.replicas]

    async def stop(self) -> None:
        for poller in self._pollers:
            poller.cancel()
        self.reader.stop()
        self.interactions.begin_close()
        await asyncio.to_thread(self.interactions.close)
        await asyncio.sleep(0)  # the acknowledgements close() waited for have hopped onto this loop
        self.interactions.close_outbox()
        if self.client is not None:
            await self.client.close()

    @property
    def ready(self) -> bool:
        return self.reader.caught_up.is_set() and self.sidecar_polled.is_set()

    async def _watch_sidecar(self, replica: ReplicaState) -> None:
        """Keep ``replica``'s loaded set and health current: a long poll on its sidecar's ``/adapters``
        (answered at once when the report changes, 304 after ``sidecar_watch_s`` when it does not)."""
        url = f"{replica.sidecar_url}/adapters?wait={self.settings.sidecar_watch_s:g}"
        timeout = aiohttp.ClientTimeout(total=self.settings.sidecar_watch_s + SIDECAR_ANSWER_S)
        tag: str | None = None
        while True:
            try:
                async with self.client.get(url, headers={"if-none-match": tag} if tag else {},
                                           timeout=timeout) as response:
                    if response.status != 304:
                        response.raise_for_status()
                        report = await response.json()
                        tag = response.headers.get("etag")
                        self._apply_report(replica, report)
                if tag is None:  # a sidecar that cannot be watched (an older one): ask again after a pause
                    await asyncio.sleep(self.settings.sidecar_poll_s)
            except (*UPSTREAM_ERRORS, ValueError, KeyError) as exc:
                # Keep the last known set: vLLM rejects an adapter it lost, and the call falls back.
                if replica.healthy:
                    log.warning("sidecar at %s does not answer (%s); no calls there while another answers", url, exc)
                replica.healthy = False
                tag = None
                self._mark_polled(replica)
                await asyncio.sleep(self.settings.sidecar_poll_s)

    def _apply_report(self, replica: ReplicaState, report: dict[str, Any]) -> None:
        replica.loaded = frozenset(report["loaded"])
        vllm_up = bool(report.get("vllm", True))  # False while its sidecar restarts vLLM
        if vllm_up and not replica.healthy:
            log.info("replica %s answers: %d adapters loaded", replica.vllm_url, len(replica.loaded))
        elif replica.healthy and not vllm_up:
            log.warning("replica %s: vLLM is down (its sidecar restarts it)", replica.vllm_url)
        replica.healthy = vllm_up
        self._mark_polled(replica)

    def _mark_polled(self, replica: ReplicaState) -> None:
        self._polled.add(replica.sidecar_url)
        if len(self._polled) == len(self.router.replicas):
            self.sidecar_polled.set()  # every replica asked once (answering or not)

    def authenticate(self, request: Request) -> str:
        """The caller's tenant; ``AuthError`` without a valid key."""
        return self.keys.tenant_of(bearer(request.headers))

    # --- requests ---------------------------------------------------------------------------------

    async def handle(self, request: Request, kind: str) -> Any:
        received = time.perf_counter()
        try:
            tenant = self.authenticate(request)
        except AuthError as exc:
            return openai_error(401, str(exc), "invalid_request_error", "invalid_api_key")
        try:
            body = parse_json(await read_body(request.stream(), self.settings.max_body_bytes,
                                              request.headers.get("content-length")))
        except RequestRefused as exc:
            return openai_error(exc.status, exc.message, "invalid_request_error", exc.code, param=exc.param)
        try:
            check_request(body, kind)
        except BadRequest as exc:
            return openai_error(400, str(exc), "invalid_request_error", param=exc.param)
        try:
            route = self.router.route(body["model"], tenant, request.headers)
        except UnknownModel:
            return openai_error(404, f"The model `{body['model'][:200]}` does not exist or you do not have access to "
                                     f"it: use '{tenant}/<task>' with a task of the catalogue "
                                     f"({', '.join(sorted(self.catalogue))}) or '{self.settings.model.name}'",
                                "invalid_request_error", "model_not_found")
        except UnknownTask as exc:
            return openai_error(400, f"{TASK_HEADER} {str(exc)[:200]!r} is no task of the catalogue "
                                     f"({', '.join(sorted(self.catalogue))})", "invalid_request_error", "unknown_task")
        if route.replica is None:
            return openai_error(503, "no model server replica is configured", "api_error", "no_replica")
        record_mode = request.headers.get(RECORD_HEADER) or self.settings.record_mode
        if record_mode not in RECORD_MODES:
            return openai_error(400, f"{RECORD_HEADER} must be one of {', '.join(RECORD_MODES)}",
                                "invalid_request_error")
        try:
            episode = episode_of(tenant, request.headers, body)
        except BadEpisode as exc:
            return openai_error(400, str(exc), "invalid_request_error", "invalid_episode")
        call = _Call(self, route, self.with_system_prompt(body, route.task) if kind == "chat" else body,
                     request.headers, kind, record_mode == "outbox", received, episode)
        if body.get("stream"):
            return await call.stream()
        return await call.complete()

    def with_system_prompt(self, body: dict[str, Any], task: str) -> dict[str, Any]:
        """The chat body with its task's system prompt first when the agent sent none: what the model sees at
        serving is then what training and evaluation give it (they add the same prompt), and the record keeps it."""
        spec = self.catalogue.tasks.get(task)
        messages = body["messages"]
        if spec is None or not spec.system_prompt or (isinstance(messages[0], dict) and messages[0].get("role") == "system"):
            return body
        return dict(body, messages=[{"role": "system", "content": spec.system_prompt}, *messages])

    async def feedback(self, request: Request) -> JSONResponse:
        """``POST /v1/feedback`` (``serving.feedback``): 202 once the outcome is as safe as an interaction."""
        try:
            tenant = self.authenticate(request)
        except AuthError as exc:
            return openai_error(401, str(exc), "invalid_request_error", "invalid_api_key")
        record_mode = request.headers.get(RECORD_HEADER) or self.settings.record_mode
        if record_mode not in RECORD_MODES:
            return openai_error(400, f"{RECORD_HEADER} must be one of {', '.join(RECORD_MODES)}", "invalid_request_error")
        try:
            raw = await read_body(request.stream(), self.settings.max_body_bytes, request.headers.get("content-length"))
            outcome = outcome_of(raw, tenant, self.ids, max_correction_chars=self.settings.max_correction_chars)
        except RequestRefused as exc:
            return JSONResponse({"error": {"message": exc.message, "type": "invalid_request_error",
                                           "param": exc.param, "code": exc.code}}, status_code=exc.status)
        try:
            if record_mode == "outbox":
                self.interactions.enqueue(outcome, "outcome")
            else:
                await self.interactions.write(outcome, "outcome")
        except (DeliveryError, SerializationError, OutboxError) as exc:
            log.error("feedback on %s not recorded: %s", outcome["interaction_id"] or outcome["episode_id"], exc)
            return openai_error(503, f"the feedback could not be recorded: {exc}", "api_error", "feedback_not_recorded")
        return JSONResponse({"object": "feedback", "id": outcome["outcome_id"],
                             "interaction_id": outcome["interaction_id"] or None, "episode_id": outcome["episode_id"],
                             "status": "accepted"}, status_code=202)


class _Call:
    """One (chat) completion through the gateway: forward, record, answer."""

    def __init__(self, gateway: Gateway, route: Route, body: dict[str, Any], headers: Mapping[str, str],
                 kind: str, outbox: bool, received: float, episode: Episode) -> None:
        self.gateway = gateway
        self.route = route
        self.body = body
        self.kind = kind
        self.outbox = outbox
        self.episode = episode
        self.interaction_id = gateway.ids.new(route.tenant, episode.key)
        self.agent = headers.get(AGENT_HEADER) or gateway.settings.agent_name
        self.session_id = headers.get(SESSION_HEADER) or episode.episode_id
        self.started = received
        self.headers = {INTERACTION_HEADER: self.interaction_id, EPISODE_HEADER: episode.episode_id}
        self._set_route(route)

    def _set_route(self, route: Route) -> None:
        self.route = route
        self.headers[ADAPTER_HEADER] = route.version or "base"
        self.headers[ROLE_HEADER] = route.role

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"
        return self.route.replica.vllm_url + path

    def upstream_body(self, **extra: Any) -> dict[str, Any]:
        return dict(upstream_body(self.body), model=self.route.served_model, **extra)

    def messages(self) -> list[dict[str, Any]]:
        if self.kind == "chat":
            return request_messages(self.body["messages"])
        return [{"role": "user", "content": self.body["prompt"]}]

    def record(self, response: str, tool_calls: list[dict[str, str]], usage: Mapping[str, Any] | None,
               upstream_id: str | None) -> dict[str, Any]:
        usage = usage or {}
        tools = self.body.get("tools")
        latency_ms = (time.perf_counter() - self.started) * 1000
        self.gateway.stats.add(self.route, latency_ms)
        return build_interaction(
            interaction_id=self.interaction_id, tenant=self.route.tenant, agent=self.agent, task=self.route.task,
            session_id=self.session_id, episode_id=self.episode.episode_id, episode_end=self.episode.ended,
            base_model=self.gateway.settings.model.name,
            adapter=(self.route.adapter_name, self.route.version) if self.route.version else None,
            messages=self.messages(), tools_json=json.dumps(tools) if tools else None, response=response,
            tool_calls=tool_calls, latency_ms=latency_ms,
            prompt_tokens=usage.get("prompt_tokens") or 0, completion_tokens=usage.get("completion_tokens") or 0,
            attributes={"requested_model": self.body["model"], "upstream_id": upstream_id or "",
                        "stream": str(bool(self.body.get("stream"))).lower(), "endpoint": self.kind,
                        "role": self.route.role, "replica": self.route.replica.vllm_url})

    def upstream_failed(self, exc: Exception) -> JSONResponse:
        self.gateway.stats.add(self.route, None)
        if isinstance(exc, asyncio.TimeoutError):
            return openai_error(504, f"the model server did not answer in time: {exc}", "api_error", "upstream_timeout",
                                headers=self.headers)
        return openai_error(502, f"the model server is unreachable: {exc}", "api_error", "upstream_unreachable",
                            headers=self.headers)

    def relay_error(self, response: aiohttp.ClientResponse, text: str) -> JSONResponse:
        """vLLM's own error (already OpenAI-shaped), or one wrapped in that shape."""
        if response.status >= 500:
            self.gateway.stats.add(self.route, None)
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if not (isinstance(payload, dict) and isinstance(payload.get("error"), dict)):
            payload = {"error": {"message": text[:1000], "type": "api_error", "param": None, "code": None}}
        return JSONResponse(payload, status_code=response.status, headers=dict(self.headers))

    async def persist(self, record: dict[str, Any]) -> JSONResponse | None:
        """Before the answer: the record in the outbox (outbox mode) or acknowledged by the broker (ack
        mode). If it cannot be, the 503 returned is the answer."""
        try:
            if self.outbox:
                self.gateway.interactions.enqueue(record)
            else:
                await self.gateway.interactions.write(record)
        except (DeliveryError, SerializationError, OutboxError) as exc:
            log.error("interaction %s not recorded: %s", self.interaction_id, exc)
            self.gateway.stats.unrecorded += 1
            return openai_error(503, f"the interaction could not be recorded, so no answer is given: {exc}",
                                "api_error", "interaction_not_recorded", headers=self.headers)
        return None

    def adapter_gone(self, response: aiohttp.ClientResponse) -> bool:
        """vLLM no longer knows the routed version (unloaded since its sidecar last reported): use the fallback."""
        if response.status != 404 or self.route.version is None:
            return False
        log.warning("%s is not loaded in vLLM at %s any more; answering %s with %s", self.route.version,
                    self.route.replica.vllm_url, self.body["model"], self.route.fallback or "the base model")
        self._set_route(self.gateway.router.base_route(self.route))
        return True

    async def _send(self, **extra: Any) -> aiohttp.ClientResponse:
        """The response once its headers arrived; the caller reads the body and releases it."""
        return await self.gateway.client.post(self.url, data=json.dumps(self.upstream_body(**extra)),
                                              headers={"content-type": "application/json"})

    async def _send_with_fallback(self, **extra: Any) -> aiohttp.ClientResponse:
        """Up to three tries: the routed version, its fallback if it is gone, the base if that is gone too."""
        response = await self._send(**extra)
        for _ in range(2):
            if not self.adapter_gone(response):
                break
            response.release()
            response = await self._send(**extra)
        return response

    async def complete(self) -> JSONResponse:
        upstream_started = time.perf_counter()
        try:
            response = await self._send_with_fallback()
            try:
                raw = await response.read()
            finally:
                response.release()
        except UPSTREAM_ERRORS as exc:
            return self.upstream_failed(exc)
        upstream_ms = (time.perf_counter() - upstream_started) * 1000
        if response.status >= 400:
            return self.relay_error(response, raw.decode(errors="replace"))
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return self.upstream_failed(exc)
        choice = (data.get("choices") or [{}])[0]
        if self.kind == "chat":
            message = choice.get("message") or {}
            text = content_text(message.get("content"))
            calls = [tool_call_record(c) for c in message.get("tool_calls") or [] if isinstance(c, dict)]
        else:
            text, calls = choice.get("text") or "", []
        failure = await self.persist(self.record(text, calls, data.get("usage"), data.get("id")))
        if failure is not None:
            return failure
        data["id"] = self.interaction_id
        data["model"] = self.body["model"]
        # What the model server took and what the whole handler took (from the request's arrival in the
        # endpoint to the answer), so that callers (and serving.bench_gateway) can see our own share.
        self.headers["server-timing"] = (f"upstream;dur={upstream_ms:.3f}, "
                                         f"gateway;dur={(time.perf_counter() - self.started) * 1000:.3f}")
        return JSONResponse(data, headers=self.headers)

    async def stream(self) -> Any:
        wants_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        stream_options = dict(self.body.get("stream_options") or {}, include_usage=True)
        try:
            response = await self._send_with_fallback(stream_options=stream_options)
        except UPSTREAM_ERRORS as exc:
            return self.upstream_failed(exc)
        if response.status >= 400:
            try:
                text = (await response.read()).decode(errors="replace")
            except UPSTREAM_ERRORS as exc:
                return self.upstream_failed(exc)
            finally:
                response.release()
            return self.relay_error(response, text)
        return StreamingResponse(self._relay(response, wants_usage), media_type="text/event-stream",
                                 headers=self.headers)

    async def _relay(self, response: aiohttp.ClientResponse, wants_usage: bool) -> AsyncIterator[str]:
        parts: list[str] = []
        tool_calls = ToolCallAssembler()
        usage: dict[str, Any] | None = None
        upstream_id: str | None = None
        try:
            async for raw_line in response.content:
                line = raw_line.decode()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                upstream_id = upstream_id or chunk.get("id")
                for choice in chunk.get("choices") or []:
                    if choice.get("index", 0) == 0:
                        delta = choice.get("delta") or {}
                        parts.append(content_text(delta.get("content")) if self.kind == "chat"
                                     else choice.get("text") or "")
                        tool_calls.add(delta.get("tool_calls"))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not wants_usage:
                        if not chunk.get("choices"):
                            continue  # the usage-only chunk we asked for ourselves
                        chunk["usage"] = None
                chunk["id"] = self.interaction_id
                chunk["model"] = self.body["model"]
                yield f"data: {json.dumps(chunk)}\n\n"
        except (*UPSTREAM_ERRORS, ValueError) as exc:
            self.gateway.stats.add(self.route, None)
            yield f"data: {json.dumps({'error': {'message': f'the model stream broke: {exc}', 'type': 'api_error'}})}\n\n"
            return
        finally:
            response.release()
        failure = await self.persist(self.record("".join(parts), tool_calls.calls(), usage, upstream_id))
        if failure is not None:
            yield f"data: {failure.body.decode()}\n\n"
            return
        yield "data: [DONE]\n\n"


class GatewayApp:
    """The ASGI app uvicorn serves: a POST to either completion endpoint goes straight to
    ``Gateway.handle``; everything else (models, stats, health, the lifespan, other methods) to FastAPI.

    Why not FastAPI for those too: every call reaches the gateway after tens of milliseconds idle
    (vLLM is working), so its code runs from cold caches, where FastAPI's middleware, routing and
    dependency layers cost about 0.2 ms per call at p50 and 0.25 ms at p99 (uvicorn on its own core, 75 ms
    between calls, 600 calls), a tenth of the overhead budget, for nothing the completion endpoints use.
    """

    COMPLETIONS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}

    def __init__(self, api: FastAPI, gateway: Gateway) -> None:
        self.api = api
        self.gateway = gateway

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = self.COMPLETIONS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.api(scope, receive, send)
            return
        try:
            if scope["method"] == "POST":
                response = await self.gateway.handle(Request(scope, receive), kind)
            else:
                response = openai_error(405, f"{scope['path']} takes POST only", "invalid_request_error",
                                        headers={"allow": "POST"})
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            response = openai_error(500, "the gateway failed on this request (see its log)", "api_error")
        await response(scope, receive, send)


def create_app(settings: GatewaySettings, catalogue: Catalogue | None = None) -> GatewayApp:
    """The gateway's ASGI app; everything it holds is built here, nothing at import."""
    gateway = Gateway(settings, catalogue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="adaptloop gateway", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return openai_error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return openai_error(400, str(exc), "invalid_request_error")

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            tenant = gateway.authenticate(request)
        except AuthError as exc:
            return openai_error(401, str(exc), "invalid_request_error", "invalid_api_key")
        return {"object": "list", "data": gateway.router.models(tenant)}

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        return await gateway.feedback(request)

    def is_admin(request: Request) -> bool:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), gateway.admin_key)

    @app.get("/stats")
    async def stats(request: Request, alias: str | None = None, since_ms: int = 0) -> Any:
        if not is_admin(request):  # every tenant's aliases, traffic and versions
            return openai_error(401, "/stats takes the gateway's admin key (ADAPTLOOP_GATEWAY_ADMIN_KEY)",
                                "invalid_request_error", "invalid_api_key")
        return gateway.stats.as_dict(alias, since_ms) | gateway.interactions.stats()

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ready = gateway.ready and gateway.reader.alive
        status = {"status": "ok" if ready else "starting"}
        if is_admin(request):  # the detail names replicas and every tenant's adapters
            status |= {"registry_caught_up": gateway.reader.caught_up.is_set(),
                       "replicas": [{"vllm_url": r.vllm_url, "healthy": r.healthy, "loaded": sorted(r.loaded)}
                                    for r in gateway.router.replicas],
                       "adapters_loaded": sorted(gateway.router.loaded)}
        return JSONResponse(status, status_code=200 if ready else 503)

    return GatewayApp(app, gateway)


async def _serve(server: uvicorn.Server, gateway: Gateway, timeout_s: float) -> None:
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + timeout_s
    while not (server.started and gateway.ready):
        if serving.done():
            await serving  # re-raises what stopped it
            return
        if time.monotonic() > deadline:
            log.error("not ready after %.0f s (registry caught up: %s)", timeout_s, gateway.reader.caught_up.is_set())
            server.should_exit = True
            await serving
            raise SystemExit(1)
        await asyncio.sleep(0.1)
    # Everything built so far (modules, the app, the registry's state) lives as long as the process: out
    # of the collector's sight, a full collection no longer walks it, which took 65 ms once per few
    # minutes under serving.bench_gateway, a pause every call then in flight waited through.
    gc.freeze()
    mark_ready()
    log.info("gateway ready on http://%s:%d", server.config.host, server.config.port)
    await serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop gateway", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to become ready (default 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings()
    if pin_to_cpus(settings.cpus):  # before create_app: the producer's and reader's threads inherit it
        log.info("on CPUs %s only", settings.cpus)
    try:
        app = create_app(settings, load_catalogue())
    except ConfigError as exc:
        print(f"adaptloop gateway: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           access_log=False))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with these
    # handlers in place (it restores them) that ends in a plain exit 0 instead of death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    try:
        # uvloop, as ``uvicorn.run`` would pick it: we run the loop ourselves (readiness), so we pick it here.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(server, app.gateway, args.ready_timeout))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
