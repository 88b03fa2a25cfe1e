"""The example tool task's judges and world, the chat rendering helpers, and streamed tool-call reassembly."""

from __future__ import annotations

import json

from adaptloop.chat import assistant_text, template_message
from adaptloop.serving.episodes import ToolCallAssembler, episode_of, request_messages, upstream_body
from adaptloop.support_task import SupportWorld, judge_episode, parse_turn, replay_world, right_turns, support_turn


def right(case, k):
    turn = case.expected_turns()[k]
    return assistant_text(turn.get("content"), turn.get("tool_calls") or ())


def test_the_turn_judge_wants_the_right_tools_arguments_and_facts():
    case = next(c for c in iter(SupportWorld(3).case, None) if c.intent == "refund")
    oid, total = case.order.order_id, case.order.total
    lookup, refund, answer = (right(case, k) for k in range(3))
    assert support_turn(lookup, lookup).ok and support_turn(refund, refund).ok and support_turn(answer, answer).ok
    assert not support_turn(refund, lookup).ok  # another tool
    wrong_amount = assistant_text("", [{"name": "refund", "arguments": json.dumps({"order_id": oid, "amount": total + 1})}])
    assert "wrong arguments" in support_turn(wrong_amount, refund).reason
    assert support_turn(f"Done: {total:.2f} refunded on {oid}.", answer).ok
    assert "misses" in support_turn(f"Refunded on {oid}.", answer).reason
    assert not support_turn("<tool_call>\n{not json}\n</tool_call>").ok and support_turn(lookup).ok
    assert not support_turn("").ok and "tool calls where the answer was due" in support_turn(lookup, answer).reason


def test_an_episode_is_judged_turn_by_turn_and_held_out_worlds_share_nothing():
    world = SupportWorld(5)
    case = world.case()
    turns = right_turns(case)
    assert judge_episode(turns, turns).ok
    assert "stopped after 1" in judge_episode(turns[:1], turns).reason
    assert judge_episode(["Sure!"], turns).reason.startswith("turn 1")
    train = [SupportWorld(7).case() for _ in range(300)]
    held = [SupportWorld(99, held_out=True).case() for _ in range(300)]
    assert not {c.order.order_id[0] for c in train} & {c.order.order_id[0] for c in held}
    assert not {c.order.customer for c in train} & {c.order.customer for c in held}
    assert world.execute("lookup_order", {"order_id": case.order.order_id})["total"] == case.order.total
    assert "error" in world.execute("refund", {"order_id": "nope"}) and "error" in world.execute("rm", {})


def test_assistant_text_is_what_the_template_renders_and_parses_back():
    calls = [{"id": "c1", "name": "lookup_order", "arguments": '{"order_id": "A12345"}'}]
    text = assistant_text("Checking.", calls)
    assert parse_turn(text) == ("Checking.", [("lookup_order", {"order_id": "A12345"})])
    assert template_message({"role": "assistant", "content": "", "tool_calls": calls})["tool_calls"][0]["function"] == {
        "name": "lookup_order", "arguments": {"order_id": "A12345"}}


def test_streamed_tool_call_deltas_are_reassembled_by_index():
    assembler = ToolCallAssembler()
    for deltas in ([{"index": 0, "id": "a", "function": {"name": "lookup_order", "arguments": ""}}],
                   [{"index": 0, "function": {"arguments": '{"order_'}}],
                   [{"index": 1, "id": "b", "function": {"name": "refund", "arguments": '{"order_id": "X"'}}],
                   [{"index": 0, "function": {"arguments": 'id": "X"}'}}, {"index": 1, "function": {"arguments": "}"}}],
                   None, ["junk"]):
        assembler.add(deltas)
    assert assembler.calls() == [{"id": "a", "name": "lookup_order", "arguments": '{"order_id": "X"}'},
                                 {"id": "b", "name": "refund", "arguments": '{"order_id": "X"}'}]


def test_episodes_from_headers_or_metadata_and_messages_as_recorded():
    named = episode_of("acme", {"x-adaptloop-episode": "run-1"}, {})
    same = episode_of("acme", {}, {"metadata": {"episode_id": "run-1", "episode_end": "true"}})
    other_tenant = episode_of("globex", {"x-adaptloop-episode": "run-1"}, {})
    fresh = episode_of("acme", {}, {})
    assert named.key == same.key != other_tenant.key and same.ended and not named.ended and named.named
    assert fresh.episode_id.startswith("ep-") and not fresh.named
    assert upstream_body({"model": "m", "metadata": {"episode_id": "x", "user": "u"}}) == {"model": "m", "metadata": {"user": "u"}}
    assert upstream_body({"model": "m", "metadata": {"episode_end": True}}) == {"model": "m"}
    recorded = request_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ok"}]}, "not a message"])
    assert recorded == [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "f", "arguments": "{}"}],
                         "tool_call_id": None, "name": None},
                        {"role": "tool", "content": "ok", "tool_calls": [], "tool_call_id": "c1", "name": None}]


def test_hostile_tool_call_arguments_are_text_not_a_crash():
    deep = "[" * 100_000 + "]" * 100_000
    text = assistant_text("", [{"id": "c", "name": "lookup_order", "arguments": deep}])
    assert text.startswith('<tool_call>\n{"name": "lookup_order", "arguments": [[[')
    assert not support_turn(text).ok


def test_offline_trajectories_are_the_per_turn_examples_a_reviewer_gives():
    """``adaptloop tool-offline`` trains on what curation gives when every turn is right or taken over: one example
    per turn, its prompt the trajectory so far (tool calls and their results), the right turn as its completion."""
    import json

    from adaptloop.ops.tool_offline import trajectories

    examples = trajectories(6)
    world = SupportWorld(7)
    cases = [world.case() for _ in range(6)]
    assert len(examples) == sum(len(c.expected_turns()) for c in cases)
    first, second = examples[0], examples[1]
    assert [m["role"] for m in first["prompt_messages"]] == ["user"] and first["completion_tool_calls"][0]["name"] == "lookup_order"
    assert [m["role"] for m in second["prompt_messages"]] == ["user", "assistant", "tool"]
    assert json.loads(second["prompt_messages"][2]["content"])["order_id"] == cases[0].order.order_id


def test_the_replay_environment_is_the_world_an_episodes_record_shows():
    """What the gate replays a held-out episode in: the orders its recorded lookups returned, executed by the
    task's own tools; an order the record never showed, or hostile tool results in the record, are errors or ignored."""
    from adaptloop.ops.tool_offline import trajectories

    last = trajectories(1, seed=99, held_out=True)[-1]
    execute = replay_world(last["prompt_messages"] + [{"role": "tool", "content": "[" * 50_000},
                                                      {"role": "tool", "content": '{"order_id": 1}'}])
    looked_up = json.loads(last["prompt_messages"][2]["content"])
    assert execute("lookup_order", {"order_id": looked_up["order_id"]}) == looked_up
    assert execute("refund", {"order_id": looked_up["order_id"], "amount": 1.5})["refunded"] == 1.5
    assert "error" in execute("lookup_order", {"order_id": "Z99999"}) and "error" in execute("lookup_order", "A1")
