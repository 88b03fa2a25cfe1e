"""The agent SDK: record interactions and outcomes; every failure reaches the caller.

Over HTTP, for agents that reach only the gateway (the id is the completion's ``id``):

    from adaptloop.sdk import FeedbackClient
    feedback = FeedbackClient("http://127.0.0.1:18080", api_key="alk_...")
    feedback.feedback(reply.id, source="HUMAN", success=False, correction="refund", reason="it asked for its money")

Over Kafka, for agents that record their own calls (the Python SDK beside a broker):

    from adaptloop.sdk import Recorder
    with Recorder(KafkaSettings(), Topics()) as rec:
        iid = rec.interaction(tenant="acme", agent="bot", task="order-extract", session_id="s1",
                              messages=[{"role": "user", "content": "..."}], response="{...}")
        rec.outcome(iid, tenant="acme", source="VALIDATOR", success=False, correction="{...}")
    # leaving the block flushes; a record the broker did not acknowledge raises DeliveryError

``wait=True`` on a call waits for that record's acknowledgement before returning. A field the record cannot
take (a wrong type, ``None`` where a value is required, an unknown outcome source) is a ``SerializationError``,
and a record the producer cannot queue (over its size limit) a ``DeliveryError``, both before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Iterable, Mapping

import httpx
from confluent_kafka import KafkaException

from adaptloop.errors import DeliveryError, FeedbackError, SerializationError
from adaptloop.kafka import DeliveryTracker
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import now_ms
from adaptloop.settings import KafkaSettings, Topics

OUTCOME_SOURCES = ("VALIDATOR", "HUMAN", "HEURISTIC", "BUSINESS")
#: Hex digits of an episode key (``episode_key``).
EPISODE_KEY_HEX = 16


def episode_key(tenant: str, episode_id: str) -> str:
    """The partition key of every record of one episode of one tenant (its calls and its outcomes), so that
    curation sees a whole episode on one partition; tenant-scoped: two tenants' episode "e1" never meet."""
    return hashlib.sha256(f"{tenant}\0{episode_id}".encode()).hexdigest()[:EPISODE_KEY_HEX]


def partition_key(interaction_id: str) -> str:
    """The key a call and its outcomes are produced under: the episode key an id starts with
    (``<episode key>.<rest>``, as the gateway and ``Recorder`` make ids of calls in a named episode),
    else the id itself (a call on its own)."""
    head, sep, _ = interaction_id.partition(".")
    if sep and len(head) == EPISODE_KEY_HEX and all(c in "0123456789abcdef" for c in head):
        return head
    return interaction_id


def outcome_key(outcome: Mapping[str, Any]) -> str:
    """An outcome goes where what it judges is: its episode's key, or its call's."""
    if outcome.get("episode_id"):
        return episode_key(outcome["tenant"], outcome["episode_id"])
    return partition_key(outcome["interaction_id"])


def message_record(message: Mapping[str, Any]) -> dict[str, Any]:
    """One request message as the contract keeps it (role, text, an assistant's tool calls, a tool result's id)."""
    return {"role": str(message["role"]), "content": message.get("content") or "",
            "tool_calls": [tool_call_record(c) for c in message.get("tool_calls") or ()],
            "tool_call_id": message.get("tool_call_id"), "name": message.get("name")}


def tool_call_record(call: Mapping[str, Any]) -> dict[str, str]:
    """A tool call as the contract keeps it: id, name, arguments (JSON text). Takes OpenAI's nested shape
    (``{"id", "type", "function": {"name", "arguments"}}``) or the flat one."""
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    arguments = function.get("arguments")
    return {"id": str(call.get("id") or ""), "name": str(function.get("name") or ""),
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {})}


def build_interaction(*, tenant: str, agent: str, task: str, session_id: str,
                      messages: Iterable[Mapping[str, Any]], response: str | None,
                      base_model: str, adapter: tuple[str, str] | None = None,
                      interaction_id: str | None = None, trace_id: str | None = None,
                      event_time: int | None = None, tools_json: str | None = None,
                      tool_calls: Iterable[Mapping[str, str]] = (), latency_ms: float = 0.0,
                      prompt_tokens: int = 0, completion_tokens: int = 0,
                      attributes: Mapping[str, str] | None = None, episode_id: str = "", turn: int | None = None,
                      episode_end: bool = False) -> dict[str, Any]:
    """An Interaction record (schemas/avro/interaction.v2.avsc) as a dict; ``turn`` defaults to 1 + the
    assistant messages in ``messages`` (the gateway's numbering)."""
    messages = [message_record(m) for m in messages]
    return {
        "interaction_id": interaction_id or str(uuid.uuid4()),
        "tenant": tenant,
        "agent": agent,
        "task": task,
        "session_id": session_id,
        "episode_id": episode_id,
        "turn": turn if turn is not None else 1 + sum(m["role"] == "assistant" for m in messages),
        "trace_id": trace_id,
        "event_time": event_time if event_time is not None else now_ms(),
        "base_model": base_model,
        "adapter": {"name": adapter[0], "version": adapter[1]} if adapter else None,
        "request_messages": messages,
        "tools_json": tools_json,
        "response": response,
        "tool_calls": [tool_call_record(c) for c in tool_calls],
        "episode_end": bool(episode_end),
        "latency_ms": float(latency_ms),
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "attributes": dict(attributes or {}),
    }


def build_outcome(interaction_id: str, *, tenant: str, source: str, success: bool | None = None,
                  score: float | None = None, correction: str | None = None, labeler: str | None = None,
                  reason: str | None = None, event_time: int | None = None, outcome_id: str | None = None,
                  episode_id: str | None = None,
                  correction_tool_calls: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """An Outcome record (schemas/avro/outcome.v2.avsc) as a dict: of one call (``interaction_id``), or of a
    whole episode (``episode_id``, with ``interaction_id`` empty)."""
    if source not in OUTCOME_SOURCES:
        raise ValueError(f"outcome source must be one of {OUTCOME_SOURCES}, not {source!r}")
    return {
        "outcome_id": outcome_id or str(uuid.uuid4()),
        "interaction_id": interaction_id,
        "episode_id": episode_id,
        "tenant": tenant,
        "event_time": event_time if event_time is not None else now_ms(),
        "source": source,
        "success": success,
        "score": score,
        "correction": correction,
        "correction_tool_calls": [tool_call_record(c) for c in correction_tool_calls],
        "labeler": labeler,
        "reason": reason,
    }


def _built(stem: str, build: Any, *args: Any, **fields: Any) -> dict[str, Any]:
    """``build(*args, **fields)``; a field it cannot take (``messages=None``, an unknown source, a misspelt name) is a
    ``SerializationError`` naming it, as a field the schema cannot take is."""
    try:
        return build(*args, **fields)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SerializationError(f"{stem} not built: {type(exc).__name__}: {exc}") from exc


class Recorder:
    """Produces interactions and outcomes keyed by interaction id (so both meet on one partition)."""

    def __init__(self, kafka: KafkaSettings, topics: Topics, *, base_model: str = "smollm2-135m-instruct") -> None:
        self.topics = topics
        self.base_model = base_model
        self._interactions = serde_for("interaction", kafka.schema_registry_url)
        self._outcomes = serde_for("outcome", kafka.schema_registry_url)
        self._producer = DeliveryTracker(kafka)

    def send_interaction(self, record: Mapping[str, Any], *, wait: bool = False) -> str:
        topic = self.topics.name("interactions")
        value = self._interactions.serialize(record, SerdeContext(topic))
        self._send(topic, value, partition_key(record["interaction_id"]), wait)
        return record["interaction_id"]

    def _send(self, topic: str, value: bytes, key: str, wait: bool) -> None:
        try:
            self._producer.send(topic, value, key=key)
        except KafkaException as exc:  # refused before it left: too large for the producer, an unknown topic
            raise DeliveryError(f"{topic}: record of {len(value)} bytes not queued: {exc}") from exc
        if wait:
            self._producer.flush()

    def interaction(self, *, wait: bool = False, **fields: Any) -> str:
        """Record one interaction; returns its id. See ``build_interaction`` for the fields. A call of a named
        episode (``episode_id``) gets an id that starts with its episode's key, so it and its outcomes meet
        the episode's other calls on one partition."""
        fields.setdefault("base_model", self.base_model)
        if fields.get("episode_id") and not fields.get("interaction_id"):
            fields["interaction_id"] = f"{episode_key(fields['tenant'], fields['episode_id'])}.{uuid.uuid4().hex}"
        return self.send_interaction(_built("interaction", build_interaction, **fields), wait=wait)

    def outcome(self, interaction_id: str, *, wait: bool = False, **fields: Any) -> str:
        """Record one outcome of ``interaction_id`` (or, with ``interaction_id=""`` and ``episode_id``, of a
        whole episode); returns the outcome id."""
        record = _built("outcome", build_outcome, interaction_id, **fields)
        topic = self.topics.name("outcomes")
        self._send(topic, self._outcomes.serialize(record, SerdeContext(topic)), outcome_key(record), wait)
        return record["outcome_id"]

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every record so far; raises ``DeliveryError`` naming what was not acknowledged."""
        return self._producer.flush(timeout_s)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()


class FeedbackClient:
    """``POST /v1/feedback`` at the gateway with the tenant's key; returns the outcome id once the gateway
    has it safe (202), raises ``FeedbackError`` with the gateway's status and message otherwise (status 0:
    nothing reached the gateway)."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 30.0) -> None:
        self._client = httpx.Client(base_url=base_url.rstrip("/").removesuffix("/v1"), timeout=timeout_s,
                                    headers={"authorization": f"Bearer {api_key}"})

    def feedback(self, interaction_id: str | None = None, *, source: str, episode_id: str | None = None,
                 success: bool | None = None, score: float | None = None,
                 correction: str | Mapping[str, Any] | None = None, labeler: str | None = None,
                 reason: str | None = None, outcome_id: str | None = None, event_time: int | None = None) -> str:
        """A verdict on one call (``interaction_id``, the completion's ``id``) or a whole episode (``episode_id``)."""
        body = {"interaction_id": interaction_id, "episode_id": episode_id, "source": source, "success": success,
                "score": score,
                "correction": correction, "labeler": labeler, "reason": reason, "outcome_id": outcome_id,
                "event_time": event_time}
        try:
            response = self._client.post("/v1/feedback", json={k: v for k, v in body.items() if v is not None})
        except httpx.HTTPError as exc:
            raise FeedbackError(0, f"the gateway did not answer: {exc}") from exc
        except ValueError as exc:  # no JSON for it (a NaN score): refused here, as the gateway would refuse it
            raise FeedbackError(0, f"the feedback is not JSON, nothing was sent: {exc}") from exc
        if response.status_code != 202:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise FeedbackError(response.status_code, message)
        return response.json()["id"]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "FeedbackClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
