"""Holdout evaluation: greedy generation (vLLM, else transformers + peft for an adapter), judged by the task.

score = share of holdout examples whose generated answer the task's validator accepts against the
example's completion; for a tool task with an environment, share of held-out episodes the model, replayed
as the agent there, gets right by the task's episode judge. The incumbent is the newest RELEASED/PROMOTED adapter of the (tenant, task)
on the releases topic, or the base model. A result keeps each item's verdict in holdout order (``verdicts``, named
by ``items``): candidate and incumbent answer the same holdout, so the gate compares them pair by pair.
The trainer evaluates through its vLLM server when it names one (``trainers.vllm_eval``: adapters shadow-loaded
there, many requests batched), with transformers here only when that server cannot; ``engine`` says which.

Ready-to-paste (base vs an adapter on 40 generated order-extract cases)::

    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.evaluate --cases 40 --seed 99
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.evaluate --cases 40 --seed 99 --adapter /tmp/adaptloop-sft
    # the same through a running vLLM (adaptloop serve), the adapter shadow-loaded and unloaded after:
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.evaluate --cases 40 --seed 99 --adapter /tmp/adaptloop-sft \
        --vllm-url http://127.0.0.1:18000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from adaptloop.schemas.contract import SERVABLE
from adaptloop.tasks import TaskSpec

log = logging.getLogger(__name__)

BASE = "base"
DEFAULT_EVAL_BATCH = 16


@dataclass(frozen=True)
class Incumbent:
    """What a candidate is compared against: an adapter version with its folder, or the base model."""

    version: str = BASE
    artifact_uri: str | None = None
    digest: str | None = None
    base_model_digest: str | None = None


@dataclass(frozen=True)
class EvalResult:
    name: str
    score: float
    count: int
    passed: int
    seconds: float
    failures: list[dict] = field(default_factory=list)
    mean_score: float = 0.0  # the validator's partial credit (e.g. share of right fields), a registered metric
    unit: str = "example"  # what count counts: held-out examples, or episodes replayed in the task's environment
    #: Each holdout item's verdict, in holdout order: two results on the same holdout pair up item by item
    #: (the gate's paired test), and ``items`` names the item each verdict is of.
    verdicts: tuple[bool, ...] = ()
    items: tuple[str, ...] = ()  # example ids (else "#<position>"), or episode ids for episodes
    engine: str = "transformers"  # what generated the answers: "vllm" (``trainers.vllm_eval``) or "transformers"
    fallback: str = ""  # why transformers evaluated although a vLLM server was named


@dataclass(frozen=True)
class EvalJob:
    """One evaluation of :func:`evaluate_many`: the base model, or ``adapter_dir`` on it, on ``holdout``."""

    spec: TaskSpec
    holdout: Sequence[Mapping[str, Any]]
    name: str = BASE
    adapter_dir: str | Path | None = None


#: transformers' first import (its lazy module resolves names on first access) and its model building
#: (it patches torch's init functions) are not thread-safe; loading takes ~1 s of an evaluation's
#: 10-30 s, so loads take turns and generation runs side by side.
_LOAD_LOCK = threading.Lock()


def eval_tokenizer(model_path: str | Path):
    """The base's tokenizer as generation needs it: left padding (a batch's answers start together), a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(model_path: str | Path, adapter_dir: str | Path | None):
    with _LOAD_LOCK:
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = eval_tokenizer(model_path)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            model = model.merge_and_unload()  # same outputs, faster generation
    model.eval()
    return model, tokenizer


def completer(model_path: str | Path, *, adapter_dir: str | Path | None = None, max_new_tokens: int = 96,
              batch_size: int = DEFAULT_EVAL_BATCH, threads: int = 0):
    """``complete(prompts, tools)``: greedy completions of chat ``prompts`` (each with its ``tools``) by the base
    model, or ``adapter_dir`` on it, loaded once; rendered as vLLM renders them (``adaptloop.chat``), batched
    with left padding (``threads``: torch threads, 0 = default). A completion that calls tools is its text as
    the model wrote it, ``<tool_call>`` blocks included."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = _load(model_path, adapter_dir)
    return completer_of(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)


def completer_of(model: Any, tokenizer: Any, *, max_new_tokens: int = 96, batch_size: int = DEFAULT_EVAL_BATCH):
    """``complete(prompts, tools)`` by a model already loaded (in eval mode) and its tokenizer (left padding, a pad
    token): see ``completer``."""
    import torch

    from adaptloop.chat import render

    def complete(prompts: Sequence[list[dict[str, Any]]], tools: Sequence[list | None] | None = None) -> list[str]:
        tools = list(tools) if tools is not None else [None] * len(prompts)
        texts = [render(tokenizer, list(p), t, add_generation_prompt=True) for p, t in zip(prompts, tools)]
        # Shortest first: less padding per batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outputs: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            for i, row in zip(chunk, new_tokens):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        return [outputs[i] for i in range(len(texts))]

    return complete


def generate(model_path: str | Path, prompts: Sequence[list[dict[str, Any]]], *, adapter_dir: str | Path | None = None,
             max_new_tokens: int = 96, batch_size: int = DEFAULT_EVAL_BATCH, threads: int = 0,
             tools: Sequence[list | None] | None = None) -> list[str]:
    """Greedy completions of chat ``prompts`` (see ``completer``)."""
    return completer(model_path, adapter_dir=adapter_dir, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     threads=threads)(prompts, tools)


def evaluate(spec: TaskSpec, model_path: str | Path | None, holdout: Sequence[Mapping[str, Any]], *,
             adapter_dir: str | Path | None = None, name: str = BASE, max_new_tokens: int = 96,
             batch_size: int = DEFAULT_EVAL_BATCH, threads: int = 0, complete: Any = None,
             engine: str = "transformers") -> EvalResult:
    """Success rate of the base model (or ``adapter_dir`` on it) on ``holdout`` examples; for a task with a tool
    environment, on its held-out episodes replayed there (``adaptloop.trainers.replay``). ``complete`` (with
    the ``engine`` it runs on): answers from elsewhere (``trainers.vllm_eval``) instead of transformers here."""
    from adaptloop.chat import assistant_text, tools_of
    from adaptloop.trainers.sft import chat_prompt

    started = time.monotonic()
    if not holdout:
        return EvalResult(name, 0.0, 0, 0, 0.0, engine=engine)
    if complete is None:
        complete = completer(model_path, adapter_dir=adapter_dir, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, threads=threads)
    if spec.environment is not None:
        from adaptloop.trainers.replay import held_out_episodes, replay

        unit = "episode"
        episodes = held_out_episodes(holdout)
        replayed = replay(spec, episodes, complete)
        items = tuple(e.episode_id for e in episodes)
        verdicts = [verdict for verdict, _ in replayed]
        responses = ["\n--- next turn ---\n".join(turns) for _, turns in replayed]
    else:
        unit = "example"
        items = tuple(str(e.get("example_id") or f"#{i}") for i, e in enumerate(holdout))
        prompts = [chat_prompt(e["prompt_messages"], spec.system_prompt) for e in holdout]
        responses = complete(prompts, [tools_of(e.get("tools_json")) for e in holdout])
        verdicts = [spec.judge(response, reference=assistant_text(e["completion"], e.get("completion_tool_calls") or ()))
                    for e, response in zip(holdout, responses)]
    failures = [{"response": response[:200], "reason": verdict.reason}
                for verdict, response in zip(verdicts, responses) if not verdict.ok][:5]
    passed = sum(verdict.ok for verdict in verdicts)
    result = EvalResult(name, passed / len(verdicts), len(verdicts), passed, time.monotonic() - started, failures,
                        sum(verdict.score for verdict in verdicts) / len(verdicts), unit,
                        tuple(bool(verdict.ok) for verdict in verdicts), items, engine)
    log.info("evaluated %s with %s: %d/%d %ss = %.3f in %.1fs", name, engine, passed, len(verdicts), unit,
             result.score, result.seconds)
    return result


def evaluate_many(model_path: str | Path, jobs: Sequence[EvalJob], *, max_new_tokens: int = 96,
                  batch_size: int = DEFAULT_EVAL_BATCH, threads: int = 1, vllm: Any = None,
                  tag: str = "eval", loaded: Any = None) -> list[EvalResult]:
    """The result of each job, in order. With ``vllm`` (a ``trainers.vllm_eval.VLLMTarget``) the answers come
    from that server, adapters shadow-loaded under names of ``tag`` (``vllm_eval.evaluate_jobs``); if it cannot,
    every job runs with transformers instead, the reason in each result's ``fallback``.

    ``loaded``: ``complete(prompts, tools)`` of the model every job names, already in memory elsewhere (the
    candidate, on the actor that trained it: ``ray_job.TrainingRun.completer``); transformers then answers there
    instead of loading the model here.

    With transformers, on ``threads`` cores: with 2 or more, that many jobs run side by side on one torch
    thread each.

    Greedy decoding at these batch sizes is bound by memory and per-step overhead, not arithmetic: on
    2 cores, one generation with 2 threads was 1.1-1.2x as fast as with 1, two generations side by side
    1.6x. Side by side, each job runs on one thread, so its answers do not depend on its neighbours.
    """
    import torch

    fallback = ""
    if vllm is not None:
        from adaptloop.trainers.vllm_eval import VLLMUnavailable, evaluate_jobs

        try:
            return evaluate_jobs(vllm, jobs, max_new_tokens=max_new_tokens, tag=tag)
        except VLLMUnavailable as exc:
            fallback = f"vLLM at {vllm.url}: {exc}"
            log.warning("evaluating with transformers instead: %s", fallback)

    def run(job: EvalJob, job_threads: int) -> EvalResult:
        result = evaluate(job.spec, model_path, job.holdout, adapter_dir=job.adapter_dir, name=job.name,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, threads=job_threads, complete=loaded)
        return dataclasses.replace(result, fallback=fallback) if fallback else result

    workers = min(max(1, threads), len(jobs))
    if workers <= 1 or loaded is not None:
        return [run(job, threads) for job in jobs]
    previous = torch.get_num_threads()
    # Process-wide: with one intra-op thread, each generation's kernels run on the thread that calls them.
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="evaluate") as pool:
            return list(pool.map(run, jobs, [1] * len(jobs)))
    finally:
        torch.set_num_threads(previous)


def newest_live_adapter(releases: Sequence[Mapping[str, Any]], tenant: str, task: str) -> Incumbent:
    """The newest RELEASED/PROMOTED adapter of (tenant, task), after taking the newest record per version.

    ``releases`` are AdapterRelease dicts in topic order (the topic keeps every decision of every version, so a
    reader keeps the last record per version itself).
    """
    latest: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for position, record in enumerate(releases):
        if record["tenant"] == tenant and record["task"] == task:
            latest[record["version"]] = (position, record)
    live = [(pos, r) for pos, r in latest.values() if r["state"] in SERVABLE and r.get("artifact_uri")]
    if not live:
        return Incumbent()
    # Newest by the position of each version's latest record: a later RELEASED candidate (it passed
    # the gate against the one before it) is the bar, and so is an older version promoted later.
    _, record = max(live, key=lambda item: item[0])
    return Incumbent(record["version"], record["artifact_uri"], record.get("digest"), record.get("base_model_digest"))


def live_releases(releases: Sequence[Mapping[str, Any]], tenant: str) -> list[Mapping[str, Any]]:
    """The newest record of every version of ``tenant`` that is RELEASED or PROMOTED, oldest first."""
    latest: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for position, record in enumerate(releases):
        if record["tenant"] == tenant:
            latest[record["version"]] = (position, record)
    return [r for _, r in sorted(latest.values(), key=lambda item: item[0]) if r["state"] in SERVABLE]


def cli(argv: list[str] | None = None) -> int:
    from adaptloop.model import ensure_base_model
    from adaptloop.settings import DEFAULT_HOME
    from adaptloop.demo_tasks import OrderGenerator
    from adaptloop.tasks import example_catalogue

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="PEFT adapter folder; omit for the base model")
    parser.add_argument("--model", help="HF base model folder (default: the bundled SmolLM2)")
    parser.add_argument("--cases", type=int, default=40, help="generated order-extract cases")
    parser.add_argument("--seed", type=int, default=99, help="seed of the generated cases")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--vllm-url", help="evaluate through this vLLM server (its key: ADAPTLOOP_TRAINER_VLLM_API_KEY)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = example_catalogue().get("order-extract")
    holdout = [{"prompt_messages": [{"role": "user", "content": c.sentence}], "completion": c.answer}
               for c in OrderGenerator(args.seed).cases(args.cases)]
    model = args.model or ensure_base_model(DEFAULT_HOME)
    vllm = None
    if args.vllm_url:
        from adaptloop.settings import TrainerSettings
        from adaptloop.trainers.vllm_eval import target

        vllm = target(TrainerSettings().model_copy(update={"vllm_url": args.vllm_url}))
    [result] = evaluate_many(model, [EvalJob(spec, holdout, args.adapter or BASE, args.adapter)],
                             max_new_tokens=args.max_new_tokens, threads=args.threads, vllm=vllm, tag="cli")
    print(json.dumps(result.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
