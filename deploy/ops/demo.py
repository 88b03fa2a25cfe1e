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
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adaptloop.artifacts import alias
from adaptloop.demo_tasks import case_generator
from adaptloop.errors import AdaptloopError, StackError
from adaptloop.kafka import count_messages
from adaptloop.model import ensure_base_model
from adaptloop.ops.stack import LocalStack, StackPorts, free_port
from adaptloop.ops.tool_loop import TENANT as TOOL_TENANT
from adaptloop.ops.tool_loop import ToolLoop
from adaptloop.records import read_topic
from adaptloop.schemas.contract import SERVABLE, now_ms
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, Topics
from adaptloop.tasks import EXAMPLE_CATALOGUE, FILE_ENV, example_catalogue

#: (tenant, task) pairs the demo drives; each is one alias ``tenant/task`` at the gateway.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("acme", "order-extract"), ("globex", "ticket-triage"))
#: Top-up calls when a window has not fired (an example was dropped, e.g. as a near-duplicate).
TOP_UP_CALLS = 4
#: No new training request this long after the last outcome: top up.
TOP_UP_AFTER_S = 25.0


@dataclass
class DemoConfig:
    home: Path = DEFAULT_HOME / "demo"
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    cycles: int = 3                # training cycles per (tenant, task)
    window_size: int = 16          # admitted TRAIN examples per training request (cumulative datasets)
    holdout_percent: int = 40      # sessions held out for the gate: ~10 per window of 16, enough for its paired test
    eval_cases: int = 24           # fresh cases measuring the final adapter
    concurrency: int = 8
    traffic_seed: int = 11
    eval_seed: int = 99_999
    trainer_epochs: int = 1         # passes over the (cumulative) dataset per training request
    release_timeout_s: float = 600.0
    report_dir: Path | None = None  # default: <home>/report
    free_ports: bool = False       # pick unused loopback ports (tests); else the documented defaults
    topics_prefix: str = ""
    tool_cycles: int = 0           # cycles of the tool-using task (initech/support-agent, adaptloop.ops.tool_loop) beside the pairs


@dataclass
class Measurement:
    """Validator success of what the gateway served for one (tenant, task) during one cycle."""

    tenant: str
    task: str
    cycle: int
    at_ms: int
    count: int
    successes: int
    served_by: list[str]

    @property
    def success(self) -> float:
        return self.successes / self.count if self.count else 0.0


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


def _say(message: str, started: float = time.monotonic()) -> None:
    print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)


class Agent:
    """The simulated agents: call the gateway like any OpenAI client would."""

    def __init__(self, gateway_url: str, concurrency: int,
                 tenant_headers: dict[str, dict[str, str]] | None = None) -> None:
        self.client = httpx.AsyncClient(base_url=gateway_url, timeout=180)
        # Per-tenant request headers (e.g. the tenant's gateway key once the gateway asks for one).
        self.tenant_headers = dict(tenant_headers or {})
        self.limit = asyncio.Semaphore(concurrency)

    async def ask(self, tenant: str, task: str, sentence: str, session_id: str, agent: str) -> tuple[str, str, str]:
        """(interaction id, adapter that served, answer)."""
        spec = example_catalogue().get(task)
        async with self.limit:
            response = await self.client.post("/v1/chat/completions", headers=self.tenant_headers.get(tenant, {}) | {
                "x-adaptloop-session": session_id, "x-adaptloop-agent": agent,
            }, json={
                "model": alias(tenant, task),
                "messages": [{"role": "system", "content": spec.system_prompt},
                             {"role": "user", "content": sentence}],
                "max_tokens": spec.max_new_tokens or 64, "temperature": 0.0,
            })
        if response.status_code != 200:
            raise StackError(f"gateway answered {response.status_code}: {response.text[:300]}")
        body = response.json()
        return (response.headers["x-adaptloop-interaction-id"], response.headers["x-adaptloop-adapter"],
                body["choices"][0]["message"]["content"] or "")

    async def feedback(self, tenant: str, **body: Any) -> None:
        """A verdict on a call, as any agent sends it: ``POST /v1/feedback`` with the tenant's key (202: it is safe)."""
        async with self.limit:
            response = await self.client.post("/v1/feedback", headers=self.tenant_headers.get(tenant, {}),
                                              json={k: v for k, v in body.items() if v is not None})
        if response.status_code != 202:
            raise StackError(f"the gateway refused the feedback: {response.status_code} {response.text[:300]}")

    async def close(self) -> None:
        await self.client.aclose()


class PairLoop:
    """One (tenant, task): traffic -> wait for its training request -> its decision -> hot-load, per cycle."""

    def __init__(self, config: DemoConfig, agent: Agent, kafka: KafkaSettings,
                 topics: Topics, tenant: str, task: str) -> None:
        from adaptloop.streams.stages import split  # the streams' own (pure) split: the demo predicts it

        self.config, self.agent, self.kafka, self.topics = config, agent, kafka, topics
        self.tenant, self.task = tenant, task
        self.spec = example_catalogue().get(task)
        self.cases = case_generator(task, config.traffic_seed + sum(map(ord, tenant + task)))
        self.split = split
        self.predicted_train = 0
        self.sessions = 0
        self.served = "base"
        self.measurements: list[Measurement] = []
        self.decisions: list[dict] = []

    @property
    def name(self) -> str:
        return alias(self.tenant, self.task)

    def _next_session(self) -> tuple[str, bool]:
        self.sessions += 1
        session = f"{self.tenant}-{self.task}-s{self.sessions}"
        is_train = self.split(self.tenant, self.task, session, self.config.holdout_percent) == "TRAIN"
        return session, is_train

    async def _call(self, case, session: str) -> tuple[bool, str]:
        iid, adapter, answer = await self.agent.ask(self.tenant, self.task, case.sentence, session, "demo-agent")
        verdict = self.spec.judge(answer, case.answer)
        await self.agent.feedback(self.tenant, interaction_id=iid, source="HUMAN", success=verdict.ok,
                                  score=verdict.score, correction=None if verdict.ok else case.answer,
                                  labeler="demo-reviewer", reason=verdict.reason[:4000])
        return verdict.ok, adapter

    async def traffic(self, train_target: int) -> list[tuple[bool, str]]:
        """Calls (each its own session) until the predicted admitted TRAIN count reaches ``train_target``."""
        calls = []
        while self.predicted_train < train_target:
            session, is_train = self._next_session()
            self.predicted_train += is_train
            calls.append(self._call(self.cases.case(), session))
        return await asyncio.gather(*calls)

    def measure(self, cycle: int, results: list[tuple[bool, str]]) -> Measurement:
        m = Measurement(self.tenant, self.task, cycle, now_ms(), len(results), sum(ok for ok, _ in results),
                        sorted({adapter for _, adapter in results}))
        self.measurements.append(m)
        _say(f"{self.name} cycle {cycle}: served by {m.served_by}, validator success {m.success:.0%} "
             f"({m.successes}/{m.count})")
        return m

    async def wait_for_request(self, train_target: int, timeout_s: float) -> dict:
        """The training request that fired at ``train_target`` TRAIN examples; tops up traffic if none comes."""
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            requests = await asyncio.to_thread(read_topic, self.kafka, self.topics, "training_requests", "training_request")
            mine = [r for r in requests if (r["tenant"], r["task"]) == (self.tenant, self.task)
                    and r["train_count"] >= train_target]
            if mine:
                return mine[0]
            if time.monotonic() - quiet_since > TOP_UP_AFTER_S:
                _say(f"{self.name}: no training request at {train_target} TRAIN examples yet "
                     f"(some were not admitted?): {TOP_UP_CALLS} more calls")
                await self.traffic(self.predicted_train + TOP_UP_CALLS)
                quiet_since = time.monotonic()
            await asyncio.sleep(2)
        raise StackError(f"no training request for {self.name} at {train_target} TRAIN examples within {timeout_s:.0f}s")

    async def wait_for_decision(self, request: dict, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            releases = await asyncio.to_thread(read_topic, self.kafka, self.topics, "releases", "adapter_release")
            for release in releases:
                if release["lineage"]["request_id"] == request["request_id"]:
                    return release
            await asyncio.sleep(1)
        raise StackError(f"no decision on {self.name}'s request {request['request_id'][:12]} within {timeout_s:.0f}s")

    async def wait_until_served(self, version: str, timeout_s: float = 180) -> None:
        probe = self.cases.case()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _, adapter, _ = await self.agent.ask(self.tenant, self.task, probe.sentence, f"probe-{uuid.uuid4()}",
                                                 "demo-probe")
            if adapter == version:
                return
            await asyncio.sleep(1)
        raise StackError(f"the gateway did not route {self.name} to {version} within {timeout_s:.0f}s")

    async def run(self) -> None:
        config = self.config
        for cycle in range(1, config.cycles + 1):
            target = cycle * config.window_size
            results = await self.traffic(target)
            self.measure(cycle - 1, results)
            request = await self.wait_for_request(target, config.release_timeout_s)
            _say(f"{self.name}: training request {request['request_id'][:12]} ({request['train_count']} TRAIN, "
                 f"{request['holdout_count']} HOLDOUT examples); waiting for curation -> training -> gate")
            release = await self.wait_for_decision(request, config.release_timeout_s)
            self.decisions.append(release)
            evaluation = release["evaluation"]
            _say(f"{self.name}: gate {release['state']} {release['version']}: candidate "
                 f"{evaluation['candidate_score']:.0%} vs {evaluation['incumbent']} {evaluation['incumbent_score']:.0%} "
                 f"on {evaluation['holdout_count']} curated holdout examples")
            if release["state"] in SERVABLE:
                await self.wait_until_served(release["version"])
                self.served = release["version"]
                _say(f"{self.name}: the gateway now serves {release['version']}")
        # The final adapter, on fresh cases; no outcomes, so no further training is triggered.
        cases = case_generator(self.task, config.eval_seed).cases(config.eval_cases)
        answers = await asyncio.gather(*(self.agent.ask(self.tenant, self.task, c.sentence, f"eval-{uuid.uuid4()}",
                                                        "demo-eval") for c in cases))
        results = [(self.spec.judge(answer, case.answer).ok, adapter) for case, (_, adapter, answer) in zip(cases, answers)]
        self.measure(config.cycles, results)


def run_demo(config: DemoConfig) -> DemoResult:
    timings: dict[str, float] = {}
    started = time.monotonic()
    _say("preparing the base model (SmolLM2-135M-Instruct, converted once and cached)")
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
        "ADAPTLOOP_TRAINER_RECIPE": json.dumps({"epochs": config.trainer_epochs}),
        # The demo's tasks are the example catalogue's, whatever catalogue this shell names.
        FILE_ENV: str(EXAMPLE_CATALOGUE),
    })
    with stack.start(progress=_say):
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
    try:
        loops = [PairLoop(config, agent, kafka, topics, tenant, task) for tenant, task in config.pairs]
        tool_measurements = await asyncio.gather(*(loop.run() for loop in loops),
                                                 *([asyncio.to_thread(_tool_cycles, tool, config.tool_cycles)] if tool else []))
    finally:
        await agent.close()
    return DemoResult(measurements=[m for loop in loops for m in loop.measurements]
                      + (tool_measurements[-1] if tool else []),
                      releases=[r for loop in loops for r in loop.decisions] + (tool.decisions if tool else []))


def _tool_cycles(tool: ToolLoop, cycles: int) -> list[Measurement]:
    """The tool-using task beside the others: held-out episode success of the base, then after each cycle."""
    measurements = []
    for cycle in range(cycles + 1):
        if cycle:
            step = tool.cycle()
            _say(f"{tool.model}: {step['episodes']} reviewed episodes -> {step['decision']} {step['version']}")
        measured = tool.measure()
        served = tool.decisions[-1]["version"] if tool.decisions and tool.decisions[-1]["state"] == "RELEASED" else "base"
        measurements.append(Measurement(tool.tenant, tool.task, cycle, now_ms(), measured["episodes"],
                                        round(measured["success"] * measured["episodes"]), [served]))
        _say(f"{tool.model} cycle {cycle}: held-out episode success {measured['success']:.0%}")
    return measurements


def _finish(config: DemoConfig, stack: LocalStack, kafka: KafkaSettings, topics: Topics, ports: StackPorts,
            result: DemoResult) -> None:
    """Counts, loop latency of every release, the report (the stack is still up: it reads the topics)."""
    from adaptloop.ops import loop_latency, report

    result.counts = {name: count_messages(kafka, topics.name(name), idle_s=1.0)
                     for name in ("interactions", "outcomes", "curated", "dead_letters", "training_requests", "releases")}
    _say(f"topic counts: {result.counts}")
    try:
        result.loop_latency = loop_latency.latencies(kafka, topics, sidecar_url=f"http://127.0.0.1:{ports.sidecar}",
                                                   trainer_log=stack.home / "logs" / "trainer.log")
    except AdaptloopError as exc:
        _say(f"loop latency not measured: {exc}")
    report_dir = config.report_dir or config.home / "report"
    report.build_report(kafka, topics, report_dir, demo=result.as_json(), latencies=result.loop_latency)
    result.report = str(report_dir / "index.html")
    _say(f"report written: {result.report}")


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
