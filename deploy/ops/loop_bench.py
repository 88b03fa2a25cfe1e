"""``adaptloop loop-bench``: loop latency by stage (``loop_latency``) of one demo cycle.

    adaptloop loop-bench                                   # one tenant, one cycle, window 16; JSON to loop_latency.json
    python -m adaptloop.ops.loop_bench --window-size 32 --json /tmp/loop.json

It runs the demo's machinery (``adaptloop.ops.demo``, one (tenant, task), one cycle) on a fresh
embedded stack; the demo measures the latency of every release it caused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from adaptloop.errors import AdaptloopError
from adaptloop.ops.demo import DemoConfig, run_demo
from adaptloop.processes import cpu_name
from adaptloop.settings import DEFAULT_HOME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop loop-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--window-size", type=int, default=16, help="N: admitted TRAIN examples per training request")
    parser.add_argument("--pair", default="acme/order-extract", metavar="TENANT/TASK")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME / "loop-bench")
    parser.add_argument("--json", type=Path, default=Path("loop_latency.json"))
    args = parser.parse_args(argv)
    tenant, task = args.pair.split("/", 1)
    config = DemoConfig(home=args.home, pairs=((tenant, task),), cycles=1, window_size=args.window_size,
                        eval_cases=4, free_ports=True, tool_cycles=0)
    started = time.monotonic()
    try:
        result = run_demo(config)
    except AdaptloopError as exc:
        print(f"loop-bench failed: {exc}", file=sys.stderr)
        return 1
    if not result.loop_latency:
        print("loop-bench: the cycle produced no served adapter (see the gate's decision above)", file=sys.stderr)
        return 1
    for entry in result.loop_latency:
        print(f"\nloop latency of {entry['version']} (N = {entry['train_count']} TRAIN examples): "
              f"{entry['total_s']:.1f}s from the N-th admitted example to the adapter serving")
        for name, seconds in entry["stages"].items():
            print(f"  {name:16s} {seconds:8.2f}s  {entry['share'][name]:6.1%}")
        print(f"  slowest stage: {entry['slowest']}")
    pure = {r["version"]: json.loads(r.get("training_json") or "{}").get("train_seconds") for r in result.releases}
    for entry in result.loop_latency:
        # Beyond the training stage (the whole Ray job), and beyond the training loop itself (steps only).
        entry["beyond_training_share"] = round(1 - entry["stages"].get("training", 0.0) / entry["total_s"], 3)
        if pure.get(entry["version"]):
            entry["train_loop_s"] = round(pure[entry["version"]], 1)
            entry["beyond_train_loop_share"] = round(1 - pure[entry["version"]] / entry["total_s"], 3)
        print(f"  beyond the training stage: {entry['beyond_training_share']:.0%}"
              + (f"; beyond the training loop ({entry['train_loop_s']}s of steps): {entry['beyond_train_loop_share']:.0%}"
                 if "train_loop_s" in entry else ""))
    payload = {"command": "adaptloop loop-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": cpu_name(), "date": dt.date.today().isoformat(),
               "window_size": args.window_size, "pair": args.pair, "wall_s": round(time.monotonic() - started, 1),
               "latencies": result.loop_latency, "timings_s": result.timings_s,
               "note": "wall-clock differences on a shared 2-core machine: noisy"}
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
