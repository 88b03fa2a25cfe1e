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
#: Roles a chat message may have (OpenAI's). The chat template writes a role into the prompt as it is
#: (``<|im_start|>`` + role), so any other string, ChatML markers included, is refused rather than rendered.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
TOOL_CHOICES = ("none", "auto", "required")
#: Integer fields of a completion body and their bounds (inclusive). The model server judges them against its
#: model (a context length, a limit of its own); the gateway refuses only what no server takes.
INT_FIELDS = {"n": (1, 128), "max_tokens": (1, 2**31 - 1), "max_completion_tokens": (1, 2**31 - 1)}


class BadEpisode(ValueError):
    """An episode id the gateway cannot take (not a string, empty, too long, or not printable ASCII)."""


class BadRequest(ValueError):
    """A completion body of a shape no model server takes; ``param`` names the offending field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


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
    # It goes back in the x-adaptloop-episode response header: a control character there (a CR LF from the body's
    # metadata) would inject a header or end the answer, and a character outside Latin-1 cannot be written at all.
    if named is not None and not (named.isascii() and named.isprintable()):
        raise BadEpisode("an episode id is printable ASCII (it is sent back in the x-adaptloop-episode header)")
    episode_id = named.strip() if named else f"ep-{uuid.uuid4().hex}"
    ended = _truthy(headers.get(EPISODE_END_HEADER)) or _truthy(metadata.get("episode_end"))
    return Episode(episode_id, episode_key(tenant, episode_id), ended, named is not None)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_request(body: Any, kind: str) -> None:
    """Refuse (``BadRequest``) a ``chat`` or ``completion`` body of a shape no model server takes, before it goes
    upstream and before anything of it is recorded: the top level; each message (an object with a known role,
    content that is text or a list of parts, tool calls in a list); ``tools`` (functions with a name);
    ``tool_choice`` (a word, or a tool of ``tools``); ``n`` and the token limits (integers in range);
    ``stream`` (a bool) and ``stream_options`` (an object). What lies within those shapes is the model server's
    to judge."""
    if kind == "chat":
        if not (isinstance(body, dict) and isinstance(body.get("model"), str) and isinstance(body.get("messages"), list)
                and body["messages"]):
            raise BadRequest(None, "a chat completion needs 'model' (a string) and 'messages' (a non-empty list)")
        for n, message in enumerate(body["messages"]):
            _check_message(message, f"messages[{n}]")
        _check_tools(body.get("tools"), body.get("tool_choice"))
    elif not (isinstance(body, dict) and isinstance(body.get("model"), str) and isinstance(body.get("prompt"), str)):
        raise BadRequest(None, "a completion needs 'model' (a string) and 'prompt' (a string)")
    for name, (low, high) in INT_FIELDS.items():
        value = body.get(name)
        if value is not None and (type(value) is not int or not low <= value <= high):
            raise BadRequest(name, f"{name} must be an integer from {low} to {high}, not {_shown(value)}")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("stream", f"stream must be true or false, not {_shown(body['stream'])}")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise BadRequest("stream_options", f"stream_options must be an object, not {_shown(body['stream_options'])}")


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise BadRequest(where, f"{where} must be an object with a role, not {_shown(message)}")
    role = message.get("role")
    if not (isinstance(role, str) and role in ROLES):
        raise BadRequest(f"{where}.role", f"{where}.role must be one of {', '.join(sorted(ROLES))}, not {_shown(role)}")
    content = message.get("content")
    if content is not None and not isinstance(content, str) and not (
            isinstance(content, list)
            and all(isinstance(part, dict) and isinstance(part.get("text", ""), str) for part in content)):
        raise BadRequest(f"{where}.content", f"{where}.content must be a string or a list of content parts "
                                             f"(objects, any text a string), not {_shown(content)}")
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(isinstance(call, dict) for call in calls)):
        raise BadRequest(f"{where}.tool_calls", f"{where}.tool_calls must be a list of objects, not {_shown(calls)}")


def _check_tools(tools: Any, choice: Any) -> None:
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("tools", f"tools must be a list of function tools, not {_shown(tools)}")
        for n, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not (isinstance(function, dict) and tool.get("type", "function") == "function"
                    and isinstance(function.get("name"), str) and function["name"]):
                raise BadRequest(f"tools[{n}]", f'tools[{n}] must be {{"type": "function", "function": {{"name": ...}}}}')
            names.add(function["name"])
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise BadRequest("tool_choice", f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named tool, "
                                            f"not {_shown(choice)}")
        if choice == "required" and not names:
            raise BadRequest("tool_choice", "tool_choice 'required' needs tools")
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(name, str) and choice.get("type", "function") == "function"):
        raise BadRequest("tool_choice", 'tool_choice names a tool as {"type": "function", "function": {"name": ...}}')
    if name not in names:
        raise BadRequest("tool_choice", f"tool_choice names {_shown(name)}, which is none of the tools")


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
