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

Routing: ``serving.routing``; the call itself (forward, record, answer, tools, response headers):
``serving.completion``; the replicas' state: ``serving.replicas``.

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

A caller picks per request with ``x-adaptloop-record: ack|outbox`` (why the outbox is the default:
``serving/README.md``). With ``"stream": true`` the chunks are relayed as they come and the record is
written when the stream ends: ``data: [DONE]`` follows only a kept record; otherwise the stream ends
with an error event (the ``openai`` client raises it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import logging
import signal
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping

import aiohttp
import uvicorn
import uvloop
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptloop.errors import AuthError, ConfigError, DeliveryError, SerializationError
from adaptloop.processes import mark_ready, pin_to_cpus
from adaptloop.serving.call_stats import Stats
from adaptloop.serving.completion import CompletionCall, openai_error
from adaptloop.serving.episodes import BadEpisode, BadRequest, check_request, episode_of
from adaptloop.serving.feedback import InteractionIds, RequestRefused, outcome_of, parse_json, read_body
from adaptloop.serving.keys import KeyStore
from adaptloop.serving.outbox import OutboxError
from adaptloop.serving.recording import InteractionLog
from adaptloop.serving.registry import ReleaseReader
from adaptloop.serving.replicas import ReplicaState, watch_sidecar
from adaptloop.serving.routing import TASK_HEADER, Router, UnknownModel, UnknownTask
from adaptloop.settings import GatewaySettings, admin_key, bearer_header
from adaptloop.tasks import Catalogue, load_catalogue

log = logging.getLogger("adaptloop.gateway")

RECORD_HEADER = "x-adaptloop-record"
RECORD_MODES = ("outbox", "ack")


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
        # under serving.bench.gateway), and this client is on every call's path.
        self.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s, connect=5.0),
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
            headers=bearer_header(self.settings.vllm_api_key))
        self.reader.start()
        self.interactions.start()
        self._pollers = [asyncio.create_task(watch_sidecar(self.client, r, self.settings, self._mark_polled),
                                             name=f"sidecar-watch-{r.sidecar_url}")
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
        call = CompletionCall(self, route, self.with_system_prompt(body, route.task) if kind == "chat" else body,
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



class GatewayApp:
    """The ASGI app uvicorn serves: a POST to either completion endpoint goes straight to
    ``Gateway.handle``; everything else (models, stats, health, the lifespan, other methods) to FastAPI.

    Why not FastAPI for those too: every call reaches the gateway after tens of milliseconds idle
    (vLLM is working), so its code runs from cold caches, where FastAPI's middleware, routing and
    dependency layers cost about a tenth of the overhead budget per call, for nothing the completion
    endpoints use.
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
    # minutes under serving.bench.gateway, a pause every call then in flight waited through.
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
