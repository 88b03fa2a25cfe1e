"""The demo's (tenant, task) pipelines: what the demo is configured with, its simulated agent and reviewer, and
one pair's cycles (traffic, the training request it fires, the gate's decision, the hot-load), measured."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from adaptloop.artifacts import alias
from adaptloop.demo_tasks import case_generator
from adaptloop.errors import StackError
from adaptloop.tail import TopicTail
from adaptloop.schemas.contract import SERVABLE, now_ms
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, Topics
from adaptloop.tasks import example_catalogue

#: (tenant, task) pairs the demo drives; each is one alias ``tenant/task`` at the gateway.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("acme", "order-extract"), ("globex", "ticket-triage"))
#: Top-up calls when a window has not fired (an example was dropped, e.g. as a near-duplicate).
TOP_UP_CALLS = 4
#: No new training request this long after the last outcome: top up (curation takes well under a second per
#: example here; a top-up too many only counts towards the next window).
TOP_UP_AFTER_S = 10.0


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
    parallel_jobs: int = 2          # training requests in work at once (one per pair here; 1-thread jobs, 2 cores)
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


def say(message: str, started: float = time.monotonic()) -> None:
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


def follow(kafka: KafkaSettings, topics: Topics) -> dict[str, TopicTail]:
    """The topics the pair loops watch, each followed once for all of them (a decision is seen within ~0.2 s;
    reading a topic afresh per look cost a consumer join and an idle wait each time). Close each when done."""
    return {name: TopicTail(kafka, topics.name(name), stem).start()
            for name, stem in (("training_requests", "training_request"), ("releases", "adapter_release"))}


class PairLoop:
    """One (tenant, task): traffic -> wait for its training request -> its decision -> hot-load, per cycle."""

    def __init__(self, config: DemoConfig, agent: Agent, tails: dict[str, TopicTail], tenant: str, task: str) -> None:
        from adaptloop.streams.stages import split  # the streams' own (pure) split: the demo predicts it

        self.config, self.agent = config, agent
        self.tails = tails  # the topics ``follow`` follows for every pair
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
        say(f"{self.name} cycle {cycle}: served by {m.served_by}, validator success {m.success:.0%} "
             f"({m.successes}/{m.count})")
        return m

    async def wait_for_request(self, train_target: int, timeout_s: float) -> dict:
        """The training request that fired at ``train_target`` TRAIN examples; tops up traffic if none comes."""
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            requests = await asyncio.to_thread(self.tails["training_requests"].records)
            mine = [r.record for r in requests if (r.record["tenant"], r.record["task"]) == (self.tenant, self.task)
                    and r.record["train_count"] >= train_target]
            if mine:
                return mine[0]
            if time.monotonic() - quiet_since > TOP_UP_AFTER_S:
                say(f"{self.name}: no training request at {train_target} TRAIN examples yet "
                     f"(some were not admitted?): {TOP_UP_CALLS} more calls")
                await self.traffic(self.predicted_train + TOP_UP_CALLS)
                quiet_since = time.monotonic()
            await asyncio.sleep(0.5)
        raise StackError(f"no training request for {self.name} at {train_target} TRAIN examples within {timeout_s:.0f}s")

    async def wait_for_decision(self, request: dict, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            releases = await asyncio.to_thread(self.tails["releases"].records)
            for release in (p.record for p in releases):
                if release["lineage"]["request_id"] == request["request_id"]:
                    return release
            await asyncio.sleep(0.2)
        raise StackError(f"no decision on {self.name}'s request {request['request_id'][:12]} within {timeout_s:.0f}s")

    async def wait_until_served(self, version: str, timeout_s: float = 180) -> None:
        """Until the gateway routes the alias to ``version`` (as its canary, at whatever share, or its incumbent):
        its ``/v1/models`` says so without a model call."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = await self.agent.client.get("/v1/models", headers=self.agent.tenant_headers.get(self.tenant, {}))
            if response.status_code == 200 and any(
                    entry["id"] == self.name and version in (entry.get("canary"), entry.get("incumbent"))
                    for entry in response.json().get("data", [])):
                return
            await asyncio.sleep(0.2)
        raise StackError(f"the gateway did not route {self.name} to {version} within {timeout_s:.0f}s")

    async def run(self) -> None:
        config = self.config
        for cycle in range(1, config.cycles + 1):
            target = cycle * config.window_size
            results = await self.traffic(target)
            self.measure(cycle - 1, results)
            request = await self.wait_for_request(target, config.release_timeout_s)
            say(f"{self.name}: training request {request['request_id'][:12]} ({request['train_count']} TRAIN, "
                 f"{request['holdout_count']} HOLDOUT examples); waiting for curation -> training -> gate")
            release = await self.wait_for_decision(request, config.release_timeout_s)
            self.decisions.append(release)
            evaluation = release["evaluation"]
            say(f"{self.name}: gate {release['state']} {release['version']}: candidate "
                 f"{evaluation['candidate_score']:.0%} vs {evaluation['incumbent']} {evaluation['incumbent_score']:.0%} "
                 f"on {evaluation['holdout_count']} curated holdout examples")
            if release["state"] in SERVABLE:
                await self.wait_until_served(release["version"])
                self.served = release["version"]
                say(f"{self.name}: the gateway now serves {release['version']}")
        # The final adapter, on fresh cases; no outcomes, so no further training is triggered.
        cases = case_generator(self.task, config.eval_seed).cases(config.eval_cases)
        answers = await asyncio.gather(*(self.agent.ask(self.tenant, self.task, c.sentence, f"eval-{uuid.uuid4()}",
                                                        "demo-eval") for c in cases))
        results = [(self.spec.judge(answer, case.answer).ok, adapter) for case, (_, adapter, answer) in zip(cases, answers)]
        self.measure(config.cycles, results)

