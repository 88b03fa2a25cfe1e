"""Feedback over HTTP: ``POST /v1/feedback`` at the gateway turns a verdict on a call into an Outcome record.

    curl -s http://127.0.0.1:18080/v1/feedback -H "authorization: Bearer $KEY" -H 'content-type: application/json' \
         -d '{"interaction_id": "<the id of the completion>", "source": "HUMAN", "success": false,
              "correction": "refund", "labeler": "agent-7", "reason": "it was a refund request"}'
    # 202 {"object": "feedback", "id": "<outcome id>", "interaction_id": "...", "status": "accepted"}

The body (``FeedbackBody``): ``interaction_id`` (the ``id`` the gateway gave the completion) or
``episode_id`` (the whole episode: ``streams.trajectories``), ``source`` (HUMAN, VALIDATOR, HEURISTIC or
BUSINESS), ``success`` and/or ``score`` (0..1), an optional ``correction`` (the answer it should have
been: text, or an OpenAI assistant message with content and/or ``tool_calls``), ``labeler``, ``reason``, an optional ``outcome_id`` (your idempotency key: curation counts an
outcome id once) and ``event_time`` (epoch ms; default now). Anything else is refused.

A tenant gives feedback only on its own calls: every interaction id the gateway hands out carries a
keyed tag of its tenant (HMAC-SHA256 under the gateways' shared ``id_secret``), so an id from another
tenant, or one made up, is a 404 before anything is recorded. A bad body is a 4xx in OpenAI's error
shape and nothing is recorded; 202 comes only once the outcome is as safe as an interaction
(the gateway's record mode: in its outbox, or acknowledged by the broker).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adaptloop.errors import ConfigError
from adaptloop.schemas import contract
from adaptloop.sdk import OUTCOME_SOURCES, build_outcome, partition_key
from adaptloop.settings import shared_secret

#: Hex digits of the tenant tag at the end of an interaction id.
TAG_HEX = 20
#: An outcome's event time may lie this far ahead of the gateway's clock (clock skew).
MAX_FUTURE_MS = 5 * 60 * 1000
#: The deepest nesting a request body may have. Python's parser takes up to about 980 levels from the
#: gateway's handler, but whatever is serialized again deeper in the stack (the body sent upstream, the
#: record's tool definitions) then fails on the interpreter's recursion limit: a 500 instead of a 400.
MAX_JSON_DEPTH = 200


class RequestRefused(Exception):
    """A request body the gateway refuses: the HTTP status, the message and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class InteractionIds:
    """Interaction ids that name their episode's partition key and their tenant verifiably:
    ``<episode key>.<32 hex>-<tag>``, tag = HMAC(secret, tenant, the rest)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("the gateway's id secret must be at least 16 bytes")
        self._secret = secret

    def _tag(self, tenant: str, body: str) -> str:
        return hmac.new(self._secret, f"{tenant}\0{body}".encode(), hashlib.sha256).hexdigest()[:TAG_HEX]

    def new(self, tenant: str, episode_key: str) -> str:
        body = f"{episode_key}.{uuid.uuid4().hex}"
        return f"{body}-{self._tag(tenant, body)}"

    def belongs_to(self, tenant: str, interaction_id: str) -> bool:
        body, sep, tag = interaction_id.rpartition("-")
        if not sep or len(tag) != TAG_HEX or partition_key(body) == body:
            return False
        return hmac.compare_digest(tag, self._tag(tenant, body))

    @classmethod
    def from_file(cls, path: Path) -> "InteractionIds":
        """The secret in ``path``, created (0600, 32 random bytes as hex) if there is none yet."""
        return cls(shared_secret(path, "gateway's id secret").encode())


class CorrectionFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    arguments: str | dict[str, Any]


class CorrectionToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field("", max_length=200)
    type: Literal["function"] = "function"
    function: CorrectionFunction


class AssistantCorrection(BaseModel):
    """The OpenAI assistant message it should have answered with: text, tool calls, or both."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[CorrectionToolCall] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _says_something(self) -> "AssistantCorrection":
        if not self.content and not self.tool_calls:
            raise ValueError("a corrected assistant message needs content or tool_calls")
        return self


class FeedbackBody(BaseModel):
    """What ``POST /v1/feedback`` takes; strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    interaction_id: str | None = Field(None, min_length=1, max_length=200)
    episode_id: str | None = Field(None, min_length=1, max_length=200)
    source: str
    success: bool | None = None
    score: float | None = Field(None, ge=0.0, le=1.0)
    correction: str | AssistantCorrection | None = None
    labeler: str | None = Field(None, max_length=200)
    reason: str | None = Field(None, max_length=4000)
    outcome_id: str | None = Field(None, min_length=1, max_length=128)
    event_time: int | None = Field(None, gt=0)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value.upper() not in OUTCOME_SOURCES:
            raise ValueError(f"must be one of {', '.join(OUTCOME_SOURCES)}")
        return value.upper()

    @field_validator("score")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _a_verdict(self) -> "FeedbackBody":
        if (self.interaction_id is None) == (self.episode_id is None):
            raise ValueError("feedback names one interaction_id or one episode_id")
        if self.success is None and self.score is None and self.correction is None:
            raise ValueError("feedback needs success, score or a correction")
        return self

    @property
    def correction_text(self) -> str | None:
        return self.correction.content if isinstance(self.correction, AssistantCorrection) else self.correction

    @property
    def correction_tool_calls(self) -> list[dict[str, Any]]:
        if not isinstance(self.correction, AssistantCorrection):
            return []
        return [{"id": c.id, "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in self.correction.tool_calls]


async def read_body(receive_chunks: Any, limit: int, declared_length: str | None) -> bytes:
    """The whole body from an async iterator of chunks, or ``RequestRefused`` (413) past ``limit`` bytes
    (refused from the content-length header before reading, or as soon as the bytes read pass it)."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > limit:
        raise RequestRefused(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in receive_chunks:
        size += len(chunk)
        if size > limit:
            raise RequestRefused(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _not_a_number(name: str) -> Any:
    raise RequestRefused(400, f"the request body is not JSON: {name} is no JSON value")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep (iteratively: no recursion limit here)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or ``RequestRefused`` (400): not UTF-8, not JSON (NaN and Infinity, which Python's parser
    takes, included), nested more than ``MAX_JSON_DEPTH`` deep, or a string holding an unpaired surrogate
    (``"\\ud800"``: valid JSON that is no Unicode text; it could be neither sent on nor recorded)."""
    too_deep = RequestRefused(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        body = json.loads(raw, parse_constant=_not_a_number)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:  # UnicodeDecodeError is one
        raise RequestRefused(400, f"the request body is not JSON: {exc}") from None
    # Nesting needs an opening bracket per level: most bodies have too few to be walked at all.
    if isinstance(body, (dict, list)) and raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH \
            and _deeper_than(body, MAX_JSON_DEPTH):
        raise too_deep
    if b"\\ud" in raw or b"\\uD" in raw:  # an escaped surrogate: text only as half of a pair
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise RequestRefused(400, "the request body is not Unicode text: a string holds an unpaired surrogate "
                                      "(\\ud800-\\udfff)") from None
    return body


def outcome_of(raw: bytes, tenant: str, ids: InteractionIds, *, max_correction_chars: int,
               now_ms: int | None = None) -> dict[str, Any]:
    """The Outcome record a feedback body stands for; ``RequestRefused`` when it cannot stand for one."""
    body = parse_json(raw)
    try:
        feedback = FeedbackBody.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()

        def member(part: object) -> bool:
            """A union member pydantic names in a location ('str', 'function-after[..., AssistantCorrection]')."""
            return part == "str" or "AssistantCorrection" in str(part)

        # A correction given as an object failed as a message, not as text: say why it is no message.
        as_message = isinstance(body, dict) and isinstance(body.get("correction"), dict)
        first = next((e for e in errors if as_message and any(member(p) and p != "str" for p in e["loc"])), errors[0])
        # The field named in the body (pydantic's location also names the union member it tried: left out).
        field = ".".join(str(p) for p in first["loc"] if not member(p)) or None
        raise RequestRefused(400, f"invalid feedback: {field or 'body'}: {first['msg']}", field) from None
    correction = feedback.correction_text
    calls = feedback.correction_tool_calls
    if len(correction or "") + sum(len(json.dumps(c)) for c in calls) > max_correction_chars:
        raise RequestRefused(400, f"invalid feedback: correction: longer than {max_correction_chars} characters",
                              "correction")
    now = now_ms if now_ms is not None else contract.now_ms()
    if feedback.event_time is not None and feedback.event_time > now + MAX_FUTURE_MS:
        raise RequestRefused(400, "invalid feedback: event_time: in the future", "event_time")
    # An episode id needs no check: it is the caller's tenant's episode by construction (episodes are keyed
    # by tenant and id), so naming another tenant's episode id names an episode of one's own, empty.
    if feedback.interaction_id is not None and not ids.belongs_to(tenant, feedback.interaction_id):
        raise RequestRefused(404, f"no interaction {feedback.interaction_id[:80]!r} for this key",
                              "interaction_id", "interaction_not_found")
    return build_outcome(feedback.interaction_id or "", tenant=tenant, source=feedback.source,
                         success=feedback.success, score=feedback.score, correction=correction,
                         correction_tool_calls=calls, labeler=feedback.labeler, reason=feedback.reason,
                         event_time=feedback.event_time or now, outcome_id=feedback.outcome_id,
                         episode_id=feedback.episode_id)
