"""``adaptloop demo``: the whole loop on the embedded stack, several cycles, two tenants, two tasks.

    make demo                                   # set-up included
    adaptloop demo                              # after `make install`: 3 cycles, acme + globex
    adaptloop demo --cycles 2 --json demo.json  # fewer cycles, the result as JSON too

Two simulated agents call the gateway: tenant ``acme`` extracts order sentences into exact JSON
(task ``order-extract``), tenant ``globex`` triages support tickets into ``{category, priority}``
(task ``ticket-triage``). A simulated reviewer judges every answer against the truth and sends an
outcome over HTTP (``POST /v1/feedback``, as any agent would), with the correct answer when it was
wrong. The stack does the rest, per (tenant, task), cycle after cycle: curation, a training request
every ``window_size`` admitted training examples, a Ray LoRA job on everything curated so far, the
gate, a release, hot-loading into vLLM, routing.

Each cycle's traffic is answered by whatever the gateway serves at that moment, so its validator
success (judged against the truth, on cases the adapters never saw) is the served agent's success
in that cycle; a last round of fresh cases (no outcomes sent) measures the final adapter. The two
tenants run as independent pipelines: one tenant's traffic and hot-load overlap the other's
training (the trainer takes one request at a time). The demo ends by writing ``adaptloop report``
(HTML + PNG per (tenant, task)) and the loop latency of every release.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaptloop.errors import AdaptloopError
from adaptloop.kafka import count_messages
from adaptloop.model import ensure_base_model
from adaptloop.ops.demo_pairs import Agent, DemoConfig, Measurement, PairLoop, follow, say
from adaptloop.ops.stack import LocalStack, StackPorts, free_port
from adaptloop.ops.tool_loop import OUTCOME_GRACE_S, TENANT as TOOL_TENANT, ToolLoop
from adaptloop.schemas.contract import now_ms
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, Topics
from adaptloop.tasks import EXAMPLE_CATALOGUE, FILE_ENV


@dataclass
class DemoResult:
    measurements: list[Measurement] = field(default_factory=list)
    releases: list[dict] = field(default_factory=list)   # the decision of every request the demo caused
    counts: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    loop_latency: list[dict] = field(default_factory=list)
    report: str | None = None

    def series(self, tenant: str, task: str) -> list[float]:
        return [m.success for m in sorted(self.measurements, key=lambda m: m.cycle)
                if (m.tenant, m.task) == (tenant, task)]

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["measurements"] = [asdict(m) | {"success": m.success} for m in self.measurements]
        return out


def run_demo(config: DemoConfig) -> DemoResult:
    timings: dict[str, float] = {}
    started = time.monotonic()
    say("preparing the base model (SmolLM2-135M-Instruct, converted once and cached)")
    ensure_base_model(DEFAULT_HOME)
    ports = StackPorts.free() if config.free_ports else StackPorts()
    kafka = (KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True) if config.free_ports
             else KafkaSettings())
    topics = Topics(prefix=config.topics_prefix)
    # Canary share 1.0: each cycle measures before/after, so a new release takes its alias's traffic at once
    # (the canary controller still decides promote or roll back from the outcomes). SFT: the simulated
    # reviewer always sends the right answer, so the corrected answers are the signal; in auto mode these
    # correction pairs would go to DPO, ~3x the cost per step, which the 15-minute demo cannot afford
    # (DPO and KTO are shown by tests/integration/test_trainer.py).
    tenants = tuple(sorted({tenant for tenant, _ in config.pairs} | ({TOOL_TENANT} if config.tool_cycles else set())))
    stack = LocalStack(home=config.home, kafka=kafka, topics=topics, ports=ports, dev_tenants=tenants, extra_env={
        "ADAPTLOOP_GATEWAY_CANARY_SHARE": "1.0",
        "ADAPTLOOP_TRAINER_METHOD": "sft",
        "ADAPTLOOP_STREAMS_WINDOW_SIZE": str(config.window_size),
        "ADAPTLOOP_STREAMS_HOLDOUT_PERCENT": str(config.holdout_percent),
        # The demo's reviewer gives each call its one verdict at once: no later outcome is worth waiting for
        # (the default grace, 60 s, held every success back that long: a window fired a minute after its traffic).
        "ADAPTLOOP_STREAMS_OUTCOME_GRACE_S": str(OUTCOME_GRACE_S),
        "ADAPTLOOP_TRAINER_RECIPE": json.dumps({"epochs": config.trainer_epochs}),
        "ADAPTLOOP_TRAINER_PARALLEL_JOBS": str(config.parallel_jobs),
        # The demo's tasks are the example catalogue's, whatever catalogue this shell names.
        FILE_ENV: str(EXAMPLE_CATALOGUE),
    })
    with stack.start(progress=say):
        timings["stack_start"] = round(time.monotonic() - started, 1)
        result = asyncio.run(_loop(config, stack, kafka, topics, ports))
        timings["cycles"] = round(time.monotonic() - started - timings["stack_start"], 1)
        result.timings_s = timings
        _finish(config, stack, kafka, topics, ports, result)
        timings["report"] = round(time.monotonic() - started - timings["stack_start"] - timings["cycles"], 1)
    return result


async def _loop(config: DemoConfig, stack: LocalStack, kafka: KafkaSettings, topics: Topics,
                ports: StackPorts) -> DemoResult:
    agent = Agent(ports.gateway_url, config.concurrency,
                  tenant_headers={tenant: {"authorization": f"Bearer {key}"} for tenant, key in stack.dev_keys.items()})
    tool = ToolLoop(stack, held_out_episodes=config.eval_cases) if config.tool_cycles else None
    tails = follow(kafka, topics)
    try:
        loops = [PairLoop(config, agent, tails, tenant, task) for tenant, task in config.pairs]
        tool_measurements = await asyncio.gather(*(loop.run() for loop in loops),
                                                 *([asyncio.to_thread(_tool_cycles, tool, config.tool_cycles)] if tool else []))
    finally:
        await agent.close()
        for tail in tails.values():
            tail.close()
    return DemoResult(measurements=[m for loop in loops for m in loop.measurements]
                      + (tool_measurements[-1] if tool else []),
                      releases=[r for loop in loops for r in loop.decisions] + (tool.decisions if tool else []))


def _tool_cycles(tool: ToolLoop, cycles: int) -> list[Measurement]:
    """The tool-using task beside the others: held-out episode success of the base, then after each cycle."""
    measurements = []
    for cycle in range(cycles + 1):
        if cycle:
            step = tool.cycle()
            say(f"{tool.model}: {step['episodes']} reviewed episodes -> {step['decision']} {step['version']}")
        measured = tool.measure()
        served = tool.decisions[-1]["version"] if tool.decisions and tool.decisions[-1]["state"] == "RELEASED" else "base"
        measurements.append(Measurement(tool.tenant, tool.task, cycle, now_ms(), measured["episodes"],
                                        round(measured["success"] * measured["episodes"]), [served]))
        say(f"{tool.model} cycle {cycle}: held-out episode success {measured['success']:.0%}")
    return measurements


def _finish(config: DemoConfig, stack: LocalStack, kafka: KafkaSettings, topics: Topics, ports: StackPorts,
            result: DemoResult) -> None:
    """Counts, loop latency of every release, the report (the stack is still up: it reads the topics)."""
    from adaptloop.ops import loop_latency, report

    result.counts = {name: count_messages(kafka, topics.name(name), idle_s=1.0)
                     for name in ("interactions", "outcomes", "curated", "dead_letters", "training_requests", "releases")}
    say(f"topic counts: {result.counts}")
    try:
        result.loop_latency = loop_latency.latencies(kafka, topics, sidecar_url=f"http://127.0.0.1:{ports.sidecar}",
                                                   trainer_log=stack.home / "logs" / "trainer.log")
    except AdaptloopError as exc:
        say(f"loop latency not measured: {exc}")
    report_dir = config.report_dir or config.home / "report"
    report.build_report(kafka, topics, report_dir, demo=result.as_json(), latencies=result.loop_latency)
    result.report = str(report_dir / "index.html")
    say(f"report written: {result.report}")


def summary(result: DemoResult, pairs: tuple[tuple[str, str], ...]) -> str:
    lines = ["validator success of the served agent per cycle (cycle 0 = base model; last = final adapter on "
             "fresh cases):"]
    for tenant, task in pairs:
        series = result.series(tenant, task)
        lines.append(f"  {tenant}/{task}: " + " -> ".join(f"{s:.0%}" for s in series))
    for latency in result.loop_latency:
        lines.append(f"  loop latency {latency['version']}: {latency['total_s']:.0f}s, slowest stage "
                     f"{latency['slowest']} ({latency['stages'][latency['slowest']]:.0f}s)")
    return "\n".join(lines)


def rising(result: DemoResult, pairs: tuple[tuple[str, str], ...]) -> bool:
    """Every pair ends better than it started."""
    return all(len(s) >= 2 and s[-1] > s[0] for s in (result.series(t, k) for t, k in pairs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop demo", description=__doc__.splitlines()[0])
    defaults = DemoConfig()
    parser.add_argument("--home", type=Path, default=defaults.home)
    parser.add_argument("--cycles", type=int, default=defaults.cycles)
    parser.add_argument("--window-size", type=int, default=defaults.window_size)
    parser.add_argument("--eval-cases", type=int, default=defaults.eval_cases)
    parser.add_argument("--pair", action="append", metavar="TENANT/TASK",
                        help="a (tenant, task) to drive; repeat; default: acme/order-extract and globex/ticket-triage")
    parser.add_argument("--report-dir", type=Path, help="default: HOME/report")
    parser.add_argument("--free-ports", action="store_true", help="use unused loopback ports")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--tool-cycles", type=int, default=defaults.tool_cycles,
                        help="cycles of the tool-using task (initech/support-agent) beside the pairs; 0: none")
    args = parser.parse_args(argv)
    pairs = tuple(tuple(p.split("/", 1)) for p in args.pair) if args.pair else defaults.pairs
    config = DemoConfig(home=args.home, pairs=pairs, cycles=args.cycles, window_size=args.window_size,
                        eval_cases=args.eval_cases, report_dir=args.report_dir, free_ports=args.free_ports,
                        tool_cycles=args.tool_cycles)
    started = time.monotonic()
    try:
        result = run_demo(config)
    except AdaptloopError as exc:
        print(f"adaptloop demo failed: {exc}", file=sys.stderr)
        return 1
    wall = time.monotonic() - started
    shown = pairs + (((TOOL_TENANT, "support-agent"),) if config.tool_cycles else ())
    print(f"\n{summary(result, shown)}\nwall time {wall / 60:.1f} min; stages {result.timings_s}; report {result.report}")
    if args.json:
        args.json.write_text(json.dumps(result.as_json() | {"wall_s": round(wall, 1)}, indent=2, default=str))
    return 0 if rising(result, shown) else 1


if __name__ == "__main__":
    sys.exit(main())
