"""Feedback over HTTP and hostile bodies at a real gateway process on a real broker (no model server needed:
everything here is decided before a call would go upstream).

    HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_feedback.py -v
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from adaptloop.errors import FeedbackError
from adaptloop.kafka import read_ranges
from adaptloop.ops.stack import free_port, service_env, start_service
from adaptloop.records import read_decoded
from adaptloop.sdk import FeedbackClient, episode_key, outcome_key
from adaptloop.serving.feedback import InteractionIds
from adaptloop.serving.keys import dev_keys, plain_setting

pytestmark = pytest.mark.integration

SECRET = "feedback-test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def gateway(kafka, module_topics, tmp_path_factory):
    home = tmp_path_factory.mktemp("feedback")
    keys = dev_keys(["acme", "globex"])
    port = free_port()
    env = service_env(kafka, module_topics, home) | {
        "ADAPTLOOP_GATEWAY_PORT": str(port),
        "ADAPTLOOP_GATEWAY_VLLM_URL": f"http://127.0.0.1:{free_port()}",     # nothing listens: not needed here
        "ADAPTLOOP_GATEWAY_SIDECAR_URL": f"http://127.0.0.1:{free_port()}",
        "ADAPTLOOP_GATEWAY_API_KEYS": plain_setting(keys),
        "ADAPTLOOP_GATEWAY_ID_SECRET": SECRET,
        "ADAPTLOOP_GATEWAY_MAX_BODY_BYTES": str(256 * 1024),
        "ADAPTLOOP_GATEWAY_MAX_CORRECTION_CHARS": "2000",
    }
    process = start_service("gateway", home, env, timeout_s=90)
    try:
        yield f"http://127.0.0.1:{port}", keys, module_topics
    finally:
        process.stop()


def outcomes(kafka, topics) -> list[dict]:
    return [p.record for p in read_decoded(kafka, topics.name("outcomes"), "outcome", idle_s=1.0)]


def post(url: str, key: str | None, body, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    auth = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(url + "/v1/feedback", content=content, timeout=10,
                      headers={"content-type": "application/json"} | auth | headers)


def test_bad_feedback_gets_a_clear_4xx_and_records_nothing(kafka, gateway):
    url, keys, topics = gateway
    ids = InteractionIds(SECRET.encode())
    mine, theirs = ids.new("acme", episode_key("acme", uuid.uuid4().hex)), ids.new("globex", episode_key("globex", uuid.uuid4().hex))
    good = {"interaction_id": mine, "source": "HUMAN", "success": True}
    bad = {
        "no key": (None, good, 401),
        "a malformed key": ("not-a-key", good, 401),
        "another tenant's key shape": ("alk_globex_" + "0" * 40, good, 401),
        "not JSON": (keys["acme"], b"{interaction_id: 1", 400),
        "invalid UTF-8": (keys["acme"], b'{"interaction_id": "\xff\xfe", "source": "HUMAN", "success": true}', 400),
        "nested 10000 deep": (keys["acme"], b"[" * 10_000 + b"]" * 10_000, 400),
        "nested inside a field": (keys["acme"], {**good, "reason": None, "correction": json.loads("[" * 50 + "]" * 50)}, 400),
        "a list, not an object": (keys["acme"], [good], 400),
        "missing id": (keys["acme"], {"source": "HUMAN", "success": True}, 400),
        "id of the wrong type": (keys["acme"], {**good, "interaction_id": 42}, 400),
        "unknown source": (keys["acme"], {**good, "source": "ORACLE"}, 400),
        "success as a string": (keys["acme"], {**good, "success": "yes"}, 400),
        "score out of range": (keys["acme"], {**good, "score": 7.5}, 400),
        "score not finite": (keys["acme"], b'{"interaction_id": "%s", "source": "HUMAN", "score": NaN}' % mine.encode(), 400),
        "no verdict at all": (keys["acme"], {"interaction_id": mine, "source": "HUMAN"}, 400),
        "unknown field": (keys["acme"], {**good, "tenant": "globex"}, 400),
        "oversized correction": (keys["acme"], {**good, "correction": "x" * 2001}, 400),
        "correction of the wrong role": (keys["acme"], {**good, "correction": {"role": "user", "content": "x"}}, 400),
        "event time in the future": (keys["acme"], {**good, "event_time": 9_999_999_999_999}, 400),
        "an interaction and an episode": (keys["acme"], {**good, "episode_id": "e1"}, 400),
        "an empty corrected message": (keys["acme"], {**good, "correction": {"role": "assistant", "content": None}}, 400),
        "a corrected tool call without a name": (keys["acme"], {**good, "correction": {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"arguments": "{}"}}]}}, 400),
        "another tenant's interaction": (keys["acme"], {**good, "interaction_id": theirs}, 404),
        "a made-up id": (keys["acme"], {**good, "interaction_id": "0" * 32 + "-" + "0" * 20}, 404),
        "an id without a tag": (keys["acme"], {**good, "interaction_id": "3f2c9a77-1b2d-4c1e-9d3f-0a1b2c3d4e5f"}, 404),
        "a body over the limit": (keys["acme"], b'{"reason": "' + b"x" * 300_000 + b'"}', 413),
    }
    for name, (key, body, status) in bad.items():
        response = post(url, key, body)
        error = response.json()["error"]
        print(f"{name}: {response.status_code} {error['message'][:100]}")
        assert response.status_code == status, (name, response.text[:300])
        assert error["message"] and error["type"], name
    assert outcomes(kafka, topics) == []


def test_feedback_is_recorded_once_safe_in_either_mode_and_through_the_sdk(kafka, gateway):
    url, keys, topics = gateway
    ids = InteractionIds(SECRET.encode())
    first, second, third, fourth = (ids.new("acme", episode_key("acme", uuid.uuid4().hex)) for _ in range(4))
    outbox = post(url, keys["acme"], {"interaction_id": first, "source": "human", "success": False,
                                      "correction": {"role": "assistant", "content": "refund"},
                                      "labeler": "agent-7", "reason": "it asked for its money back"})
    ack = post(url, keys["acme"], {"interaction_id": second, "source": "BUSINESS", "score": 0.25, "outcome_id": "o-2"},
               **{"x-adaptloop-record": "ack"})
    assert (outbox.status_code, ack.status_code) == (202, 202), (outbox.text, ack.text)
    assert ack.json() == {"object": "feedback", "id": "o-2", "interaction_id": second, "episode_id": None,
                          "status": "accepted"}
    corrected_call = post(url, keys["acme"], {"interaction_id": fourth, "source": "HUMAN", "success": False,
                                              "correction": {"role": "assistant", "content": None, "tool_calls": [
                                                  {"id": "c1", "type": "function", "function": {
                                                      "name": "refund", "arguments": {"order_id": "A1"}}}]}})
    assert corrected_call.status_code == 202, corrected_call.text
    with FeedbackClient(url + "/v1", keys["acme"]) as client:
        sdk_id = client.feedback(third, source="VALIDATOR", success=True, reason="schema ok")
        episode_outcome = client.feedback(episode_id="run-9", source="BUSINESS", success=True, reason="order completed")
        with pytest.raises(FeedbackError) as refused:
            client.feedback(ids.new("globex", episode_key("globex", uuid.uuid4().hex)), source="HUMAN", success=True)
    assert refused.value.status == 404
    recorded = outcomes(kafka, topics)
    got = {o["interaction_id"] or o["episode_id"]: o for o in recorded}
    assert set(got) == {first, second, third, fourth, "run-9"}
    assert got["run-9"]["outcome_id"] == episode_outcome and got["run-9"]["interaction_id"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in got[fourth]["correction_tool_calls"]] == [
        ("refund", {"order_id": "A1"})] and got[fourth]["correction"] is None
    assert got[first]["correction"] == "refund" and got[first]["source"] == "HUMAN" and got[first]["success"] is False
    assert (got[first]["labeler"], got[first]["reason"]) == ("agent-7", "it asked for its money back")
    assert got[second]["score"] == 0.25 and got[second]["success"] is None and got[second]["outcome_id"] == "o-2"
    assert got[third]["outcome_id"] == sdk_id and all(o["tenant"] == "acme" for o in got.values())
    # Each outcome is keyed where what it judges is: its call's episode, or the episode it names.
    topic = topics.name("outcomes")
    keys_of = {m.key().decode() for m in read_ranges(kafka, topic, idle_s=1.0)}
    assert keys_of == {outcome_key(o) for o in recorded} and episode_key("acme", "run-9") in keys_of


def test_hostile_completion_bodies_are_4xx_not_500(gateway):
    url, keys, _ = gateway
    auth = {"authorization": f"Bearer {keys['acme']}", "content-type": "application/json"}
    chat = url + "/v1/chat/completions"
    cases = {
        "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, {}, 400),
        "invalid UTF-8": (b'{"model": "\xff", "messages": []}', {}, 400),
        "over the body limit": (b'{"model": "x", "messages": [], "pad": "' + b"x" * 300_000 + b'"}', {}, 413),
        "messages not a list": (json.dumps({"model": "acme/order-extract", "messages": "hi"}).encode(), {}, 400),
        "a task outside the catalogue": (json.dumps({"model": "acme/unknown-task", "messages": [
            {"role": "user", "content": "hi"}]}).encode(), {}, 404),
        "an unknown task header": (json.dumps({"model": "smollm2-135m-instruct", "messages": [
            {"role": "user", "content": "hi"}]}).encode(), {"x-adaptloop-task": "y" * 5000}, 400),
    }
    for name, (content, headers, status) in cases.items():
        response = httpx.post(chat, content=content, headers=auth | headers, timeout=10)
        print(f"{name}: {response.status_code} {response.text[:120]}")
        assert response.status_code == status, (name, response.text[:300])
        assert response.json()["error"]["message"]
    models = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()["data"]
    assert {"acme/order-extract", "acme/ticket-triage"} <= {m["id"] for m in models}
