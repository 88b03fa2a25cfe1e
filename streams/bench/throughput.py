"""Curation throughput and latency against a pass-through Faust app, same broker, same run.

    $ADAPTLOOP_HOME/venv/bin/python -m adaptloop.streams.bench.throughput --pairs 4000 --rounds 3 --out streams-bench.json

Starts a private Tansu broker (memory storage, a fresh one per app and round), then, for each app in turn -- ``passthrough`` (decode
and re-encode every interaction and outcome, nothing else, with the same delivery discipline as
curation: outputs acknowledged per batch before the inputs are acked) and ``curation`` (every stage: decode,
PII, join, precedence, score, dedupe, window) -- starts 2 workers on fresh topics, waits until both
are ready, produces ``--pairs`` interactions with their outcomes (human corrections, so no grace
period is waited for) as fast as the producer goes, and times until the last output record is there.

``--hops`` adds a third app, ``hops``: curation's agents, topics and tables with the logic taken out (no
PII detection, no MinHash signature or duplicate index): what curation's topology alone costs next to
the pass-through. A diagnostic baseline, never a product setting.

Rounds alternate the apps (one round takes a few seconds per app, so one round alone is at the
mercy of whatever else the 2 cores do); the medians of the rounds are reported.

Prints events/s (interactions + outcomes) for both, their ratio (target >= 0.5), and the p50/p99
latency from an outcome's arrival (its broker timestamp) to its curated example's (curation only;
under this full-speed load the latency includes queueing behind the backlog), and the CPU time per
event of the workers and of the broker (from /proc: where the 2 cores went), and each worker's busy
share of one core (with one tenant, dedupe and windows run on one worker, which is then the busier).
Writes JSON to --out.
Timings on a shared 2-core machine are noisy: compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from adaptloop.kafka import ensure_topics, read_ranges
from adaptloop.settings import KafkaSettings, StreamsSettings, Topics

PASSTHROUGH_OUT = "bench.passthrough"


def create_passthrough_app(settings: StreamsSettings):
    """The baseline: decode each input record with our serde and re-encode it to one output topic."""
    from adaptloop.schemas import SerdeContext, serde_for
    from adaptloop.streams.delivery import run_batched, send_acknowledged
    from adaptloop.streams.faust_app import new_app

    app = new_app(settings)
    out = app.topic(settings.topics.prefix + PASSTHROUGH_OUT, key_serializer="raw", value_serializer="raw",
                    partitions=settings.topics.partitions)
    from adaptloop.processes import mark_ready

    for stem in ("interaction", "outcome"):
        serde = serde_for(stem)
        source = app.topic(settings.topics.name(stem + "s"), key_serializer="raw", value_serializer="raw",
                           partitions=settings.topics.partitions)

        async def handle(event, serde=serde) -> None:
            record = serde.deserialize(event.value, SerdeContext(event.message.topic))
            await send_acknowledged(out, event.key, serde.serialize(record, SerdeContext(PASSTHROUGH_OUT)),
                                    timeout_s=settings.kafka.delivery_timeout_s)

        async def body(stream, handle=handle) -> None:
            # The same delivery discipline as curation's batched stages: acknowledged per batch.
            await run_batched(stream, handle, max_events=settings.batch_max_events, within_s=settings.batch_within_s,
                              timeout_s=settings.kafka.delivery_timeout_s)

        app.agent(source, name=f"pass-{stem}")(body)

    async def ready(sender: Any, **kwargs: Any) -> None:
        mark_ready()

    app.on_rebalance_complete.connect(ready)
    return app


def passthrough_main() -> int:
    from adaptloop.streams.worker import run_worker, use_uvloop

    use_uvloop()  # the same runtime as the curation workers
    settings = StreamsSettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # Faust exits 1, silently, without its workdir
    return run_worker(create_passthrough_app(settings), settings, "warning")


class _NoIndex:
    """A duplicate index that finds nothing and keeps nothing (``hops`` only)."""

    def exact_of(self, content_hash: str) -> None:
        return None

    def query(self, values: list[int], *, exclude: str | None = None) -> list[str]:
        return []

    def add(self, example_id: str, values: list[int], content_hash: str | None = None) -> list[str]:
        return []


def hops_main() -> int:
    """A curation worker whose stages move every record as curation does but redact and compare nothing."""
    from adaptloop.streams import curation, dedupe, pii
    from adaptloop.streams.worker import main as curation_worker

    curation.redact_record = lambda record, redactor, paths: pii.Redaction("")
    dedupe.signature = lambda example: []
    curation.Curation._index = lambda self, tenant_task: _NoIndex()
    return curation_worker(["--loglevel", "warning"])


#: The apps this module runs as workers itself (``--worker KIND``); curation's worker is ``adaptloop streams``.
BENCH_WORKERS = {"passthrough": passthrough_main, "hops": hops_main}


def _produce(kafka: KafkaSettings, topics: Topics, pairs: int, seed: int, tenants: int = 1) -> float:
    """Produce every pair; return the wall-clock start (epoch seconds, comparable with record timestamps)."""
    from adaptloop.kafka import DeliveryTracker
    from adaptloop.schemas import SerdeContext, serde_for
    from adaptloop.sdk import build_interaction, build_outcome
    from adaptloop.demo_tasks import OrderGenerator
    from adaptloop.tasks import example_catalogue

    system = {"role": "system", "content": example_catalogue().get("order-extract").system_prompt}
    iser, oser = serde_for("interaction").serialize, serde_for("outcome").serialize
    producer = DeliveryTracker(kafka)
    itopic, otopic = topics.name("interactions"), topics.name("outcomes")
    started = time.time()
    for n, case in enumerate(OrderGenerator(seed=seed).cases(pairs)):
        iid = f"b{n}-{uuid.uuid4().hex[:8]}"
        tenant = f"bench{n % tenants}"
        producer.send(itopic, iser(build_interaction(
            interaction_id=iid, tenant=tenant, agent="bot", task="order-extract", session_id=iid,
            messages=[system, {"role": "user", "content": f"{case.sentence} Mail me at user{n}@example.com."}],
            response="?", base_model="m"), SerdeContext(itopic)), key=iid)
        producer.send(otopic, oser(build_outcome(iid, tenant=tenant, source="HUMAN", success=False,
                                                 correction=case.answer), SerdeContext(otopic)), key=iid)
    producer.flush(120)
    return started


def _wait_for(kafka: KafkaSettings, topic: str, count: int, timeout_s: float) -> tuple[float, list]:
    """Poll the output topic until ``count`` records; return when the last one was seen and the messages."""
    deadline = time.monotonic() + timeout_s
    while True:
        messages = list(read_ranges(kafka, topic, idle_s=0.5, timeout_s=timeout_s, first_record_s=1.0))
        if len(messages) >= count:
            return time.monotonic(), messages
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: {len(messages)} of {count} records after {timeout_s}s")
        time.sleep(0.2)


def run_one(kind: str, kafka: KafkaSettings, home: Path, pairs: int, workers: int, timeout_s: float,
            tenants: int = 1, broker_pid: int | None = None) -> dict[str, Any]:
    from adaptloop.processes import READY_FILE_ENV, ManagedProcess, adaptloop_command, cpu_seconds, streams_python
    from adaptloop.ops.stack import free_port, service_env

    topics = Topics(prefix=f"bench{uuid.uuid4().hex[:6]}.")
    ensure_topics(kafka, topics)
    app_id = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
    processes: list[ManagedProcess] = []
    try:
        for n in range(workers):
            wh = home / f"{kind}{n}"
            ready = wh / "ready"
            env = service_env(kafka, topics, wh) | {
                "ADAPTLOOP_STREAMS_APP_ID": app_id, "ADAPTLOOP_STREAMS_WEB_PORT": str(free_port()),
                "ADAPTLOOP_STREAMS_DATA_DIR": str(wh / "faust"), "ADAPTLOOP_STREAMS_WINDOW_SIZE": "256",
                "ADAPTLOOP_STREAMS_HOLDOUT_PERCENT": "0", READY_FILE_ENV: str(ready)}
            argv = ([streams_python(), "-m", "adaptloop.streams.bench.throughput", "--worker", kind] if kind in BENCH_WORKERS
                    else adaptloop_command("streams", python=streams_python()))
            process = ManagedProcess(f"{kind}{n}", argv, wh / "worker.log", env=env).start()
            processes.append(process)
            process.wait_ready(ready.exists, 120)
        time.sleep(8)  # both joined: let the group settle after the second worker's rebalance
        roles = {"workers": [p.pid for p in processes], "broker": [broker_pid]}

        def cpu_now() -> dict[str, list[float]]:
            return {role: [cpu_seconds(pid) for pid in pids] for role, pids in roles.items()}

        cpu_before = cpu_now()
        started = _produce(kafka, topics, pairs, seed=7, tenants=tenants)
        out_topic = topics.prefix + PASSTHROUGH_OUT if kind == "passthrough" else topics.name("curated")
        expected = 2 * pairs if kind == "passthrough" else pairs
        _, messages = _wait_for(kafka, out_topic, expected, timeout_s)
        # Until the output was all there, give or take the poll: where the 2 cores went.
        per_process = {role: [round(after - before, 2) for after, before in zip(seconds, cpu_before[role])]
                       for role, seconds in cpu_now().items()}
        cpu = {role: round(sum(seconds), 2) for role, seconds in per_process.items()}
        # From the first record produced to the last output record's timestamp (not when we noticed it).
        elapsed = max(m.timestamp()[1] for m in messages) / 1000 - started
        result: dict[str, Any] = {"kind": kind, "workers": workers, "pairs": pairs, "tenants": tenants, "events": 2 * pairs,
                                  "seconds": round(elapsed, 2), "events_per_s": round(2 * pairs / elapsed, 1),
                                  # Busy share of one core per worker: a worker near 1.0 is the bottleneck.
                                  "worker_busy": [round(seconds / elapsed, 2) for seconds in per_process["workers"]],
                                  "cpu_s": cpu, "cpu_ms_per_event": {role: round(1000 * seconds / (2 * pairs), 3)
                                                                     for role, seconds in cpu.items()}}
        if kind != "passthrough":
            arrival = {m.key().decode(): m.timestamp()[1]
                       for m in read_ranges(kafka, topics.name("outcomes"), idle_s=0.5, timeout_s=timeout_s)}
            from adaptloop.schemas import SerdeContext, serde_for

            decode = serde_for("curated_example").deserialize
            latencies = []
            for m in messages:
                example = decode(m.value(), SerdeContext(out_topic))
                if example["example_id"] in arrival:
                    latencies.append(m.timestamp()[1] - arrival[example["example_id"]])
            latencies.sort()
            result["latency_ms"] = {"p50": statistics.median(latencies),
                                    "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                                    "max": latencies[-1], "n": len(latencies)}
        return result
    finally:
        for process in processes:
            process.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptloop.streams.bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="interactions (each with one outcome) per app and round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=1,
                        help="spread the pairs over this many tenants (default 1: every example through one "
                             "(tenant, task), so its dedupe and window run on one worker: the worst case)")
    parser.add_argument("--rounds", type=int, default=3, help="pass-through then curation, this many times; medians reported")
    parser.add_argument("--hops", action="store_true",
                        help="also run curation's topology without its logic (no PII detection, no duplicate index)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("streams-bench.json"))
    parser.add_argument("--worker", choices=BENCH_WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return BENCH_WORKERS[args.worker]()

    from adaptloop.ops.stack import free_port, start_broker

    kinds = ("passthrough", "curation", "hops") if args.hops else ("passthrough", "curation")
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="adaptloop-bench-") as tmp:
        for n in range(args.rounds):
            result = {}
            for kind in kinds:
                # A fresh broker for each app and round: Tansu's memory storage slows down as it fills,
                # which would favour whichever app runs first.
                home = Path(tmp) / f"r{n}-{kind}"
                kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True)
                broker = start_broker(kafka, home)
                try:
                    result[kind] = run_one(kind, kafka, home, args.pairs, args.workers, args.timeout, args.tenants,
                                           broker_pid=broker.pid)
                finally:
                    broker.stop()
            baseline, curation = result["passthrough"], result["curation"]
            ratio = curation["events_per_s"] / baseline["events_per_s"]
            rounds.append(result | {"ratio": round(ratio, 3)})
            print(f"round {n + 1}: passthrough {baseline['events_per_s']} events/s ({baseline['seconds']} s), "
                  f"curation {curation['events_per_s']} events/s ({curation['seconds']} s), ratio {ratio:.2f}, "
                  f"outcome -> curated p99 {curation['latency_ms']['p99']:.0f} ms; CPU ms per event (workers/broker): "
                  f"passthrough {baseline['cpu_ms_per_event']['workers']}/{baseline['cpu_ms_per_event']['broker']}, "
                  f"curation {curation['cpu_ms_per_event']['workers']}/{curation['cpu_ms_per_event']['broker']}; "
                  f"workers busy: passthrough {baseline['worker_busy']}, curation {curation['worker_busy']}",
                  flush=True)
            if args.hops:
                rounds[-1]["hops_ratio"] = round(result["hops"]["events_per_s"] / baseline["events_per_s"], 3)
                print(f"round {n + 1}: hops {result['hops']['events_per_s']} events/s, ratio {rounds[-1]['hops_ratio']:.2f}; "
                      f"CPU ms per event (workers/broker) {result['hops']['cpu_ms_per_event']['workers']}/"
                      f"{result['hops']['cpu_ms_per_event']['broker']}; workers busy {result['hops']['worker_busy']}",
                      flush=True)
    median = {kind: statistics.median(r[kind]["events_per_s"] for r in rounds) for kind in kinds}
    report = {"rounds": rounds, "median_events_per_s": median,
              "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3), "target_ratio": 0.5,
              "median_latency_ms": {q: statistics.median(r["curation"]["latency_ms"][q] for r in rounds)
                                    for q in ("p50", "p99")},
              "note": "2-core shared machine, Tansu memory storage; latency measured under full-speed load"}
    if args.hops:
        report["median_hops_ratio"] = round(statistics.median(r["hops_ratio"] for r in rounds), 3)
    print(f"median: passthrough {median['passthrough']} events/s, curation {median['curation']} events/s")
    print(f"median ratio curation/passthrough: {report['median_ratio']:.2f} (target >= 0.5); "
          f"per round: {[r['ratio'] for r in rounds]}")
    if args.hops:
        print(f"median ratio hops/passthrough: {report['median_hops_ratio']:.2f} (curation's topology without its logic); "
              f"per round: {[r['hops_ratio'] for r in rounds]}")
    print(f"outcome arrival -> curated example (median of rounds): p50 {report['median_latency_ms']['p50']:.0f} ms, "
          f"p99 {report['median_latency_ms']['p99']:.0f} ms")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
