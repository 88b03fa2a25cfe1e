"""Tool calling through the gateway on the real vLLM server (CPU, the bundled base model), with the official
OpenAI client: tool_choice none / auto / required / named, streamed and not, parallel_tool_calls, a
multi-turn episode with a tool's result, and what the interactions topic keeps of it all. The rendering
test checks that the tokens the trainer computes its loss on are the tokens vLLM renders.

    HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_tools.py -v -s
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from adaptloop.chat import prompt_tokens, tokens
from adaptloop.kafka import ensure_topics
from adaptloop.model import ensure_base_model
from adaptloop.ops.stack import free_port, service_env, start_service
from adaptloop.records import read_decoded
from adaptloop.serving.keys import dev_keys, plain_setting
from adaptloop.settings import DEFAULT_HOME, ModelSettings, Topics

pytestmark = pytest.mark.integration

BASE = ModelSettings().name
TENANT = "toolco"
TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Look up an order by its id.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "maxLength": 12}},
                       "required": ["order_id"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "refund", "description": "Refund an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "maxLength": 12},
                                                        "amount": {"type": "number"}},
                       "required": ["order_id", "amount"], "additionalProperties": False}}},
]
USER = [{"role": "user", "content": "Where is my order A1234?"}]
VLLM_KEY = "vllm-" + uuid.uuid4().hex
CATALOGUE = "tasks:\n  support:\n    system_prompt: You are a support agent.\n    validator: {kind: regex, pattern: '(?s).*'}\n"


@pytest.fixture(scope="module")
def stack(kafka, tmp_path_factory):
    home = tmp_path_factory.mktemp("tools")
    topics = Topics(prefix=f"tools{uuid.uuid4().hex[:8]}.")
    ensure_topics(kafka, topics)
    ports = {name: free_port() for name in ("vllm", "sidecar", "gateway")}
    keys = dev_keys([TENANT])
    env = service_env(kafka, topics, home) | {
        "ADAPTLOOP_GATEWAY_API_KEYS": plain_setting(keys), "ADAPTLOOP_TASKS_INLINE": CATALOGUE,
        "ADAPTLOOP_MODEL_PATH": str(ensure_base_model(DEFAULT_HOME)),
        "ADAPTLOOP_SERVE_PORT": str(ports["vllm"]), "ADAPTLOOP_SERVE_SIDECAR_PORT": str(ports["sidecar"]),
        "ADAPTLOOP_GATEWAY_PORT": str(ports["gateway"]),
        "ADAPTLOOP_GATEWAY_VLLM_URL": f"http://127.0.0.1:{ports['vllm']}",
        "ADAPTLOOP_GATEWAY_SIDECAR_URL": f"http://127.0.0.1:{ports['sidecar']}",
        # vLLM behind a key, as in deploy/k8s: the gateway sends it, nobody else has it.
        "ADAPTLOOP_SERVE_VLLM_API_KEY": VLLM_KEY, "ADAPTLOOP_GATEWAY_VLLM_API_KEY": VLLM_KEY,
    }
    serve = start_service("serve", home, env, timeout_s=600)
    try:
        gateway = start_service("gateway", home, env, timeout_s=120)
    except BaseException:
        serve.stop()
        raise
    try:
        yield {"kafka": kafka, "topics": topics, "vllm": env["ADAPTLOOP_GATEWAY_VLLM_URL"],
               "gateway": f"http://127.0.0.1:{ports['gateway']}", "key": keys[TENANT]}
    finally:
        gateway.stop()
        serve.stop()


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack["gateway"] + "/v1", api_key=stack["key"], max_retries=0, timeout=120)


def recorded(stack) -> list[dict]:
    """Every interaction on the topic so far."""
    return [p.record for p in read_decoded(stack["kafka"], stack["topics"].name("interactions"), "interaction", idle_s=1.0)]


def interactions(stack, ids: set[str], timeout_s: float = 30) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = {r["interaction_id"]: r for r in recorded(stack)}
        if ids <= set(got) or time.monotonic() > deadline:
            return {i: got[i] for i in ids if i in got}
        time.sleep(0.5)


def ask(client, *, stream: bool, **extra):
    """(interaction id, text, tool calls as [(id, name, arguments)], finish reason) through the gateway."""
    # Strict tool schemas (no extra keys, short ids) and room for a whole call: under required and named, vLLM's
    # grammar forces the call's shape, but the base model fills the values as it likes.
    body = dict(model=f"{TENANT}/support", messages=USER, tools=TOOLS, max_tokens=120, temperature=0) | extra
    if not stream:
        reply = client.chat.completions.create(**body)
        message = reply.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return reply.id, message.content or "", calls, reply.choices[0].finish_reason
    text, calls, finish, reply_id = "", {}, None, None
    for chunk in client.chat.completions.create(stream=True, **body):
        reply_id = chunk.id
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, ["", "", ""])
                entry[0] = delta.id or entry[0]
                entry[1] += (delta.function.name or "") if delta.function else ""
                entry[2] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    return reply_id, text, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_every_tool_choice_through_the_gateway_and_what_is_recorded(stack, client, stream):
    named = {"type": "function", "function": {"name": "refund"}}
    results = {choice: ask(client, stream=stream, tool_choice=choice)
               for choice in ("none", "auto", "required")}
    results["named"] = ask(client, stream=stream, tool_choice=named)
    results["single"] = ask(client, stream=stream, tool_choice="required", parallel_tool_calls=False)
    for choice, (iid, text, calls, finish) in results.items():
        print(f"[{'streamed' if stream else 'whole'}] {choice}: finish={finish} text={text[:60]!r} calls={calls}")
    assert results["none"][2] == [] and results["none"][1]
    for choice in ("required", "named", "single"):
        calls = results[choice][2]
        assert calls and all(json.loads(arguments) is not None for _, _, arguments in calls), (choice, calls)
        assert all(call_id for call_id, _, _ in calls)
    assert {name for _, name, _ in results["named"][2]} == {"refund"}
    assert set(json.loads(results["named"][2][0][2])) >= {"order_id", "amount"}
    assert len(results["single"][2]) == 1
    assert {name for _, name, _ in results["required"][2]} <= {"lookup_order", "refund"}
    # The record holds the tools, the request and the calls exactly as the client assembled them.
    records = interactions(stack, {iid for iid, *_ in results.values()})
    for choice, (iid, text, calls, _) in results.items():
        record = records[iid]
        assert json.loads(record["tools_json"]) == TOOLS
        assert [(c["id"], c["name"], c["arguments"]) for c in record["tool_calls"]] == calls, choice
        assert (record["response"] or "") == text
        assert record["turn"] == 1 and record["episode_id"].startswith("ep-") and record["session_id"] == record["episode_id"]
        assert record["attributes"]["stream"] == str(stream).lower()


def test_a_multi_turn_episode_with_tool_results_is_recorded_turn_by_turn(stack, client):
    episode = f"run-{uuid.uuid4().hex[:8]}"
    headers = {"x-adaptloop-episode": episode}
    first = client.chat.completions.with_raw_response.create(
        model=f"{TENANT}/support", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0,
        extra_headers=headers)
    assert first.headers["x-adaptloop-episode"] == episode
    reply = first.parse()
    call = reply.choices[0].message.tool_calls[0]
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"status": "shipped", "eta": "Friday"})}]
    # The second turn names its episode in the body's metadata instead, streams, and ends the episode.
    second_id, text, calls, _ = ask(client, stream=True, messages=history, tool_choice="none",
                                    metadata={"episode_id": episode, "episode_end": "true"})
    assert text and not calls
    records = interactions(stack, {reply.id, second_id})
    one, two = records[reply.id], records[second_id]
    assert (one["episode_id"], one["turn"], one["episode_end"]) == (episode, 1, False)
    assert (two["episode_id"], two["turn"], two["episode_end"]) == (episode, 2, True)
    assert one["session_id"] == two["session_id"] == episode
    # Both calls of the episode share a partition key: curation sees the episode on one partition.
    assert reply.id.split(".")[0] == second_id.split(".")[0]
    assistant, tool = two["request_messages"][-2:]
    assert [(c["id"], c["name"], c["arguments"]) for c in assistant["tool_calls"]] == [
        (call.id, call.function.name, call.function.arguments)]
    assert (tool["role"], tool["tool_call_id"]) == ("tool", call.id) and "shipped" in tool["content"]
    assert two["request_messages"][0] == {"role": "system", "content": "You are a support agent.", "tool_calls": [],
                                          "tool_call_id": None, "name": None}  # the task's prompt, added


def test_vllm_takes_only_its_key_and_the_gateway_sends_it(stack, client):
    """vLLM (runtime LoRA loading on) refuses a call without its key, including a load; through the gateway, which
    holds the key, a tenant's call is served."""
    for path, body in (("/v1/models", None), ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})):
        response = (httpx.get if body is None else httpx.post)(stack["vllm"] + path, timeout=30,
                                                                **({"json": body} if body else {}))
        assert response.status_code == 401, (path, response.status_code, response.text[:200])
    assert httpx.get(stack["vllm"] + "/v1/models", timeout=30,
                     headers={"authorization": f"Bearer {VLLM_KEY}"}).status_code == 200
    assert client.chat.completions.create(model=f"{TENANT}/support", messages=USER, max_tokens=4).choices


def test_a_bad_episode_id_is_a_400(stack):
    response = httpx.post(stack["gateway"] + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {stack['key']}", "x-adaptloop-episode": "x" * 500},
                          json={"model": f"{TENANT}/support", "messages": USER, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_episode"


def test_the_trainer_renders_the_tokens_vllm_renders(stack):
    """Token for token: the prompt vLLM tokenizes for each assistant turn is the trainer's prefix before that
    turn, and the whole conversation is the trainer's ids; the loss mask covers the assistant's tokens only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_base_model(DEFAULT_HOME)))
    conversation = [
        {"role": "system", "content": "You are a support agent."}, *USER,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "name": "lookup_order", "arguments": json.dumps({"order_id": "A1234"})},
            {"id": "call_2", "name": "refund", "arguments": json.dumps({"order_id": "A1234", "amount": 12.5})}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "lost"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"refunded": 12.5}'},
        {"role": "assistant", "content": "Your parcel was lost, so I refunded 12.50."},
    ]
    ours = tokens(tokenizer, conversation, TOOLS)

    def vllm_tokens(messages, generation_prompt):
        wire = [dict(m, tool_calls=[{"id": c["id"], "type": "function", "function": {
            "name": c["name"], "arguments": c["arguments"]}} for c in m["tool_calls"]]) if m.get("tool_calls") else m
            for m in messages]
        response = httpx.post(stack["vllm"] + "/tokenize", timeout=30, headers={"authorization": f"Bearer {VLLM_KEY}"}, json={
            "model": BASE, "messages": wire, "tools": TOOLS, "add_generation_prompt": generation_prompt})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert vllm_tokens(conversation, False) == ours.input_ids
    for turn in (2, 5):  # each assistant turn: vLLM's prompt there is our prefix, and our loss starts right after
        prompt = vllm_tokens(conversation[:turn], True)
        assert prompt == prompt_tokens(tokenizer, conversation[:turn], TOOLS) == ours.input_ids[:len(prompt)]
        assert ours.assistant_mask[len(prompt) - 1] == 0 and ours.assistant_mask[len(prompt)] == 1
    marked = tokenizer.decode([t for t, m in zip(ours.input_ids, ours.assistant_mask) if m])
    assert marked == ('<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A1234"}}\n</tool_call>\n'
                      '<tool_call>\n{"name": "refund", "arguments": {"order_id": "A1234", "amount": 12.5}}\n</tool_call>'
                      '<|im_end|>Your parcel was lost, so I refunded 12.50.<|im_end|>')


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_parallel_tool_calls_come_back_as_separate_calls_and_are_recorded(stack, client, stream):
    """Two calls in one turn, as an agent that looks up two orders at once makes them. The base model learns the
    pattern from the conversation (an earlier turn where the agent did just that); vLLM's parser returns each
    call with its own id, the gateway passes them (streamed: by index) and the record holds both. The results
    go back as two ``tool`` messages in one next request."""
    def calls_for(*orders):
        return [{"id": f"call_{o}", "type": "function", "function": {"name": "lookup_order",
                                                                     "arguments": json.dumps({"order_id": o})}}
                for o in orders]

    earlier = [{"role": "user", "content": "Where are my orders A1111 and B2222?"},
               {"role": "assistant", "content": None, "tool_calls": calls_for("A1111", "B2222")},
               {"role": "tool", "tool_call_id": "call_A1111", "content": '{"status": "shipped"}'},
               {"role": "tool", "tool_call_id": "call_B2222", "content": '{"status": "lost"}'},
               {"role": "assistant", "content": "A1111 is shipped and B2222 is lost."},
               {"role": "user", "content": "Where are my orders C3333 and D4444?"}]
    iid, _, calls, finish = ask(client, stream=stream, messages=earlier, tool_choice="auto")
    print(f"[{'streamed' if stream else 'whole'}] parallel: finish={finish} calls={calls}")
    assert [(name, json.loads(arguments)) for _, name, arguments in calls] == [
        ("lookup_order", {"order_id": "C3333"}), ("lookup_order", {"order_id": "D4444"})]
    assert len({call_id for call_id, _, _ in calls}) == 2 and finish == "tool_calls"
    record = interactions(stack, {iid})[iid]
    assert [(c["id"], c["name"], c["arguments"]) for c in record["tool_calls"]] == calls
    results = earlier + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        for call_id, name, arguments in calls]}] + [
        {"role": "tool", "tool_call_id": call_id, "content": '{"status": "shipped"}'} for call_id, _, _ in calls]
    second, text, more, _ = ask(client, stream=stream, messages=results, tool_choice="none")
    assert text and not more
    sent = interactions(stack, {second})[second]["request_messages"]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"][-2:] == [call_id for call_id, _, _ in calls]


def test_an_openai_agents_sdk_agent_runs_its_own_loop_through_the_gateway(stack):
    """The OpenAI Agents SDK unchanged (its Runner, streamed, its Chat Completions model on an AsyncOpenAI client at
    the gateway, a ``function_tool``): the first turn must call the tool (``tool_choice="required"``, which the SDK
    then resets to auto), the SDK runs it and sends the result back, and every turn is recorded in one episode,
    numbered, with its tool calls and the result the SDK sent."""
    import asyncio

    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner, function_tool
    from agents.exceptions import MaxTurnsExceeded
    from openai import AsyncOpenAI

    episode = f"agents-sdk-{uuid.uuid4().hex[:8]}"
    looked_up: list[str] = []

    @function_tool
    def lookup_order(order_id: str) -> str:
        """Look up an order by its id."""
        looked_up.append(order_id)
        return json.dumps({"order_id": order_id, "status": "shipped", "eta": "Friday"})

    async def run() -> str:
        client = AsyncOpenAI(base_url=stack["gateway"] + "/v1", api_key=stack["key"], max_retries=0, timeout=120)
        agent = Agent(name="support", tools=[lookup_order],
                      model=OpenAIChatCompletionsModel(model=f"{TENANT}/support", openai_client=client),
                      model_settings=ModelSettings(temperature=0, max_tokens=120, tool_choice="required",
                                                   extra_headers={"x-adaptloop-episode": episode}))
        result = Runner.run_streamed(agent, input=USER[0]["content"], max_turns=3,
                                     run_config=RunConfig(tracing_disabled=True))
        try:
            async for _ in result.stream_events():
                pass
        except MaxTurnsExceeded:  # the base model may keep calling the tool: the loop is the SDK's, not ours
            return "(the SDK's turn limit)"
        finally:
            await client.close()
        return str(result.final_output)

    answer = asyncio.run(run())
    print(f"Agents SDK: looked up {looked_up} -> {answer!r}")
    assert looked_up, "the SDK ran no tool"
    deadline = time.monotonic() + 30
    while True:
        records = [r for r in recorded(stack) if r["episode_id"] == episode]
        if len(records) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    records.sort(key=lambda r: r["turn"])
    assert len(records) >= 2 and [r["turn"] for r in records] == list(range(1, len(records) + 1))
    first, second = records[0], records[1]
    assert first["tool_calls"][0]["name"] == "lookup_order" and all(r["attributes"]["stream"] == "true" for r in records)
    assert "lookup_order" in first["tools_json"]
    sent = [m for m in second["request_messages"] if m["role"] == "tool"]
    assert sent and sent[0]["tool_call_id"] == first["tool_calls"][0]["id"] and "shipped" in sent[0]["content"]
