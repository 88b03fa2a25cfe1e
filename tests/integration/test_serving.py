"""Serving against the real components: vLLM (CPU) with the registry sidecar, the gateway, Tansu.

    HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_serving.py -m integration -v -s

``adaptloop serve`` and ``adaptloop gateway`` start once for the module as subprocesses (vLLM
takes about a minute on 2 cores); each test uses its own tenant so that tests do not depend on
one another's order. The adapter is a real peft LoRA on the base model, perturbed so that its
completions differ from the base's.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from adaptloop.artifacts import adapter_version, alias, artifact_digest
from adaptloop.kafka import DeliveryTracker, ensure_topics, read_ranges
from adaptloop.model import ensure_base_model
from adaptloop.processes import ManagedProcess
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, ModelSettings, Topics
from adaptloop.stack import free_port, service_env, start_broker, start_service

pytestmark = pytest.mark.integration

BASE = ModelSettings().name
SERVE_READY_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 120.0
PROMPT = [{"role": "user", "content": "Name three colours."}]


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

    def adapters(self) -> dict[str, Any]:
        return httpx.get(self.sidecar_url + "/adapters", timeout=5).json()

    def routes_to(self, model: str) -> str | None:
        """The adapter version the gateway's /v1/models says ``model`` routes to now."""
        data = httpx.get(self.gateway_url + "/v1/models", timeout=5).json()["data"]
        return next((m["adapter"] for m in data if m["id"] == model), None)

    def chat(self, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": PROMPT, "max_tokens": 12, "temperature": 0} | extra
        return httpx.post(self.gateway_url + "/v1/chat/completions", json=body, timeout=120)

    def publish(self, *, tenant: str, task: str, folder: Path, digest: str, state: str = "RELEASED",
                version: str | None = None, as_uri: bool = True) -> str:
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
            "created_at": int(time.time() * 1000),
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
                assert msg.key() == interaction_id.encode()
                return record
        raise AssertionError(f"interaction {interaction_id} is not on {topic}")


@pytest.fixture(scope="module")
def serving(kafka, tmp_path_factory) -> Serving:
    home = tmp_path_factory.mktemp("serving")
    topics = Topics(prefix=f"s{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, topics)
    ports = {name: free_port() for name in ("vllm", "sidecar", "gateway")}
    env = service_env(kafka, topics, home) | {
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
                  f"http://127.0.0.1:{ports['gateway']}", serve, gateway, serve_start_s, env)
    yield stack
    gateway_rc = stack.gateway.stop()
    serve_rc = stack.serve.stop()  # a test may have restarted it
    assert (gateway_rc, serve_rc) == (0, 0), f"exit codes gateway={gateway_rc} serve={serve_rc}"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A real LoRA (r=8 on q_proj/v_proj) of the base model, lora_B perturbed so outputs differ."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_base_model(DEFAULT_HOME), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    peft_model.save_pretrained(folder)
    return folder


def test_unknown_model_is_an_openai_404(serving):
    for model in ("no-such-model", "a/b/c", "/task"):
        response = serving.chat(model)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
        assert model in error["message"]


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
    assert record["request_messages"] == PROMPT
    assert record["response"] == body["choices"][0]["message"]["content"]
    assert record["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert record["completion_tokens"] == body["usage"]["completion_tokens"] > 0
    assert record["latency_ms"] > 0


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
    client = OpenAI(base_url=serving.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)
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


def test_digest_mismatch_is_refused_and_never_served(serving, adapter_dir):
    tenant, task = "mallory", "extract"
    wrong = "sha256:" + "0" * 64
    version = serving.publish(tenant=tenant, task=task, folder=adapter_dir, digest=wrong)
    reason = wait_for(lambda: serving.adapters()["refused"].get(version), LOAD_TIMEOUT_S, f"sidecar refuses {version}")
    assert "digest mismatch" in reason
    assert version not in serving.adapters()["loaded"]
    served = {m["id"] for m in httpx.get(serving.vllm_url + "/v1/models", timeout=10).json()["data"]}
    assert version not in served
    time.sleep(1.0)  # longer than the gateway's sidecar poll: it must still not route there
    response = serving.chat(alias(tenant, task))
    assert response.status_code == 200 and response.headers["x-adaptloop-adapter"] == "base"


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
    older = publisher.publish(tenant="t", task="a", folder=folder, digest=digest)
    newer = publisher.publish(tenant="t", task="a", folder=folder, digest="sha256:" + "1" * 64)
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


def test_unrecorded_interaction_is_an_error_not_an_answer(serving, tmp_path):
    """A gateway whose broker dies answers 503 in OpenAI's shape: no answer leaves without its record."""
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True, delivery_timeout_s=5)
    broker = start_broker(kafka, tmp_path)
    gateway = None
    try:
        topics = Topics(prefix=f"d{uuid.uuid4().hex[:10]}.")
        ensure_topics(kafka, topics)
        port = free_port()
        env = service_env(kafka, topics, tmp_path) | {
            "ADAPTLOOP_KAFKA_DELIVERY_TIMEOUT_S": "5",
            "ADAPTLOOP_GATEWAY_PORT": str(port),
            "ADAPTLOOP_GATEWAY_VLLM_URL": serving.vllm_url,
            "ADAPTLOOP_GATEWAY_SIDECAR_URL": serving.sidecar_url,
        }
        gateway = start_service("gateway", tmp_path, env, timeout_s=120)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": BASE, "messages": PROMPT, "max_tokens": 4}
        assert httpx.post(url, json=body, timeout=60).status_code == 200

        broker.kill()
        started = time.monotonic()
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "interaction_not_recorded"
        assert "choices" not in response.json()
        assert time.monotonic() - started < 30
    finally:
        if gateway is not None:
            assert gateway.stop() == 0
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
