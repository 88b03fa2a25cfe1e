"""What the gateway records of an agent's run: which episode a call belongs to, the messages it carried, and
the tool calls it answered with (reassembled when they were streamed).

An episode is named by the ``X-Adaptloop-Episode`` header or the body's ``metadata.episode_id``; a call
without either is an episode of its own (a new id, returned in the ``X-Adaptloop-Episode`` response
header so that the agent can name it on its next call). ``X-Adaptloop-Episode-End: true`` (or
``metadata.episode_end``) says the call is the episode's last. A call's turn is 1 + the assistant
messages its request carries: the agent sends the whole history each time, so the count needs no state.
The episode is the session too unless ``X-Adaptloop-Session`` says otherwise: an episode's calls then
land on one side of the holdout split.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from adaptloop.sdk import episode_key, message_record

EPISODE_HEADER = "x-adaptloop-episode"
EPISODE_END_HEADER = "x-adaptloop-episode-end"
#: Keys of the body's ``metadata`` that are ours (taken out before the body goes to the model server).
METADATA_KEYS = ("episode_id", "episode_end")
MAX_EPISODE_ID = 200


class BadEpisode(ValueError):
    """An episode id the gateway cannot take (not a string, empty or too long)."""


@dataclass(frozen=True)
class Episode:
    episode_id: str
    key: str
    ended: bool
    named: bool  # the agent named it (else the gateway made it for this one call)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("1", "true", "yes"))


def episode_of(tenant: str, headers: Mapping[str, str], body: dict[str, Any]) -> Episode:
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    named = headers.get(EPISODE_HEADER) or metadata.get("episode_id")
    if named is not None and (not isinstance(named, str) or not named.strip() or len(named) > MAX_EPISODE_ID):
        raise BadEpisode(f"an episode id is a non-empty string of at most {MAX_EPISODE_ID} characters")
    episode_id = named.strip() if named else f"ep-{uuid.uuid4().hex}"
    ended = _truthy(headers.get(EPISODE_END_HEADER)) or _truthy(metadata.get("episode_end"))
    return Episode(episode_id, episode_key(tenant, episode_id), ended, named is not None)


def upstream_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body without our metadata keys (the model server has no use for them)."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not any(k in metadata for k in METADATA_KEYS):
        return body
    rest = {k: v for k, v in metadata.items() if k not in METADATA_KEYS}
    return {k: v for k, v in body.items() if k != "metadata"} | ({"metadata": rest} if rest else {})


def content_text(content: Any) -> str:
    """Message content as text: a string, a list of parts (their text joined), or nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def request_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The request's messages as the contract keeps them: text, an assistant's tool calls, a tool result's id."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        calls = m.get("tool_calls") if isinstance(m.get("tool_calls"), list) else []
        out.append(message_record({"role": str(m.get("role", "")), "content": content_text(m.get("content")),
                                   "tool_calls": [c for c in calls if isinstance(c, dict)],
                                   "tool_call_id": m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None,
                                   "name": m.get("name") if isinstance(m.get("name"), str) else None}))
    return out


class ToolCallAssembler:
    """Streamed tool-call deltas (OpenAI's ``choices[0].delta.tool_calls``) back into whole calls, by index."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: Any) -> None:
        for delta in deltas if isinstance(deltas, list) else ():
            if not isinstance(delta, dict):
                continue
            call = self._calls.setdefault(int(delta.get("index") or 0), {"id": "", "name": "", "arguments": ""})
            function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
            call["id"] = delta.get("id") or call["id"]
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def calls(self) -> list[dict[str, str]]:
        return [self._calls[i] for i in sorted(self._calls)]
