"""One (chat) completion through the gateway: forward it to its replica, record it, answer.

Tools: ``tools``, ``tool_choice`` (none, auto, required, named) and ``parallel_tool_calls`` go to vLLM as
they are (it serves with tool calling on: ``adaptloop.chat``); streamed tool-call deltas are reassembled
for the record, which keeps every message of the request (an assistant's tool calls, a tool's result) and
the episode and turn of the call (``serving.episodes``).

Response headers: ``x-adaptloop-interaction-id``, ``x-adaptloop-episode``, ``x-adaptloop-adapter`` (version or
``base``) and ``x-adaptloop-role`` (``canary``, ``incumbent`` or ``base``); the response's ``id`` is the interaction id,
tagged with its tenant (``serving.feedback.InteractionIds``) so that feedback on it can be verified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

import aiohttp
from fastapi.responses import JSONResponse, StreamingResponse

from adaptloop.errors import DeliveryError, SerializationError
from adaptloop.sdk import build_interaction, tool_call_record
from adaptloop.serving.episodes import EPISODE_HEADER, Episode, ToolCallAssembler, content_text, request_messages, upstream_body
from adaptloop.serving.outbox import OutboxError
from adaptloop.serving.replicas import UPSTREAM_ERRORS
from adaptloop.serving.routing import Route

if TYPE_CHECKING:
    from adaptloop.serving.gateway import Gateway

log = logging.getLogger("adaptloop.gateway")

AGENT_HEADER = "x-adaptloop-agent"
SESSION_HEADER = "x-adaptloop-session"
INTERACTION_HEADER = "x-adaptloop-interaction-id"
ADAPTER_HEADER = "x-adaptloop-adapter"
ROLE_HEADER = "x-adaptloop-role"


def openai_error(status: int, message: str, type_: str, code: str | None = None, *,
                 headers: Mapping[str, str] | None = None, param: str | None = None) -> JSONResponse:
    """An error in the shape OpenAI's clients parse."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=dict(headers or {}))


class CompletionCall:
    """One (chat) completion through the gateway: forward, record, answer."""

    def __init__(self, gateway: "Gateway", route: Route, body: dict[str, Any], headers: Mapping[str, str],
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
        # endpoint to the answer), so that callers (and serving.bench.gateway) can see our own share.
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
