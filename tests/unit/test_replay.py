"""The gate's replay of held-out episodes in a task's tool environment (``adaptloop.trainers.replay``)."""

from __future__ import annotations

import json

from adaptloop.chat import assistant_text, split_tool_calls
from adaptloop.ops.tool_offline import trajectories
from adaptloop.tasks import example_catalogue
from adaptloop.trainers.replay import held_out_episodes, replay

SPEC = example_catalogue().get("support-agent")


def test_a_held_out_episode_is_its_longest_record():
    holdout = trajectories(3, seed=99, held_out=True)
    episodes = held_out_episodes(holdout + [{"prompt_messages": [{"role": "user", "content": "hi"}], "completion": "hello"}])
    assert len(episodes) == 4 and episodes[-1].right_turns == ["hello"]
    first = episodes[0]
    assert [m["role"] for m in first.opening] == ["user"] and len(first.right_turns) in (2, 3)
    assert split_tool_calls(first.right_turns[0])[1][0]["name"] == "lookup_order"


def test_an_agent_that_reads_its_tool_results_passes_and_one_that_guesses_fails():
    """Two agents written out as code, to pin down the replay itself: every tool call is executed in the task's
    environment and its result reaches the agent's next prompt. The one that answers from what the lookup
    returned is judged right; the one that answers without looking is judged wrong at the first turn."""
    episodes = held_out_episodes(trajectories(8, seed=99, held_out=True))

    def reader(prompts, tools):
        turns = []
        for prompt in prompts:
            assert tools and tools[0] and prompt[0]["role"] == "system"
            done = [m for m in prompt if m["role"] == "tool"]
            request = next(m["content"] for m in prompt if m["role"] == "user")
            case = next(e for e in episodes if e.opening[0]["content"] == request)
            right = case.right_turns[len([m for m in prompt if m["role"] == "assistant"])]
            if done:  # the environment answered the previous call with the recorded order
                assert json.loads(done[-1]["content"]).get("order_id")
            turns.append(right)
        return turns

    replayed = replay(SPEC, episodes, reader)
    assert all(verdict.ok for verdict, _ in replayed)
    assert [len(turns) for _, turns in replayed] == [len(e.right_turns) for e in episodes]
    guessed = replay(SPEC, episodes, lambda prompts, tools: ["Your order is fine."] * len(prompts))
    assert all(not v.ok and v.reason.startswith("turn 1") and len(t) == 1 for v, t in guessed)


def test_a_failing_environment_or_tool_fails_its_episode_not_the_replay():
    import dataclasses

    episodes = held_out_episodes(trajectories(2, seed=99, held_out=True))
    broken = dataclasses.replace(SPEC, environment=lambda messages: 1 / 0)
    assert all("environment failed: ZeroDivisionError" in v.reason for v, _ in replay(broken, episodes, None))

    def raising(name, arguments):
        raise RuntimeError("tool down")

    seen = []
    flaky = dataclasses.replace(SPEC, environment=lambda messages: raising)

    def agent(prompts, tools):
        seen.extend(m["content"] for p in prompts for m in p if m["role"] == "tool")
        return [assistant_text("", [{"name": "lookup_order", "arguments": '{"order_id": "M12345"}'}])] * len(prompts)

    replay(flaky, episodes, agent)
    assert seen and all("RuntimeError: tool down" in content for content in seen)


def test_the_base_model_replayed_as_the_agent_is_judged_per_episode():
    """The gate's path with the bundled model: a tool task with an environment is scored on whole episodes."""
    from adaptloop.model import ensure_base_model
    from adaptloop.settings import DEFAULT_HOME
    from adaptloop.trainers.evaluate import evaluate

    holdout = trajectories(3, seed=99, held_out=True)
    result = evaluate(SPEC, ensure_base_model(DEFAULT_HOME), holdout, max_new_tokens=48, threads=1)
    assert result.unit == "episode" and result.count == 3 and 0.0 <= result.score <= 1.0
    assert all(f["reason"] for f in result.failures)
