"""One rendering of a conversation for serving and training: the chat template vLLM serves with, and the
token ids (with the assistant's tokens marked) the trainer computes its loss on.

    vLLM:     --chat-template deploy/chat_template.jinja --enable-auto-tool-choice --tool-call-parser hermes
              (adaptloop serve passes these; ServeSettings.tool_call_parser)
    trainer:  tokens(tokenizer, messages, tools) -> Tokens(input_ids, assistant_mask)

The template (``chat_template.jinja``) is ChatML, as the bundled SmolLM2's own, plus tools in the system
message and tool calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, the format
vLLM's hermes parser reads back from what the model generates. Without tools it renders exactly what
SmolLM2's template renders. A model of another family takes its own template (``ADAPTLOOP_CHAT_TEMPLATE``,
read by vLLM's server and the trainer alike) and the vLLM tool parser that reads what it renders
(``ADAPTLOOP_SERVE_TOOL_CALL_PARSER``).

Messages here are in the contract's shape (``adaptloop.sdk.message_record``: tool calls as {id, name,
arguments as JSON text}) or OpenAI's; ``template_messages`` turns either into what the template reads,
with arguments as objects, which is what vLLM hands its template too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from adaptloop.errors import TrainingError

CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
#: Another template for every process (vLLM's --chat-template and the trainer's rendering alike).
TEMPLATE_ENV = "ADAPTLOOP_CHAT_TEMPLATE"


def template_path() -> Path:
    return Path(os.environ.get(TEMPLATE_ENV) or CHAT_TEMPLATE)


def chat_template(path: str | Path | None = None) -> str:
    return Path(path or template_path()).read_text(encoding="utf-8")


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value  # not JSON (or nested past parsing): written as it is, as the model produced it
    return value


def assistant_text(content: str | None, tool_calls: Iterable[Mapping[str, Any]] = ()) -> str:
    """An assistant turn as the model writes it: its text, then one ``<tool_call>`` block per call, exactly as the
    template renders it. What a task's validator judges (and compares with a reference) for a turn that calls
    tools; for a turn without calls, just its text."""
    parts = [content] if content else []
    for call in tool_calls:
        function = call.get("function") if isinstance(call.get("function"), Mapping) else call
        arguments = _arguments(function.get("arguments"))
        rendered = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        parts.append(f'<tool_call>\n{{"name": {json.dumps(function["name"], ensure_ascii=False)}, "arguments": {rendered}}}'
                     "\n</tool_call>")
    return "\n".join(parts)


#: One tool call as the template renders it and vLLM's hermes parser reads it back.
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def split_tool_calls(text: str) -> tuple[str, list[dict[str, str]]]:
    """A generated turn back as (content, [{"name", "arguments" as JSON text}]), as vLLM's hermes parser reads it:
    the text outside the ``<tool_call>`` blocks, and each block's call. When a block is not a JSON object with a
    name, the parser returns no calls and the whole text as content; so does this."""
    calls = []
    for block in TOOL_CALL_BLOCK.findall(text):
        try:
            call = json.loads(block)
        except (ValueError, RecursionError):
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        calls.append({"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)})
    return (TOOL_CALL_BLOCK.sub("", text).strip(), calls) if calls else (text, [])


def template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = []
        for call in calls:
            function = call.get("function") if isinstance(call.get("function"), Mapping) else call
            out["tool_calls"].append({"id": call.get("id") or "", "type": "function",
                                      "function": {"name": function["name"],
                                                   "arguments": _arguments(function.get("arguments"))}})
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("name"):
        out["name"] = message["name"]
    return out


def template_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [template_message(m) for m in messages]


def tools_of(tools_json: str | None) -> list[dict[str, Any]] | None:
    """The request's tool definitions (the interaction's ``tools_json``), or None."""
    if not tools_json:
        return None
    tools = json.loads(tools_json)
    return tools if isinstance(tools, list) and tools else None


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: list | None = None, *,
           add_generation_prompt: bool = False, template: str | None = None) -> str:
    return tokenizer.apply_chat_template(template_messages(messages), tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         chat_template=template or chat_template())


@dataclass(frozen=True)
class Tokens:
    """A conversation's token ids and, per token, whether it is the assistant's (the loss falls there only)."""

    input_ids: list[int]
    assistant_mask: list[int]

    @property
    def labels(self) -> list[int]:
        return [t if m else -100 for t, m in zip(self.input_ids, self.assistant_mask)]


def tokens(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: list | None = None, *,
           template: str | None = None) -> Tokens:
    """Every message rendered through the template; the assistant's turns (their text, their tool-call blocks
    and the end-of-turn token) marked. Each span is tokenized on its own, so the tokens before an assistant
    turn are exactly the prompt vLLM tokenizes when it serves that turn, and the turn's tokens are what the
    model generates there."""
    template = template or chat_template()
    whole = render(tokenizer, messages, tools, template=template)
    cuts: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], tools, add_generation_prompt=True, template=template))
        end = len(render(tokenizer, messages[:i + 1], tools, template=template))
        if not whole.startswith(render(tokenizer, messages[:i + 1], tools, template=template)):
            raise TrainingError("the chat template does not render a conversation as its prefixes' continuation")
        if whole[end - 1:end] == "\n":
            end -= 1  # the newline after the end-of-turn token is the next turn's, not generated
        cuts.append((start, end))
    ids: list[int] = []
    mask: list[int] = []
    position = 0
    for start, end in cuts:
        for text, marked in ((whole[position:start], 0), (whole[start:end], 1)):
            if text:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                mask += [marked] * len(piece)
        position = end
    rest = whole[position:]
    if rest:
        piece = tokenizer(rest, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [0] * len(piece)
    return Tokens(ids, mask)


def prompt_tokens(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: list | None = None, *,
                  template: str | None = None) -> list[int]:
    """The ids vLLM tokenizes for a request of ``messages`` (with the generation prompt)."""
    text = render(tokenizer, messages, tools, add_generation_prompt=True, template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
