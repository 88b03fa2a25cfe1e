"""``adaptloop gateway``: the OpenAI-compatible front door that records every call.

    adaptloop gateway                                     # on 127.0.0.1:18080
    python - <<'EOF'
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:18080/v1", api_key="unused")
    reply = client.chat.completions.create(model="acme/order-extract",
                                           messages=[{"role": "user", "content": "hi"}])
    print(reply.id, reply.choices[0].message.content)     # the id is the interaction id
    EOF

Routing: ``model`` is an alias ``tenant/task`` or the base model's name. An alias goes to the
newest (by ``created_at``) RELEASED or PROMOTED version of that (tenant, task) that the sidecar
reports loaded, else to the base model; anything else is a 404. Requests for the base model by
name take tenant and task from the ``x-adaptloop-tenant`` / ``x-adaptloop-task`` headers
(default ``default``).

Recording: every completed call becomes an Interaction on the interactions topic, keyed by its
id. The response is sent only after the broker acknowledged the record (a failure is a 503
in OpenAI's error shape), so an answer the caller received is in the log. With
``"stream": true`` the chunks are relayed as they come and the record is written when the
stream ends: ``data: [DONE]`` follows only an acknowledged record; otherwise the stream ends
with an error event (the ``openai`` client raises it).

Response headers: ``x-adaptloop-interaction-id`` and ``x-adaptloop-adapter`` (version or ``base``);
the response's ``id`` is the interaction id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import httpx
import uvicorn
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptloop.artifacts import alias as make_alias
from adaptloop.errors import DeliveryError, SerializationError
from adaptloop.kafka import producer_config
from adaptloop.processes import mark_ready
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.sdk import build_interaction
from adaptloop.serving.registry import ReleaseReader, newest_servable
from adaptloop.settings import GatewaySettings

log = logging.getLogger("adaptloop.gateway")

SIDECAR_POLL_S = 0.5
DELIVERY_MARGIN_S = 5.0
DEFAULT_TENANT = "default"
DEFAULT_TASK = "default"
AGENT_HEADER = "x-adaptloop-agent"
SESSION_HEADER = "x-adaptloop-session"
TENANT_HEADER = "x-adaptloop-tenant"
TASK_HEADER = "x-adaptloop-task"
INTERACTION_HEADER = "x-adaptloop-interaction-id"
ADAPTER_HEADER = "x-adaptloop-adapter"


def openai_error(status: int, message: str, type_: str, code: str | None = None, *,
                 headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in the shape OpenAI's clients parse."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status, headers=dict(headers or {}))


@dataclass(frozen=True)
class Route:
    """Where one request goes: the name vLLM serves it under, and what to record."""

    tenant: str
    task: str
    served_model: str
    version: str | None  # None: the base model
    adapter_name: str | None  # the alias, when an adapter serves it


class UnknownModel(LookupError):
    """A ``model`` that is neither ``tenant/task`` nor the base model's name."""


class Router:
    """Alias -> newest servable release version that the sidecar reports loaded, else the base."""

    def __init__(self, reader: ReleaseReader, base_model: str) -> None:
        self.reader = reader
        self.base_model = base_model
        self.loaded: frozenset[str] = frozenset()

    @staticmethod
    def parse_alias(model: str) -> tuple[str, str] | None:
        tenant, sep, task = model.partition("/")
        if sep and tenant and task and "/" not in task:
            return tenant, task
        return None

    def route(self, model: str, headers: Mapping[str, str]) -> Route:
        if model == self.base_model:
            return Route(headers.get(TENANT_HEADER, DEFAULT_TENANT), headers.get(TASK_HEADER, DEFAULT_TASK),
                         self.base_model, None, None)
        parsed = self.parse_alias(model)
        if parsed is None:
            raise UnknownModel(model)
        tenant, task = parsed
        release = newest_servable(self.reader.releases(), tenant, task, self.loaded.__contains__)
        if release is None:
            return Route(tenant, task, self.base_model, None, None)
        return Route(tenant, task, release.version, release.version, make_alias(tenant, task))

    def models(self) -> list[dict[str, Any]]:
        """The base and every alias with a servable release, with the version it routes to now."""
        entries = [{"id": self.base_model, "object": "model", "created": 0, "owned_by": "adaptloop", "adapter": None}]
        releases = self.reader.releases()
        for tenant, task in sorted({(r.tenant, r.task) for r in releases.values() if r.servable}):
            current = newest_servable(releases, tenant, task, self.loaded.__contains__)
            entries.append({"id": make_alias(tenant, task), "object": "model", "created": 0, "owned_by": tenant,
                            "adapter": current.version if current else None})
        return entries


class InteractionLog:
    """Produces interactions and lets a coroutine await each record's acknowledgement.

    A background thread polls the producer; its delivery callback settles the asyncio future.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.topic = settings.topics.name("interactions")
        # librdkafka reports a failure at delivery.timeout.ms (settings.kafka.delivery_timeout_s); the
        # margin only guards against a callback that never comes.
        self.timeout_s = settings.kafka.delivery_timeout_s + DELIVERY_MARGIN_S
        self._serialize = serde_for("interaction", settings.kafka.schema_registry_url).serialize
        self._producer = Producer(producer_config(settings.kafka))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="interaction-delivery", daemon=True)

    def start(self) -> "InteractionLog":
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    async def write(self, record: Mapping[str, Any]) -> None:
        """Return once the broker acknowledged ``record``; ``DeliveryError`` otherwise."""
        loop = asyncio.get_running_loop()
        acknowledged: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            loop.call_soon_threadsafe(_settle, acknowledged, err)

        try:
            value = self._serialize(record, SerdeContext(self.topic))
            self._producer.produce(self.topic, value=value, key=record["interaction_id"], on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            raise DeliveryError(f"interaction {record['interaction_id']} not queued: {exc}") from exc
        try:
            await asyncio.wait_for(acknowledged, self.timeout_s)
        except TimeoutError as exc:
            raise DeliveryError(f"interaction {record['interaction_id']} not acknowledged within {self.timeout_s}s") from exc

    def close(self) -> None:
        remaining = self._producer.flush(self.timeout_s)
        self._stop.set()
        self._thread.join(5)
        if remaining:
            log.error("%d interactions not acknowledged at shutdown (their callers got errors)", remaining)


def _settle(future: asyncio.Future, err: KafkaError | None) -> None:
    if future.done():  # the waiter timed out already
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(DeliveryError(f"interaction not acknowledged: {err}"))


def _text(content: Any) -> str:
    """Message content as text: a string, a list of parts (their text joined), or nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return json.dumps(content)


def _tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    return [{"id": c.get("id") or "", "name": (c.get("function") or {}).get("name") or "",
             "arguments": (c.get("function") or {}).get("arguments") or ""} for c in calls or []]


class Gateway:
    """Everything one gateway process holds: settings, registry reader, router, interaction log, HTTP client."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.reader = ReleaseReader(settings.kafka, settings.topics, name="gateway-registry")
        self.router = Router(self.reader, settings.model.name)
        self.interactions = InteractionLog(settings)
        self.client: httpx.AsyncClient | None = None
        self.sidecar_polled = asyncio.Event()
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.request_timeout_s, connect=5.0))
        self.reader.start()
        self.interactions.start()
        self._poller = asyncio.create_task(self._poll_sidecar(), name="sidecar-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self.reader.stop()
        await asyncio.to_thread(self.interactions.close)
        if self.client is not None:
            await self.client.aclose()

    @property
    def ready(self) -> bool:
        return self.reader.caught_up.is_set() and self.sidecar_polled.is_set()

    async def _poll_sidecar(self) -> None:
        url = self.settings.sidecar_url.rstrip("/") + "/adapters"
        failing = False
        while True:
            try:
                response = await self.client.get(url, timeout=2.0)
                response.raise_for_status()
                self.router.loaded = frozenset(response.json()["loaded"])
                if failing:
                    log.info("sidecar at %s answers again", url)
                failing = False
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                # Keep the last known set: vLLM rejects an adapter it lost, and the caller sees that error.
                if not failing:
                    log.warning("sidecar at %s does not answer (%s); keeping the last known adapter set", url, exc)
                failing = True
            self.sidecar_polled.set()
            await asyncio.sleep(SIDECAR_POLL_S)

    # --- requests ---------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "the request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
                or not isinstance(body.get("messages"), list) or not body["messages"]:
            return openai_error(400, "a chat completion needs 'model' (a string) and 'messages' (a non-empty list)",
                                "invalid_request_error")
        try:
            route = self.router.route(body["model"], request.headers)
        except UnknownModel:
            return openai_error(404, f"The model `{body['model']}` does not exist: use 'tenant/task' or "
                                     f"'{self.settings.model.name}'", "invalid_request_error", "model_not_found")
        call = _Call(self, route, body, request.headers)
        if body.get("stream"):
            return await call.stream()
        return await call.complete()


class _Call:
    """One chat completion through the gateway: forward, record, answer."""

    def __init__(self, gateway: Gateway, route: Route, body: dict[str, Any], headers: Mapping[str, str]) -> None:
        self.gateway = gateway
        self.route = route
        self.body = body
        self.interaction_id = str(uuid.uuid4())
        self.agent = headers.get(AGENT_HEADER) or gateway.settings.agent_name
        self.session_id = headers.get(SESSION_HEADER) or str(uuid.uuid4())
        self.url = gateway.settings.vllm_url.rstrip("/") + "/v1/chat/completions"
        self.started = time.perf_counter()
        self.headers = {INTERACTION_HEADER: self.interaction_id, ADAPTER_HEADER: route.version or "base"}

    def upstream_body(self, **extra: Any) -> dict[str, Any]:
        return dict(self.body, model=self.route.served_model, **extra)

    def record(self, response: str, tool_calls: list[dict[str, str]], usage: Mapping[str, Any] | None,
               upstream_id: str | None) -> dict[str, Any]:
        usage = usage or {}
        tools = self.body.get("tools")
        return build_interaction(
            interaction_id=self.interaction_id, tenant=self.route.tenant, agent=self.agent, task=self.route.task,
            session_id=self.session_id, base_model=self.gateway.settings.model.name,
            adapter=(self.route.adapter_name, self.route.version) if self.route.version else None,
            messages=[{"role": str(m.get("role", "")), "content": _text(m.get("content"))}
                      for m in self.body["messages"] if isinstance(m, dict)],
            tools_json=json.dumps(tools) if tools else None, response=response, tool_calls=tool_calls,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            prompt_tokens=usage.get("prompt_tokens") or 0, completion_tokens=usage.get("completion_tokens") or 0,
            attributes={"requested_model": self.body["model"], "upstream_id": upstream_id or "",
                        "stream": str(bool(self.body.get("stream"))).lower()})

    def upstream_failed(self, exc: httpx.HTTPError) -> JSONResponse:
        if isinstance(exc, httpx.TimeoutException):
            return openai_error(504, f"the model server did not answer in time: {exc}", "api_error", "upstream_timeout",
                                headers=self.headers)
        return openai_error(502, f"the model server is unreachable: {exc}", "api_error", "upstream_unreachable",
                            headers=self.headers)

    @staticmethod
    def relay_error(response: httpx.Response, text: str, headers: Mapping[str, str]) -> JSONResponse:
        """vLLM's own error (already OpenAI-shaped), or one wrapped in that shape."""
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if not (isinstance(payload, dict) and isinstance(payload.get("error"), dict)):
            payload = {"error": {"message": text[:1000], "type": "api_error", "param": None, "code": None}}
        return JSONResponse(payload, status_code=response.status_code, headers=dict(headers))

    async def persist(self, record: dict[str, Any]) -> JSONResponse | None:
        try:
            await self.gateway.interactions.write(record)
        except (DeliveryError, SerializationError) as exc:
            log.error("interaction %s not recorded: %s", self.interaction_id, exc)
            return openai_error(503, f"the interaction could not be recorded, so no answer is given: {exc}",
                                "api_error", "interaction_not_recorded", headers=self.headers)
        return None

    def adapter_gone(self, response: httpx.Response) -> bool:
        """vLLM no longer knows the routed version (unloaded since the last sidecar poll): use the base."""
        if response.status_code != 404 or self.route.version is None:
            return False
        log.warning("%s is not loaded in vLLM any more; answering %s with the base model",
                    self.route.version, self.body["model"])
        self.route = Route(self.route.tenant, self.route.task, self.gateway.settings.model.name, None, None)
        self.headers[ADAPTER_HEADER] = "base"
        return True

    async def complete(self) -> JSONResponse:
        try:
            response = await self.gateway.client.post(self.url, json=self.upstream_body())
            if self.adapter_gone(response):
                response = await self.gateway.client.post(self.url, json=self.upstream_body())
        except httpx.HTTPError as exc:
            return self.upstream_failed(exc)
        if response.status_code >= 400:
            return self.relay_error(response, response.text, self.headers)
        data = response.json()
        message = (data.get("choices") or [{}])[0].get("message") or {}
        failure = await self.persist(self.record(_text(message.get("content")), _tool_calls(message.get("tool_calls")),
                                                 data.get("usage"), data.get("id")))
        if failure is not None:
            return failure
        data["id"] = self.interaction_id
        data["model"] = self.body["model"]
        return JSONResponse(data, headers=self.headers)

    async def stream(self) -> Any:
        wants_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        client = self.gateway.client
        stream_options = dict(self.body.get("stream_options") or {}, include_usage=True)
        try:
            response = await client.send(client.build_request(
                "POST", self.url, json=self.upstream_body(stream_options=stream_options)), stream=True)
            if self.adapter_gone(response):
                await response.aclose()
                response = await client.send(client.build_request(
                    "POST", self.url, json=self.upstream_body(stream_options=stream_options)), stream=True)
        except httpx.HTTPError as exc:
            return self.upstream_failed(exc)
        if response.status_code >= 400:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            return self.relay_error(response, text, self.headers)
        return StreamingResponse(self._relay(response, wants_usage), media_type="text/event-stream",
                                 headers=self.headers)

    async def _relay(self, response: httpx.Response, wants_usage: bool) -> AsyncIterator[str]:
        parts: list[str] = []
        usage: dict[str, Any] | None = None
        upstream_id: str | None = None
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                upstream_id = upstream_id or chunk.get("id")
                for choice in chunk.get("choices") or []:
                    if choice.get("index", 0) == 0:
                        parts.append(_text((choice.get("delta") or {}).get("content")))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not wants_usage:
                        if not chunk.get("choices"):
                            continue  # the usage-only chunk we asked for ourselves
                        chunk["usage"] = None
                chunk["id"] = self.interaction_id
                chunk["model"] = self.body["model"]
                yield f"data: {json.dumps(chunk)}\n\n"
        except (httpx.HTTPError, ValueError) as exc:
            yield f"data: {json.dumps({'error': {'message': f'the model stream broke: {exc}', 'type': 'api_error'}})}\n\n"
            return
        finally:
            await response.aclose()
        # Tool calls are not reassembled from stream deltas; the text is.
        failure = await self.persist(self.record("".join(parts), [], usage, upstream_id))
        if failure is not None:
            yield f"data: {failure.body.decode()}\n\n"
            return
        yield "data: [DONE]\n\n"


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's ASGI app; everything it holds is built here, nothing at import."""
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="adaptloop gateway", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return openai_error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return openai_error(400, str(exc), "invalid_request_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await gateway.chat_completions(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": gateway.router.models()}

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = gateway.ready and gateway.reader.alive
        return JSONResponse({"status": "ok" if ready else "starting",
                             "registry_caught_up": gateway.reader.caught_up.is_set(),
                             "adapters_loaded": sorted(gateway.router.loaded)},
                            status_code=200 if ready else 503)

    return app


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
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           access_log=False))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with these
    # handlers in place (it restores them) that ends in a plain exit 0 instead of death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    try:
        asyncio.run(_serve(server, app.state.gateway, args.ready_timeout))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
