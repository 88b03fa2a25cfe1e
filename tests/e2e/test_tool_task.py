"""A tool-using agent learns through the whole loop: the example catalogue's ``support-agent`` task (four
tools, a generated world of customers and orders), driven with the official OpenAI client through the
gateway as an agent loop (call, run the tools, send their results back), a reviewer's verdict on every
turn over HTTP (the right tool calls when a turn was wrong, then the episode's verdict), curation of the
turns and episodes, SFT on the trajectories, the gate replaying held-out episodes with the candidate
as the agent in the task's environment, hot-loading, routing.

    HF_HUB_OFFLINE=1 python -m pytest tests/e2e/test_tool_task.py -v -s

Held out by construction: the episodes the served agent is measured on come from a world with other
customers, other order-id letters, other items and addresses, and other sentence templates.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from adaptloop.ops.tool_loop import TASK, TENANT, ToolLoop, tool_stack
from adaptloop.records import read_topic
from adaptloop.sdk import FeedbackClient
from adaptloop.support_task import TOOLS, SupportWorld

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

HELD_OUT_EPISODES = 12  # adaptloop tool-bench measures 20; CI time is the bound here
STEP_LIMIT_ANSWER = "Sorry, need more steps to process this request."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The stack; the base's held-out episode success; one cycle of the loop until the adapter serves; after."""
    with tool_stack(tmp_path_factory.mktemp("tool-task") / "stack").start(progress=print) as stack:
        loop = ToolLoop(stack, tenant=TENANT, task=TASK, held_out_episodes=HELD_OUT_EPISODES)
        before = loop.measure(turns=False)  # turn by turn too: adaptloop tool-bench (CI time is the bound here)
        print(f"\nbase on {HELD_OUT_EPISODES} held-out episodes: {before['success']:.0%} episode success, "
              f"e.g. {before['failures'][:2]}")
        cycle = loop.cycle()
        print(f"{cycle['episodes']} reviewed episodes in {cycle['traffic_s']:.0f}s -> {cycle['request']}; "
              f"{cycle['decision']} {cycle['version']}: {cycle['reason'][:300]}")
        assert cycle["decision"] == "RELEASED", cycle["reason"]
        after = loop.measure(turns=False)
        print(f"released adapter on the same held-out episodes: {after['success']:.0%} episode success "
              f"(base {before['success']:.0%}), e.g. {after['failures'][:2]}")
        yield {"stack": stack, "key": loop.key, "before": before, "after": after, "cycle": cycle}


def test_a_tool_using_agent_learns_its_episodes_through_the_loop(trained):
    """Whole held-out episodes (every turn right, the agent on its own, new customers, orders and wording) go from
    the base's rate to far above it after one cycle. The issue's target is 90% of episodes; one cycle of this
    135M model's training reached 80-85% of 20 held-out episodes offline (adaptloop tool-offline, two seeds)."""
    before, after, gate = trained["before"], trained["after"], trained["cycle"]["gate"]
    # The gate judged whole held-out episodes, the candidate replayed as the agent in the task's environment.
    assert gate["metric"].startswith("episode_success:python:support-agent@"), gate
    assert before["success"] <= 0.1, before
    assert after["success"] >= before["success"] + 0.5, (before, after)


def test_a_langgraph_agent_runs_its_own_loop_through_the_gateway_and_the_episode_is_curated(trained):
    """LangGraph's ReAct agent (its own loop, streaming) on ChatOpenAI pointed at the gateway: its tool calls reach
    its tools, every turn is recorded in one episode, and an episode-level verdict over HTTP curates it."""
    from langchain_core.tools import StructuredTool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    stack, key = trained["stack"], trained["key"]
    world = SupportWorld(1234, held_out=True)
    case = next(c for c in iter(world.case, None) if c.intent == "refund")
    episode = f"langgraph-{uuid.uuid4().hex[:8]}"
    ran: list[tuple[str, dict]] = []

    def tool(definition: dict) -> StructuredTool:
        name = definition["function"]["name"]

        def run(**arguments):
            ran.append((name, arguments))
            return json.dumps(world.execute(name, arguments))
        return StructuredTool.from_function(func=run, name=name, description=definition["function"]["description"],
                                            args_schema=definition["function"]["parameters"])

    llm = ChatOpenAI(base_url=stack.ports.gateway_url + "/v1", api_key=key, model=f"{TENANT}/{TASK}", temperature=0,
                     max_tokens=64, streaming=True, max_retries=0, timeout=180,
                     default_headers={"x-adaptloop-episode": episode}).bind_tools(TOOLS)
    agent = create_react_agent(llm, [tool(t) for t in TOOLS])
    result = agent.invoke({"messages": [("user", case.request)]}, {"recursion_limit": 12})
    answer = result["messages"][-1].content
    # At its step limit LangGraph answers with a message of its own instead of the model's last one.
    model_turns = [m for m in result["messages"] if m.type == "ai" and m.content != STEP_LIMIT_ANSWER]
    print(f"LangGraph: {case.request!r} -> tools {[n for n, _ in ran]} -> {answer!r}")
    # The agent's own loop ran through the gateway: the adapter called tools (streamed), LangGraph ran them and
    # sent their results back, and the adapter saw them on the next turn (the loop may also end at LangGraph's
    # step limit, with calls it did not run: whether the adapter's choices are right is the other test's).
    called = [(c["name"], c["args"]) for m in model_turns for c in m.tool_calls]
    assert ran and ran[0][0] == "lookup_order" and called[:len(ran)] == ran and len(model_turns) >= 2

    records = sorted((r for r in read_topic(stack.kafka, stack.topics, "interactions", "interaction")
                      if r["episode_id"] == episode), key=lambda r: r["turn"])
    assert [r["turn"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) - len(model_turns) in (0, 1)  # 1: the call LangGraph's step limit answered for
    # Every streamed tool call was reassembled whole in the record, as LangGraph received it: the calls it
    # parsed with the same arguments, and a call cut off by the token limit (LangChain's invalid_tool_calls) as
    # the text that came.
    for record, message in zip(records, model_turns):
        received = [(c["name"], c["args"]) for c in message.tool_calls] + [
            (c["name"], c["args"]) for c in message.invalid_tool_calls]
        recorded = [(c["name"], c["arguments"]) for c in record["tool_calls"]]
        assert [n for n, _ in recorded] == [n for n, _ in received], (recorded, received)
        for (_, arguments), (_, args) in zip(recorded, received):
            assert (json.loads(arguments) if isinstance(args, dict) else arguments) == args
    assert all(r["attributes"]["stream"] == "true" for r in records)
    with FeedbackClient(stack.ports.gateway_url, key) as feedback:
        feedback.feedback(episode_id=episode, source="BUSINESS", success=True, reason="the customer got the refund")
    deadline = time.monotonic() + 120
    while True:
        curated = [e for e in read_topic(stack.kafka, stack.topics, "curated", "curated_example")
                   if e["episode_id"] == episode and e["scope"] == "EPISODE"]
        if curated or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert curated and curated[0]["turn"] == len(records), curated
    assert [m["role"] for m in curated[0]["prompt_messages"]].count("tool") == len(ran)  # every result it was sent


def listening_sockets() -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket on the host (``ss -ltnpH``)."""
    import re
    import subprocess

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [(line.split()[3], int(pid)) for line in out.splitlines() for pid in re.findall(r"pid=(\d+)", line)]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def descendants(pid: int) -> set[int]:
    import subprocess

    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=30).stdout.split()
    return {pid}.union(*(descendants(int(c)) for c in children))


def test_the_local_stack_listens_on_loopback_only(trained):
    """Every socket the stack's processes (and everything they started: vLLM's workers, the Faust worker) listen
    on is on loopback, except Ray's: Ray 2.60's core gRPC servers bind every interface even when its node address
    is 127.0.0.1 (see trainers/README.md, "Local Ray"), so they are listed, not hidden."""
    stack = trained["stack"]
    ours = set().union(*(descendants(p.pid) for p in stack.processes if p.pid))
    # Ray's processes, and the trainer, which runs Ray's driver (its core worker's gRPC server) in-process and
    # listens on nothing of its own.
    trainer = {p.pid for p in stack.processes if p.name == "trainer"}
    ray = trainer | {pid for pid in ours if "ray" in command_line(pid).lower()}
    listening = [(address, pid) for address, pid in listening_sockets() if pid in ours]
    assert listening, "no listening socket of the stack found"
    loopback = ("127.", "[::1]:", "[::ffff:127.")
    exposed = [(address, pid) for address, pid in listening if not address.startswith(loopback) and pid not in ray]
    print(f"{len(listening)} listening sockets of {len(ours)} processes; Ray's beyond loopback: "
          f"{sorted(a for a, p in listening if p in ray and not a.startswith(loopback))}")
    assert exposed == [], exposed
