"""Soak: a curation worker's tables and memory over a long run, bounded (outcome horizon) against unbounded.

    $ADAPTLOOP_HOME/venv/bin/python -m adaptloop.streams.bench.soak --rounds 12 --pairs 400 --out streams-soak.json

Two runs on one private Tansu broker, each with a fresh curation worker and fresh topics, the same traffic:
``bounded`` with a short outcome horizon (``--horizon-s``, swept every second) and ``unbounded`` with a horizon
longer than the run (nothing can leave: the state as it was before ``adaptloop.streams.state``). Each round
produces ``--pairs`` interactions with a human correction each, as many interactions that never get an
outcome and as many outcomes whose interaction never comes (all distinct texts), waits until the round's
corrected examples are curated, then reads the worker's table sizes (``GET /adaptloop/metrics`` ->
``state``) and its resident memory (/proc). ``--dedupe-max`` bounds the near-duplicate index in both runs.

Prints per round the entries and RSS of both runs, and the ratios last round / the round one horizon in
(the bounded run's should stay near 1, the unbounded run's grow with the rounds); writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from adaptloop.kafka import DeliveryTracker, ensure_topics, read_ranges
from adaptloop.settings import KafkaSettings, Topics


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def produce_round(kafka: KafkaSettings, topics: Topics, n: int, pairs: int, run: str) -> None:
    """``pairs`` corrected pairs, ``pairs`` interactions without outcome, ``pairs`` outcomes without interaction."""
    from adaptloop.demo_tasks import OrderGenerator
    from adaptloop.schemas import SerdeContext, serde_for
    from adaptloop.sdk import build_interaction, build_outcome

    iser, oser = serde_for("interaction").serialize, serde_for("outcome").serialize
    itopic, otopic = topics.name("interactions"), topics.name("outcomes")
    producer = DeliveryTracker(kafka)
    for k, case in enumerate(OrderGenerator(seed=1000 * n + 7).cases(2 * pairs)):
        iid = f"{run}-r{n}-{k}-{uuid.uuid4().hex[:8]}"
        text = f"{case.sentence} Reference {iid}, ticket {n * 100_000 + k}."
        producer.send(itopic, iser(build_interaction(
            interaction_id=iid, tenant="soak", agent="bot", task="order-extract", session_id=iid,
            messages=[{"role": "user", "content": text}], response="?", base_model="m"), SerdeContext(itopic)), key=iid)
        if k < pairs:
            producer.send(otopic, oser(build_outcome(iid, tenant="soak", source="HUMAN", success=False,
                                                     correction=case.answer), SerdeContext(otopic)), key=iid)
            orphan = f"{iid}-never"
            producer.send(otopic, oser(build_outcome(orphan, tenant="soak", source="VALIDATOR", success=True),
                                       SerdeContext(otopic)), key=orphan)
    producer.flush(120)


def wait_curated(kafka: KafkaSettings, topic: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(1 for _ in read_ranges(kafka, topic, idle_s=0.5, timeout_s=timeout_s)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: fewer than {count} curated examples after {timeout_s}s")
        time.sleep(0.5)


def metrics(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/adaptloop/metrics", timeout=10) as response:
        return json.load(response)


def soak(kafka: KafkaSettings, home: Path, run: str, *, horizon_s: float, rounds: int, pairs: int, round_s: float,
         dedupe_max: int, timeout_s: float) -> list[dict[str, Any]]:
    from adaptloop.processes import READY_FILE_ENV, ManagedProcess, adaptloop_command, streams_python
    from adaptloop.ops.stack import free_port, service_env

    topics = Topics(prefix=f"soak{uuid.uuid4().hex[:6]}.")
    ensure_topics(kafka, topics)
    port = free_port()
    ready = home / "ready"
    env = service_env(kafka, topics, home) | {
        "ADAPTLOOP_STREAMS_APP_ID": f"soak-{run}-{uuid.uuid4().hex[:6]}", "ADAPTLOOP_STREAMS_WEB_PORT": str(port),
        "ADAPTLOOP_STREAMS_WINDOW_SIZE": "100000", "ADAPTLOOP_STREAMS_OUTCOME_HORIZON_S": str(horizon_s),
        "ADAPTLOOP_STREAMS_STATE_SWEEP_S": "1", "ADAPTLOOP_STREAMS_TICK_S": "0.5",
        "ADAPTLOOP_STREAMS_DEDUPE_MAX_PER_TASK": str(dedupe_max), READY_FILE_ENV: str(ready)}
    worker = ManagedProcess(f"soak-{run}", adaptloop_command("streams", python=streams_python()),
                            home / "worker.log", env=env).start()
    samples = []
    try:
        worker.wait_ready(ready.exists, 120)
        started = time.monotonic()
        for n in range(rounds):
            round_started = time.monotonic()
            produce_round(kafka, topics, n, pairs, run)
            wait_curated(kafka, topics.name("curated"), (n + 1) * pairs, timeout_s)
            time.sleep(max(0.0, round_s - (time.monotonic() - round_started)))
            state = metrics(port)["state"]
            samples.append({"round": n + 1, "elapsed_s": round(time.monotonic() - started, 1),
                            "records_in": (n + 1) * 4 * pairs, "entries": state["entries"],
                            "total_entries": sum(state["entries"].values()), "evicted": state["evicted"],
                            "rss_mib": round(rss_mib(worker.pid), 1)})
            print(f"{run} round {n + 1}: {samples[-1]['total_entries']} entries {state['entries']}, "
                  f"RSS {samples[-1]['rss_mib']} MiB", flush=True)
    finally:
        worker.stop()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptloop.streams.bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=300, help="corrected pairs per round (and as many "
                        "interactions without outcome and outcomes without interaction)")
    parser.add_argument("--round-s", type=float, default=5.0, help="a round lasts at least this long")
    parser.add_argument("--horizon-s", type=float, default=15.0, help="the bounded run's outcome horizon")
    parser.add_argument("--dedupe-max", type=int, default=1000, help="near-duplicate index size per (tenant, task)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("streams-soak.json"))
    args = parser.parse_args(argv)

    from adaptloop.processes import cpu_name
    from adaptloop.ops.stack import free_port, start_broker

    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="adaptloop-soak-") as tmp:
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True)
        broker = start_broker(kafka, Path(tmp))
        try:
            for run, horizon_s in (("bounded", args.horizon_s), ("unbounded", 10 * 24 * 3600.0)):
                runs[run] = soak(kafka, Path(tmp) / run, run, horizon_s=horizon_s, rounds=args.rounds,
                                 pairs=args.pairs, round_s=args.round_s, dedupe_max=args.dedupe_max,
                                 timeout_s=args.timeout)
        finally:
            broker.stop()
    # Compare the last round with the first round past one horizon: by then the bounded run evicts as it adds.
    settled = next((i for i, s in enumerate(runs["bounded"]) if s["elapsed_s"] >= args.horizon_s + 2),
                   len(runs["bounded"]) - 1)
    report: dict[str, Any] = {
        "command": "python -m adaptloop.streams.bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "settings": vars(args) | {"out": str(args.out)},
        "compared_rounds": [runs["bounded"][settled]["round"], args.rounds], "runs": runs}
    for run, samples in runs.items():
        first, last = samples[settled], samples[-1]
        report[run] = {"entries_ratio": round(last["total_entries"] / max(1, first["total_entries"]), 2),
                       "rss_ratio": round(last["rss_mib"] / first["rss_mib"], 3),
                       "entries_last": last["total_entries"], "rss_mib_last": last["rss_mib"]}
        print(f"{run}: entries x{report[run]['entries_ratio']} and RSS x{report[run]['rss_ratio']} from round "
              f"{first['round']} to {last['round']} ({last['total_entries']} entries, {last['rss_mib']} MiB)")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
