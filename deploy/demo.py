"""``adaptloop demo``: the whole loop on the embedded stack, by itself, with the numbers.

    make demo                       # set-up included
    adaptloop demo --traffic 100    # after `make install`

A simulated agent asks the gateway to extract order sentences into exact JSON (task
``order-extract``); a simulated reviewer judges every answer against the truth and sends an
outcome with the correct answer when it was wrong. The stack does the rest: curation,
a training request, a Ray LoRA job, the gate, a release, hot-loading into vLLM, routing.
The served agent's validator success on a held-out set is printed before and after.
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

import httpx

from adaptloop.artifacts import alias
from adaptloop.errors import AdaptloopError, StackError
from adaptloop.kafka import count_messages, read_ranges
from adaptloop.model import ensure_base_model
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.sdk import Recorder
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, Topics
from adaptloop.stack import LocalStack, StackPorts, free_port
from adaptloop.tasks import OrderCase, OrderGenerator, task_spec

TENANT = "acme"
TASK = "order-extract"


@dataclass
class DemoConfig:
    home: Path = DEFAULT_HOME / "demo"
    traffic: int = 100             # agent calls whose outcomes feed curation
    eval_cases: int = 40           # held-out sentences measured before and after
    window_size: int = 64          # admitted training examples per training request
    concurrency: int = 8
    traffic_seed: int = 11
    eval_seed: int = 99_999
    release_timeout_s: float = 1500.0
    free_ports: bool = False       # pick unused loopback ports (tests); else the documented defaults


@dataclass
class DemoResult:
    before: float
    after: float
    adapter: str
    release: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)


def _say(message: str, started: float = time.monotonic()) -> None:
    print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)


class Agent:
    """The simulated agent: calls the gateway like any OpenAI client would."""

    def __init__(self, gateway_url: str, model: str, concurrency: int, api_key: str) -> None:
        self.client = httpx.AsyncClient(base_url=gateway_url, timeout=120,
                                        headers={"authorization": f"Bearer {api_key}"})
        self.model = model
        self.spec = task_spec(TASK)
        self.limit = asyncio.Semaphore(concurrency)

    async def ask(self, case: OrderCase, session_id: str, agent: str) -> tuple[str, str, str]:
        """(interaction id, adapter that served, answer)."""
        async with self.limit:
            response = await self.client.post("/v1/chat/completions", headers={
                "x-adaptloop-session": session_id, "x-adaptloop-agent": agent,
            }, json={
                "model": self.model,
                "messages": [{"role": "system", "content": self.spec.system_prompt},
                             {"role": "user", "content": case.sentence}],
                "max_tokens": 64, "temperature": 0.0,
            })
        if response.status_code != 200:
            raise StackError(f"gateway answered {response.status_code}: {response.text[:300]}")
        body = response.json()
        return (response.headers["x-adaptloop-interaction-id"], response.headers["x-adaptloop-adapter"],
                body["choices"][0]["message"]["content"] or "")

    async def success_rate(self, cases: list[OrderCase]) -> tuple[float, set[str]]:
        answers = await asyncio.gather(*(self.ask(c, f"eval-{uuid.uuid4()}", "demo-eval") for c in cases))
        hits = sum(self.spec.judge(answer, case.answer).ok for case, (_, _, answer) in zip(cases, answers))
        return hits / len(cases), {adapter for _, adapter, _ in answers}

    async def close(self) -> None:
        await self.client.aclose()


async def _traffic(agent: Agent, recorder: Recorder, cases: list[OrderCase]) -> int:
    """Agent calls plus a reviewer's outcome for each: success, or the correct answer."""
    async def one(i: int, case: OrderCase) -> bool:
        iid, _, answer = await agent.ask(case, session_id=f"session-{i // 2}", agent="demo-agent")
        verdict = agent.spec.judge(answer, case.answer)
        recorder.outcome(iid, tenant=TENANT, source="HUMAN", success=verdict.ok, score=verdict.score,
                         correction=None if verdict.ok else case.answer, labeler="demo-reviewer",
                         reason=verdict.reason)
        return verdict.ok

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))
    recorder.flush()
    return sum(results)


def _wait_for_release(kafka: KafkaSettings, topics: Topics, timeout_s: float) -> dict:
    topic = topics.name("releases")
    decode = serde_for("adapter_release", kafka.schema_registry_url).deserialize
    deadline = time.monotonic() + timeout_s
    seen: set[tuple[str, str]] = set()
    while time.monotonic() < deadline:
        for msg in read_ranges(kafka, topic, idle_s=1.0):
            release = decode(msg.value(), SerdeContext(topic, msg.partition(), msg.offset()))
            if (release["tenant"], release["task"]) != (TENANT, TASK):
                continue
            if (release["version"], release["state"]) not in seen:
                seen.add((release["version"], release["state"]))
                _say(f"registry: {release['version']} {release['state']} ({release['reason']})")
            if release["state"] in ("RELEASED", "PROMOTED"):
                return release
        time.sleep(3)
    raise StackError(f"no release for {TENANT}/{TASK} within {timeout_s:.0f}s")


async def _wait_until_served(agent: Agent, version: str, probe: OrderCase, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, adapter, _ = await agent.ask(probe, f"probe-{uuid.uuid4()}", "demo-probe")
        if adapter == version:
            return
        await asyncio.sleep(1)
    raise StackError(f"the gateway did not route {alias(TENANT, TASK)} to {version} within {timeout_s:.0f}s")


def run_demo(config: DemoConfig) -> DemoResult:
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        timings[name] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()

    _say("preparing the base model (SmolLM2-135M-Instruct, converted once and cached)")
    ensure_base_model(DEFAULT_HOME)
    ports = StackPorts.free() if config.free_ports else StackPorts()
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True) if config.free_ports else KafkaSettings()
    topics = Topics()
    # Canary share 1.0: the demo measures before/after, so the new release takes all traffic at once.
    stack = LocalStack(home=config.home, kafka=kafka, topics=topics, ports=ports,
                       extra_env={"ADAPTLOOP_STREAMS_WINDOW_SIZE": str(config.window_size),
                                  "ADAPTLOOP_GATEWAY_CANARY_SHARE": "1.0"})
    traffic_cases = OrderGenerator(config.traffic_seed).cases(config.traffic)
    eval_cases = OrderGenerator(config.eval_seed).cases(config.eval_cases)
    with stack.start(progress=_say):
        lap("stack_start")
        return asyncio.run(_loop(config, stack, kafka, topics, ports, traffic_cases, eval_cases, timings, lap))


async def _loop(config, stack, kafka, topics, ports, traffic_cases, eval_cases, timings, lap) -> DemoResult:
    agent = Agent(ports.gateway_url, alias(TENANT, TASK), config.concurrency, stack.dev_keys[TENANT])
    try:
        before, served_by = await agent.success_rate(eval_cases)
        _say(f"BEFORE: served by {sorted(served_by)}, validator success {before:.0%} on {len(eval_cases)} held-out sentences")
        lap("eval_before")
        with Recorder(kafka, topics) as recorder:
            ok = await _traffic(agent, recorder, traffic_cases)
        _say(f"agent traffic: {len(traffic_cases)} calls through the gateway, {ok} judged correct, "
             f"{len(traffic_cases) - ok} corrected by the reviewer; waiting for curation -> training -> gate")
        lap("traffic")
        release = await asyncio.to_thread(_wait_for_release, kafka, topics, config.release_timeout_s)
        evaluation = release["evaluation"]
        _say(f"gate: candidate {evaluation['candidate_score']:.0%} vs {evaluation['incumbent']} "
             f"{evaluation['incumbent_score']:.0%} on {evaluation['holdout_count']} curated holdout examples")
        lap("curate_train_gate")
        await _wait_until_served(agent, release["version"], eval_cases[0])
        _say(f"gateway now serves {alias(TENANT, TASK)} with {release['version']}")
        lap("hot_load")
        after, served_by = await agent.success_rate(eval_cases)
        _say(f"AFTER:  served by {sorted(served_by)}, validator success {after:.0%} on {len(eval_cases)} held-out sentences")
        lap("eval_after")
        counts = {name: count_messages(kafka, topics.name(name), idle_s=1.0)
                  for name in ("interactions", "outcomes", "curated", "dead_letters", "training_requests", "releases")}
        _say(f"topic counts: {counts}")
        return DemoResult(before, after, release["version"], release, counts, timings)
    finally:
        await agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop demo", description=__doc__.splitlines()[0])
    defaults = DemoConfig()
    parser.add_argument("--home", type=Path, default=defaults.home)
    parser.add_argument("--traffic", type=int, default=defaults.traffic)
    parser.add_argument("--eval-cases", type=int, default=defaults.eval_cases)
    parser.add_argument("--window-size", type=int, default=defaults.window_size)
    parser.add_argument("--free-ports", action="store_true", help="use unused loopback ports")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    config = DemoConfig(home=args.home, traffic=args.traffic, eval_cases=args.eval_cases,
                        window_size=args.window_size, free_ports=args.free_ports)
    started = time.monotonic()
    try:
        result = run_demo(config)
    except AdaptloopError as exc:
        print(f"adaptloop demo failed: {exc}", file=sys.stderr)
        return 1
    wall = time.monotonic() - started
    print(f"\nvalidator success of the served agent: before {result.before:.0%} -> after {result.after:.0%} "
          f"(adapter {result.adapter}); wall time {wall / 60:.1f} min; stages {result.timings_s}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result) | {"wall_s": round(wall, 1)}, indent=2, default=str))
    return 0 if result.after > result.before else 1


if __name__ == "__main__":
    sys.exit(main())
