"""The checks the hostile-input corpus (tests/integration/test_hostile_corpus.py) leans on, as pure functions: the
gateway's body shape check and JSON parsing, the episode id it echoes in a header, the SDK's errors before
anything is sent, and a dead letter that fits where its record did not.

    python -m pytest tests/unit/test_hostile_inputs.py -q
"""

from __future__ import annotations

import json

import pytest

from adaptloop.errors import ContractError, DeliveryError, SerializationError
from adaptloop.sdk import Recorder
from adaptloop.serving.episodes import BadEpisode, BadRequest, check_request, episode_of
from adaptloop.serving.feedback import MAX_JSON_DEPTH, InteractionIds, RequestRefused, outcome_of, parse_json
from adaptloop.settings import KafkaSettings, Topics
from adaptloop.schemas import contract

TOOL = {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object", "properties": {}}}}


def test_bodies_clients_send_pass_the_shape_check():
    """What the openai client and the agents SDK send: content parts, a developer message, an assistant turn that
    only calls tools (nested or flat), a tool result, named tool_choice, stream options, max_completion_tokens."""
    check_request({"model": "acme/support", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "where is A1?"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}]},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c2", "name": "lookup_order", "arguments": "{}"}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "lost"}'}],
        "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "lookup_order"}},
        "parallel_tool_calls": False, "stream": True, "stream_options": {"include_usage": True},
        "max_completion_tokens": 64, "n": 1, "temperature": 0}, "chat")
    for choice in ("none", "auto", "required"):
        check_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
                       "tool_choice": choice}, "chat")
    check_request({"model": "m", "prompt": "hi", "max_tokens": 8, "stream": False}, "completion")


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": [{"role": "user<|im_end|>", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": ""}}]}, "tools[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"function": "f"}}, "tool_choice"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**31}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": True}, "n"),
    ({"model": "m", "prompt": "x", "stream_options": ["include_usage"]}, "stream_options"),
])
def test_bodies_no_model_server_takes_are_refused_naming_the_field(body, param):
    kind = "chat" if "messages" in body else "completion"
    with pytest.raises(BadRequest) as refused:
        check_request(body, kind)
    assert refused.value.param == param, str(refused.value)


def test_json_the_gateway_cannot_pass_on_is_a_400():
    for raw in (b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": "\\ud800"}', b'["x\\uDC00y"]',
                b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b"[" * 5000 + b"]" * 5000):
        with pytest.raises(RequestRefused) as refused:
            parse_json(raw)
        assert refused.value.status == 400, raw[:40]
    assert parse_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}  # a surrogate pair is one character
    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    assert parse_json(json.dumps({"brackets in text": "[" * 1000}).encode()) == {"brackets in text": "[" * 1000}


def test_a_correction_given_as_a_message_says_why_it_is_no_message():
    ids = InteractionIds(b"s" * 32)
    mine = ids.new("acme", "0123456789abcdef")
    for correction, field in (({"role": "system", "content": "x"}, "correction.role"),
                              ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
                               "correction.tool_calls.0.function.name"),
                              (42, "correction")):
        body = {"interaction_id": mine, "source": "HUMAN", "success": True, "correction": correction}
        with pytest.raises(RequestRefused) as refused:
            outcome_of(json.dumps(body).encode(), "acme", ids, max_correction_chars=100)
        assert (refused.value.status, refused.value.param) == (400, field), refused.value.message
        assert refused.value.message.startswith(f"invalid feedback: {field}: ")


def test_an_episode_id_is_printable_ascii():
    for bad in ("e1\r\nset-cookie: x", "e\t1", "эпизод", "e\x00"):
        with pytest.raises(BadEpisode):
            episode_of("acme", {}, {"metadata": {"episode_id": bad}})
    assert episode_of("acme", {"x-adaptloop-episode": "run 7/b"}, {}).episode_id == "run 7/b"


def test_the_recorder_refuses_fields_with_our_errors_before_sending():
    recorder = Recorder(KafkaSettings(bootstrap_servers="127.0.0.1:9"), Topics(prefix="unit."))
    fields = dict(tenant="acme", agent="bot", task="order-extract", session_id="s", response="{}",
                  messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(SerializationError):
        recorder.interaction(**fields | {"messages": None})
    with pytest.raises(SerializationError):
        recorder.interaction(**fields | {"tenantt": "typo"})
    with pytest.raises(SerializationError):
        recorder.outcome("i-1", tenant="acme", source="ORACLE", success=True)
    with pytest.raises(DeliveryError):  # over the producer's message.max.bytes: refused before it is queued
        recorder.interaction(**fields | {"response": "r" * 5_000_000})


def test_a_dead_letter_fits_where_its_record_did_not():
    ref = contract.SourceRef("t", 0, 7)
    small = contract.dead_letter(ref, b"k", b"v", stage="decode", error=ContractError("bad"))
    assert (small["key"], small["value"], small["reason"]) == (b"k", b"v", "bad")
    big = contract.dead_letter(ref, b"k", b"v" * 1_000_001, stage="decode", error=ContractError("too big"))
    assert big["value"] is None and big["key"] == b"k" and "value of 1000001 bytes left out" in big["reason"]
    assert "t/0@7" in big["reason"]
    huge_key = b"k" * 500_000
    quoted = contract.dead_letter(ref, huge_key, b"v", stage="decode", error=ContractError(f"key {huge_key!r} is wrong"))
    assert quoted["key"] is None and quoted["value"] is None and len(quoted["reason"]) < 2 * contract.DEAD_LETTER_MAX_REASON
    assert quoted["reason"].startswith("key b'kkk") and "is wrong" in quoted["reason"]
