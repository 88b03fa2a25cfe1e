"""Benchmark the gateway: its overhead against calling vLLM directly, and publish -> first answer by a new adapter.

    python -m adaptloop.serving.bench.gateway                          # 500 calls per path, JSON on stdout
    python -m adaptloop.serving.bench.gateway --requests 500 --json bench-gateway.json

Starts everything for real on loopback (Tansu with memory storage, ``adaptloop serve`` = vLLM +
sidecar, ``adaptloop gateway`` with a generated key) and always stops it. Both paths send the same
one-token chat completion of the base model, interleaved call by call so that both see the same
machine load, from aiohttp (the gateway's own upstream client, so the caller's client work in the
direct path is the same code as the gateway's in its upstream call), on kept-alive connections, at
real-time priority where the kernel permits it (``caller_priority``): a caller that shares a CPU with
vLLM would otherwise read each answer only when vLLM's threads let it, in both paths, and that wait
is several milliseconds of noise that is not the gateway's. The gateway's overhead is reported for
``record_mode`` outbox (the default: the answer waits for the interaction's write to the gateway's
outbox) and ack (it waits for the broker's acknowledgement), four ways:

- ``own_time_per_call_*``: per call, the caller's time minus the gateway's upstream call (from its
  ``server-timing`` header): uvicorn, our handler, the extra loopback hop; the upstream client's
  work is inside the upstream call, and the caller's same client work stands in for it. The per-call
  overhead, so its p99 is a p99 of overheads, with no vLLM latency in it;
- ``overhead_*_ms``: the difference of the two paths' percentiles (no per-call pairing, but its p99
  is the difference of two ~100 ms vLLM tails: mostly noise), with a 90% bootstrap interval of that
  p99 difference, which says how far from the true one a single run's figure may be;
- ``handler_time_per_call_*``: per call, the gateway handler's time minus its upstream call: auth,
  routing, JSON, recording (uvicorn's HTTP framing and the hop are not in it);
- ``gateway_cpu_ms_per_call``: the gateway process's CPU time (all its threads: HTTP, the upstream
  client, the producer) over the whole interleaved run, per gateway call (both modes): what each
  call costs the cores it shares with vLLM, and far steadier from run to run than any latency.

Target: p99 overhead < 2 ms on loopback.

``--gateway-cpus 1``: the production shape on one host: the gateway alone on the CPUs listed
(``ADAPTLOOP_GATEWAY_CPUS``), vLLM, the broker and this caller on the others (``ADAPTLOOP_SERVE_CPUS``),
so that no call waits for a core vLLM's threads hold. Without it everything shares every core.

Publish -> first answer: a real peft LoRA (random, on the base model) published as a PROMOTED
release; the clock runs from the broker's acknowledgement of the release record to the first
gateway answer whose ``x-adaptloop-adapter`` names it (sidecar digest check, vLLM load, warm-up,
gateway poll, the call itself). Target < 1 s. Several samples, each a new version name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import httpx
import uvloop

from adaptloop.artifacts import adapter_version, artifact_digest
from adaptloop.kafka import DeliveryTracker, ensure_topics
from adaptloop.model import ensure_base_model
from adaptloop.processes import cpu_name, cpu_seconds, parse_cpu_list
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.serving.keys import dev_keys, plain_setting
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, ModelSettings, Topics
from adaptloop.ops.stack import free_port, service_env, start_broker, start_service

TENANT = "bench"
BODY = {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 1, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def difference_interval(slower: list[float], faster: list[float], q: float) -> list[float]:
    """90% bootstrap interval of ``percentile(slower, q) - percentile(faster, q)``: how far a
    difference of two tails measured once could be from the true one (scipy.stats.bootstrap)."""
    import numpy as np
    from scipy.stats import bootstrap

    def difference(a, b, axis=-1):
        index = int(q * a.shape[axis])  # the same rank as ``percentile``
        return np.sort(a, axis=axis)[..., index] - np.sort(b, axis=axis)[..., index]

    result = bootstrap((np.asarray(slower), np.asarray(faster)), difference, n_resamples=2000, confidence_level=0.9,
                       method="percentile", vectorized=True, random_state=0)
    return [round(float(result.confidence_interval.low), 3), round(float(result.confidence_interval.high), 3)]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(percentile(values, 0.50), 3), "p99_ms": round(percentile(values, 0.99), 3),
            "mean_ms": round(statistics.fmean(values), 3)}


def make_adapter(folder: Path) -> Path:
    """A real LoRA (r=8, q/v) of the base model with random B, as the serving tests use."""
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
    peft_model.save_pretrained(folder)
    return folder


def release_record(version: str, task: str, folder: Path, digest: str) -> dict[str, Any]:
    return {"version": version, "tenant": TENANT, "task": task, "state": "PROMOTED", "reason": "benchmark",
            "base_model": ModelSettings().name, "artifact_uri": str(folder), "digest": digest, "lora_rank": 8,
            "method": "sft", "created_at": int(time.time() * 1000), "decided_by": "manual",
            "evaluation": {"metric": "success", "holdout_count": 0, "candidate_score": 0.0, "incumbent": "base",
                           "incumbent_score": 0.0, "margin": 0.0},
            "lineage": {"request_id": str(uuid.uuid4()), "dataset_digest": "sha256:bench", "examples": [],
                        "train_example_ids": [], "code_version": "bench", "config_json": "{}"}}


def server_timing(header: str) -> dict[str, float]:
    """``upstream;dur=76.1, gateway;dur=77.9`` -> {"upstream": 76.1, "gateway": 77.9}."""
    timings = {}
    for metric in filter(None, (part.strip() for part in header.split(","))):
        name, _, rest = metric.partition(";")
        if rest.startswith("dur="):
            timings[name] = float(rest[4:])
    return timings


@contextmanager
def realtime_priority() -> Iterator[str]:
    """Put this thread ahead of every normal one (SCHED_FIFO) while inside, where the kernel permits: the
    caller then reads each answer the moment it arrives, instead of after whatever vLLM's threads are
    doing on the CPU it shares with them, a wait that would land in the per-call figures. Yields what
    the thread got, for the report."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
    except OSError:
        yield "normal (SCHED_FIFO not permitted)"
        return
    try:
        yield "SCHED_FIFO"
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


#: Iterations of calls (every path once) before the timed ones: connections, first-call paths.
WARM_UP_ITERATIONS = 10


async def timed_calls(paths: dict[str, tuple[str, dict[str, str]]], body: bytes, n: int, gateway_pid: int,
                      timeout_s: float = 120.0) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]], float]:
    """``n`` calls per path (after ``WARM_UP_ITERATIONS``), interleaved path by path, on kept-alive connections
    with aiohttp, the client the gateway itself calls vLLM with: the caller's own client work in the
    direct path and the gateway's in its upstream call are then the same code. Returns each path's
    times (ms), the gateway's ``server-timing`` of each gateway call, and the gateway's CPU seconds."""
    elapsed: dict[str, list[float]] = {name: [] for name in paths}
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in paths if name != "direct"}
    cpu_before = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False) as client:
        for i in range(n + WARM_UP_ITERATIONS):
            if i == WARM_UP_ITERATIONS:
                cpu_before = cpu_seconds(gateway_pid)
            for name, (url, headers) in paths.items():
                t0 = time.perf_counter()
                async with client.post(url + "/v1/chat/completions", data=body,
                                       headers=headers | {"content-type": "application/json"}) as response:
                    await response.read()
                took = (time.perf_counter() - t0) * 1000
                if response.status != 200:
                    raise RuntimeError(f"{name}: {response.status}")
                if i < WARM_UP_ITERATIONS:
                    continue  # warm-up: connections, first-call paths
                elapsed[name].append(took)
                if name != "direct":
                    # When it started (CLOCK_MONOTONIC, as `perf record -k mono` stamps events): to find
                    # a slow call in a trace.
                    timings[name].append(server_timing(response.headers.get("server-timing", "")) | {"started_s": t0})
    return elapsed, timings, cpu_seconds(gateway_pid) - cpu_before


def overhead(vllm_url: str, gateway_url: str, key: str, n: int, gateway_pid: int) -> dict[str, Any]:
    base = ModelSettings().name
    body = json.dumps(BODY | {"model": base}).encode()
    auth = {"authorization": f"Bearer {key}"}
    paths = {"direct": (vllm_url, {}), "outbox": (gateway_url, auth | {"x-adaptloop-record": "outbox"}),
             "ack": (gateway_url, auth | {"x-adaptloop-record": "ack"})}
    with realtime_priority() as priority:
        caller, timings, gateway_cpu_s = uvloop.run(timed_calls(paths, body, n, gateway_pid))
    result: dict[str, Any] = {"direct": summary(caller["direct"]), "caller_priority": priority,
                              "gateway_cpu_ms_per_call": round(1000 * gateway_cpu_s / (2 * n), 3)}
    calls: dict[str, dict[str, list[float]]] = {}
    for mode in ("outbox", "ack"):
        gateway = result[f"gateway_{mode}"] = summary(caller[mode])
        # Per call, everything the caller waited for beyond the gateway's upstream call: uvicorn, our
        # handler, the extra loopback hop. The gateway's upstream client work is in ``upstream``; the same
        # client's work in the caller stands in for it (it is what the direct path pays in its place).
        own = [took - timing["upstream"] for took, timing in zip(caller[mode], timings[mode])]
        result[f"own_time_per_call_{mode}"] = summary(own)
        # Our handler alone (auth, routing, JSON, recording; the ack wait in ack mode), upstream excluded.
        handler = [timing["gateway"] - timing["upstream"] for timing in timings[mode]]
        result[f"handler_time_per_call_{mode}"] = summary(handler)
        calls[mode] = {"own_ms": [round(v, 3) for v in own], "handler_ms": [round(v, 3) for v in handler],
                       "started_s": [round(timing["started_s"], 6) for timing in timings[mode]]}
        result[f"overhead_{mode}_ms"] = {q: round(gateway[f"{q}_ms"] - result["direct"][f"{q}_ms"], 3)
                                         for q in ("p50", "p99")}
        result[f"overhead_{mode}_ms"]["p99_interval_90"] = difference_interval(caller[mode], caller["direct"], 0.99)
        result[f"ratio_{mode}_to_direct"] = {q: round(gateway[f"{q}_ms"] / result["direct"][f"{q}_ms"], 3)
                                             for q in ("p50", "p99")}
    result["per_call"] = calls  # in call order, for a look at the tail
    return result


def publish_to_first_answer(http: httpx.Client, kafka: KafkaSettings, topics: Topics, gateway_url: str, key: str,
                            folder: Path, samples: int) -> list[float]:
    topic = topics.name("releases")
    serialize = serde_for("adapter_release").serialize
    digest = artifact_digest(folder)
    producer = DeliveryTracker(kafka, **{"linger.ms": 0})
    seconds = []
    for i in range(samples):
        task = f"task{i}"
        version = adapter_version(TENANT, task, digest)
        producer.send_sync(topic, serialize(release_record(version, task, folder, digest), SerdeContext(topic)), key=version)
        published = time.perf_counter()
        deadline = published + 120
        while time.perf_counter() < deadline:
            response = http.post(gateway_url + "/v1/chat/completions", json=BODY | {"model": f"{TENANT}/{task}"},
                                 headers={"authorization": f"Bearer {key}"})
            response.raise_for_status()
            if response.headers["x-adaptloop-adapter"] == version:
                seconds.append(round(time.perf_counter() - published, 3))
                break
        else:
            raise TimeoutError(f"{version} not served within 120 s")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptloop.serving.bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="calls per path (default 500)")
    parser.add_argument("--swaps", type=int, default=3, help="publish -> first answer samples (default 3)")
    parser.add_argument("--adapter", type=Path, help="a peft LoRA folder (default: a random one made here)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--gateway-cpus", default="", help="the gateway alone on these CPUs (e.g. 1), the rest on "
                        "the others (default: all share every CPU)")
    args = parser.parse_args(argv)
    try:
        gateway_cpus = parse_cpu_list(args.gateway_cpus)
    except ValueError as exc:
        parser.error(str(exc))
    other_cpus = frozenset(os.sched_getaffinity(0)) - gateway_cpus
    if gateway_cpus and not other_cpus:
        parser.error(f"--gateway-cpus {args.gateway_cpus} leaves no CPU for vLLM and the broker")

    home = Path(tempfile.mkdtemp(prefix="adaptloop-bench-gateway-"))
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True)
    topics = Topics(prefix="bench.")
    ports = {name: free_port() for name in ("vllm", "sidecar", "gateway")}
    key = dev_keys([TENANT])[TENANT]
    env = service_env(kafka, topics, home) | {
        "ADAPTLOOP_MODEL_PATH": str(ensure_base_model(DEFAULT_HOME)),
        "ADAPTLOOP_SERVE_PORT": str(ports["vllm"]), "ADAPTLOOP_SERVE_SIDECAR_PORT": str(ports["sidecar"]),
        "ADAPTLOOP_GATEWAY_PORT": str(ports["gateway"]),
        "ADAPTLOOP_GATEWAY_VLLM_URL": f"http://127.0.0.1:{ports['vllm']}",
        "ADAPTLOOP_GATEWAY_SIDECAR_URL": f"http://127.0.0.1:{ports['sidecar']}",
        "ADAPTLOOP_GATEWAY_API_KEYS": plain_setting({TENANT: key}),
    }
    if gateway_cpus:
        env |= {"ADAPTLOOP_GATEWAY_CPUS": args.gateway_cpus, "ADAPTLOOP_SERVE_CPUS": ",".join(map(str, sorted(other_cpus)))}
        os.sched_setaffinity(0, other_cpus)  # this caller, and the broker it starts
    adapter = args.adapter or make_adapter(home / "adapter")
    processes = []
    result: dict[str, Any] = {"command": f"{parser.prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
                              "requests": args.requests, "home": str(home),
                              "cpus": {"gateway": env.get("ADAPTLOOP_GATEWAY_CPUS", "all"),
                                       "vllm_broker_caller": env.get("ADAPTLOOP_SERVE_CPUS", "all")},
                              "targets": {"overhead_p99_ms": 2.0, "publish_to_first_answer_s": 1.0}}
    try:
        processes.append(start_broker(kafka, home))
        ensure_topics(kafka, topics)
        processes.append(start_service("serve", home, env, timeout_s=600))
        processes.append(start_service("gateway", home, env, timeout_s=120))
        gateway_url = f"http://127.0.0.1:{ports['gateway']}"
        with httpx.Client(timeout=120) as http:
            result["overhead"] = overhead(env["ADAPTLOOP_GATEWAY_VLLM_URL"], gateway_url, key, args.requests,
                                          processes[-1].pid)
            result["publish_to_first_answer_s"] = publish_to_first_answer(http, kafka, topics, gateway_url, key,
                                                                          adapter, args.swaps)
    finally:
        for process in reversed(processes):
            process.stop()
    print(json.dumps(result, indent=2))
    if "overhead" in result:
        o = result["overhead"]
        print(f"vLLM direct p50 {o['direct']['p50_ms']:.1f} / p99 {o['direct']['p99_ms']:.1f} ms; "
              f"gateway CPU per call {o['gateway_cpu_ms_per_call']:.2f} ms; caller {o['caller_priority']}")
        for mode in ("outbox", "ack"):
            own, handler = o[f"own_time_per_call_{mode}"], o[f"handler_time_per_call_{mode}"]
            difference = o[f"overhead_{mode}_ms"]
            low, high = difference["p99_interval_90"]
            print(f"{mode:>7}: overhead per call p50 {own['p50_ms']:.2f} / p99 {own['p99_ms']:.2f} ms (target p99 < 2 ms); "
                  f"percentile difference p50 {difference['p50']:.2f} / p99 {difference['p99']:.2f} ms (90% interval "
                  f"{low:.1f} to {high:.1f}); handler alone p50 {handler['p50_ms']:.2f} / p99 {handler['p99_ms']:.2f} ms")
        print(f"publish -> first answer: {result.get('publish_to_first_answer_s')} s (target < 1 s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
