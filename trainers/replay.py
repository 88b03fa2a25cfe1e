"""Held-out episodes replayed in a task's tool environment: the model as the agent.

A tool task whose catalogue entry names an ``environment`` is gated on whole episodes: each held-out episode
starts again from its first messages, the model (candidate, incumbent or base) writes every assistant turn
itself, its tool calls run in the environment the task builds from the episode's record, and the task's
episode judge compares its turns with the recorded right ones. Without an environment the gate judges each
held-out turn on its recorded context (``evaluate.evaluate``), which cannot see an agent that goes wrong
after its own earlier mistake.

An episode's record is its longest held-out example: the trajectory before its last turn, tool results
included, and that turn's right completion. An example without an episode id is an episode of one turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from adaptloop.chat import assistant_text, split_tool_calls, tools_of
from adaptloop.tasks import TaskSpec
from adaptloop.trainers.common import chat_prompt
from adaptloop.validators import Verdict

#: ``complete(prompts, tools)``: one greedy generation per chat prompt, each with its tool definitions.
Complete = Callable[[Sequence[list[dict[str, Any]]], Sequence[list | None]], list[str]]


@dataclass(frozen=True)
class HeldOutEpisode:
    episode_id: str
    messages: list[dict[str, Any]]  # the whole recorded conversation, its last assistant turn included
    tools: list | None

    @property
    def opening(self) -> list[dict[str, Any]]:
        """The messages before the first assistant turn: where the agent starts."""
        first = next(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:first]

    @property
    def right_turns(self) -> list[str]:
        return [assistant_text(m.get("content"), m.get("tool_calls") or ()) for m in self.messages
                if m["role"] == "assistant"]


def held_out_episodes(holdout: Sequence[Mapping[str, Any]]) -> list[HeldOutEpisode]:
    """One record per episode of ``holdout`` (curated examples, a turn each), in order of first appearance."""
    longest: dict[str, Mapping[str, Any]] = {}
    for i, example in enumerate(holdout):
        key = example.get("episode_id") or f"example:{i}"
        kept = longest.get(key)
        if kept is None or len(example["prompt_messages"]) > len(kept["prompt_messages"]):
            longest[key] = example
    episodes = []
    for key, example in longest.items():
        last = {"role": "assistant", "content": example.get("completion") or "",
                "tool_calls": list(example.get("completion_tool_calls") or [])}
        episodes.append(HeldOutEpisode(key, [dict(m) for m in example["prompt_messages"]] + [last],
                                       tools_of(example.get("tools_json"))))
    return episodes


def _result(execute: Callable[[str, Any], Any], name: str, arguments_json: str) -> str:
    """One tool call's result as the agent's runtime sends it back; a failing tool answers with its error."""
    try:
        arguments = json.loads(arguments_json)
        return json.dumps(execute(name, arguments), ensure_ascii=False, default=str)
    except Exception as exc:  # noqa: BLE001 -- a user's environment may raise anything; the agent reads the error
        return json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:200]}"})


def replay(spec: TaskSpec, episodes: Sequence[HeldOutEpisode], complete: Complete) -> list[tuple[Verdict, list[str]]]:
    """Each episode's (verdict, the agent's turns): every live episode's next turn generated in one batch, until
    the agent answers without calling a tool or has written as many turns as the record holds."""
    conversations = [chat_prompt(e.opening, spec.system_prompt) for e in episodes]
    turns: list[list[str]] = [[] for _ in episodes]
    executors: list[Callable[[str, Any], Any] | None] = []
    failed: dict[int, Verdict] = {}
    for i, episode in enumerate(episodes):
        try:
            executors.append(spec.environment(episode.messages))
        except Exception as exc:  # noqa: BLE001 -- the episode fails with why; the others replay
            executors.append(None)
            failed[i] = Verdict(False, 0.0, f"environment failed: {type(exc).__name__}: {str(exc)[:200]}")
    live = [i for i in range(len(episodes)) if i not in failed]
    while live:
        texts = complete([conversations[i] for i in live], [episodes[i].tools for i in live])
        still = []
        for i, text in zip(live, texts):
            turns[i].append(text)
            content, calls = split_tool_calls(text)
            if not calls or len(turns[i]) >= len(episodes[i].right_turns):
                continue
            wire = [{"id": f"call_{len(turns[i])}_{j}", "type": "function", "function": c} for j, c in enumerate(calls)]
            conversations[i] += [{"role": "assistant", "content": content or None, "tool_calls": wire}]
            conversations[i] += [{"role": "tool", "tool_call_id": w["id"],
                                  "content": _result(executors[i], c["name"], c["arguments"])}
                                 for w, c in zip(wire, calls)]
            still.append(i)
        live = still
    return [(failed[i] if i in failed else spec.judge_episode(turns[i], e.right_turns), turns[i])
            for i, e in enumerate(episodes)]
