"""``adaptloop tool-bench``: the tool-using task through the whole loop, cycle by cycle, as JSON.

    adaptloop tool-bench                                   # 1 cycle of initech/support-agent on a fresh stack
    adaptloop tool-bench --cycles 2 --out bench-tool-task.json

Per cycle: episodes with a reviewer on every turn (``support_task.run_episode``: the right tool calls when
a turn was wrong, then the episode's verdict, all over HTTP) until the task's window of TRAIN examples
fires a training request; the trainer's decision; the gateway routing the release; then the served
agent's episode success on held-out episodes (another world: other customers, order ids, items, wording),
and the loop latency of the release by stage (``loop_latency.latencies``). Cycle 0 is the base model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adaptloop.errors import StackError
from adaptloop.ops.stack import LocalStack, StackPorts, free_port
from adaptloop.processes import cpu_name
from adaptloop.sdk import FeedbackClient
from adaptloop.settings import DEFAULT_HOME, KafkaSettings, Topics
from adaptloop.streams.stages import split
from adaptloop.support_task import SupportWorld, run_episode
from adaptloop.tail import TopicTail
from adaptloop.tasks import EXAMPLE_CATALOGUE, FILE_ENV, example_catalogue

TENANT, TASK = "initech", "support-agent"
HOLDOUT_PERCENT = 25
#: The stack's outcome grace: the reviewer's verdict is the only one coming, so the grace is short.
OUTCOME_GRACE_S = 5
#: Enough turns sent and still no training request this long after: some were dropped (duplicates), top up.
TOP_UP_AFTER_S = 30.0


@dataclass
class ToolLoop:
    """One tenant's tool task on a running stack: measure the served agent, run a cycle of the loop."""

    stack: LocalStack
    tenant: str = TENANT
    task: str = TASK
    held_out_episodes: int = 20
    concurrency: int = 4
    timeout_s: float = 1800.0
    world: SupportWorld = field(default_factory=lambda: SupportWorld(7))
    held_world: SupportWorld = field(default_factory=lambda: SupportWorld(99, held_out=True))
    episodes: int = 0
    decisions: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        from openai import OpenAI

        self.key = self.stack.dev_keys[self.tenant]
        self.model = f"{self.tenant}/{self.task}"
        self.client = OpenAI(base_url=self.stack.ports.gateway_url + "/v1", api_key=self.key, max_retries=0, timeout=180)
        self.held = [self.held_world.case() for _ in range(self.held_out_episodes)]
        self.window = example_catalogue().get(self.task).window_size or 36

    def measure(self, *, turns: bool = True) -> dict[str, Any]:
        """What the gateway serves now, on the held-out episodes, without feedback: episode success (the agent
        on its own: a wrong turn ends the episode), and with ``turns`` turn success (each turn judged on a right
        history: the episode replayed with every wrong turn replaced by the right one)."""
        def run(case, takeover: bool):
            return run_episode(self.client, case, self.held_world, model=self.model,
                               episode_id=f"eval-{uuid.uuid4().hex}", takeover=takeover)

        with ThreadPoolExecutor(self.concurrency) as pool:
            alone = list(pool.map(lambda case: run(case, False), self.held))
            replayed = list(pool.map(lambda case: run(case, True), self.held)) if turns else []
        measured = {"episodes": len(alone), "success": sum(v.ok for v, _ in alone) / len(alone),
                    "failures": [v.reason for v, _ in alone if not v.ok][:5]}
        if turns:
            verdicts = [v for _, log in replayed for v in log.verdicts]
            measured |= {"turns": len(verdicts), "turn_success": sum(v.ok for v in verdicts) / len(verdicts)}
        return measured

    def _tail(self, which: str, stem: str) -> TopicTail:
        """A cycle polls a topic every few seconds for minutes: one consumer, not one fresh read per look."""
        return TopicTail(self.stack.kafka, self.stack.topics.name(which), stem).start()

    def _requests(self, tail: TopicTail) -> list[dict]:
        return [p.record for p in tail.records() if (p.record["tenant"], p.record["task"]) == (self.tenant, self.task)]

    def cycle(self) -> dict[str, Any]:
        """Reviewed episodes until a new training request fires; its decision; the release routed.

        ``concurrency`` episodes stay in flight (a new one starts as soon as one ends, not batch by batch: an
        episode's turns vary, and a batch would wait for its longest)."""
        started, first = time.monotonic(), self.episodes
        with self._tail("training_requests", "training_request") as requests, \
                self._tail("releases", "adapter_release") as releases:
            request = self._episodes_until_a_request(requests, started)
            traffic_s = time.monotonic() - started
            release = self._decision(releases, request)
        self.decisions.append(release)
        if release["state"] == "RELEASED":
            self._wait_routed(release["version"])
        return {"episodes": self.episodes - first, "traffic_s": round(traffic_s, 1),
                "request": {"train_count": request["train_count"], "holdout_count": request["holdout_count"]},
                "decision": release["state"], "version": release["version"], "reason": release["reason"],
                "gate": {k: release["evaluation"][k] for k in ("metric", "holdout_count", "candidate_score",
                                                                "incumbent_score")},
                "cycle_s": round(time.monotonic() - started, 1)}

    def _episodes_until_a_request(self, requests: TopicTail, started: float) -> dict:
        seen = len(self._requests(requests))
        feedback = FeedbackClient(self.stack.ports.gateway_url, self.key)
        train_turns, last_done = 0, 0.0

        def run(case, episode: str) -> None:
            run_episode(self.client, case, self.world, model=self.model, episode_id=episode, feedback=feedback)

        with ThreadPoolExecutor(self.concurrency) as pool:
            running: set[Future] = set()
            while len(self._requests(requests)) <= seen:
                if time.monotonic() - started > self.timeout_s:
                    raise StackError(f"no training request for {self.model} within {self.timeout_s:.0f}s")
                # Enough turns sent: curation (its grace, dedupe) is on its way to the window; top up if it stays quiet.
                topping_up = train_turns >= self.window and not running and time.monotonic() - last_done >= TOP_UP_AFTER_S
                while len(running) < self.concurrency and (topping_up or train_turns < self.window):
                    self.episodes += 1
                    episode = f"{self.task}-e{self.episodes}"
                    case = self.world.case()
                    train_turns += (split(self.tenant, self.task, episode, HOLDOUT_PERCENT) == "TRAIN") * len(case.expected_turns())
                    running.add(pool.submit(run, case, episode))
                if running:
                    done, running = wait(running, timeout=2, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                    last_done = time.monotonic() if done else last_done
                else:
                    time.sleep(2)
            for future in running:
                future.result()
        return self._requests(requests)[seen]

    def _decision(self, releases: TopicTail, request: dict) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for release in releases.records():
                if release.record["lineage"]["request_id"] == request["request_id"]:
                    return release.record
            time.sleep(3)
        raise StackError(f"no decision on {request['request_id'][:12]} within {self.timeout_s:.0f}s")

    def _wait_routed(self, version: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            models = httpx.get(self.stack.ports.gateway_url + "/v1/models", timeout=10,
                               headers={"authorization": f"Bearer {self.key}"}).json()["data"]
            if any(m["id"] == self.model and m["adapter"] == version for m in models):
                return
            time.sleep(1)
        raise StackError(f"the gateway did not route {self.model} to {version} within {timeout_s:.0f}s")


def tool_stack(home: Path, *, torch_threads: int = 2) -> LocalStack:
    """A fresh local stack for the tool task (free ports, its own topics, the example catalogue, whose entry for
    the task sets its training: epochs, batch size, learning rate)."""
    return LocalStack(home=home, kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True),
                      topics=Topics(prefix=f"tool{uuid.uuid4().hex[:6]}."), ports=StackPorts.free(),
                      services=("streams", "trainer", "serve", "gateway"), dev_tenants=(TENANT,),
                      extra_env={"ADAPTLOOP_GATEWAY_CANARY_SHARE": "1.0", FILE_ENV: str(EXAMPLE_CATALOGUE),
                                 "ADAPTLOOP_STREAMS_HOLDOUT_PERCENT": str(HOLDOUT_PERCENT),
                                 "ADAPTLOOP_STREAMS_OUTCOME_GRACE_S": str(OUTCOME_GRACE_S),
                                 # Nothing else computes while the trainer trains (the agents wait for it).
                                 "ADAPTLOOP_TRAINER_TORCH_THREADS": str(torch_threads)})


def main(argv: list[str] | None = None) -> int:
    from adaptloop.ops import loop_latency

    parser = argparse.ArgumentParser(prog="adaptloop tool-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--held-out", type=int, default=20, help="held-out episodes measured per cycle")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME / "tool-bench")
    parser.add_argument("--out", type=Path, default=Path("bench-tool-task.json"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tool_stack(args.home).start(progress=print) as stack:
        loop = ToolLoop(stack, held_out_episodes=args.held_out)
        cycles = [{"cycle": 0, "served": "base", **loop.measure()}]
        print(f"cycle 0 (base): episode success {cycles[0]['success']:.0%}")
        for n in range(1, args.cycles + 1):
            step = loop.cycle()
            cycles.append({"cycle": n, **step, **loop.measure()})
            print(f"cycle {n}: {step['decision']} {step['version']}; episode success {cycles[-1]['success']:.0%}")
        latency = loop_latency.latencies(stack.kafka, stack.topics, sidecar_url=f"http://127.0.0.1:{stack.ports.sidecar}",
                                       trainer_log=stack.home / "logs" / "trainer.log")
    result = {"command": "adaptloop tool-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": cpu_name(), "date": dt.date.today().isoformat(), "task": f"{TENANT}/{TASK}",
              "cycles": cycles, "loop_latency": latency, "wall_s": round(time.monotonic() - started, 1)}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
