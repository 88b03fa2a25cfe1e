"""``adaptloop trainer``: the training service's consumer loop around ``TrainerService`` (``trainers/service.py``).

Requests are read ahead into the fair queue (``trainers.queue``: tenants take turns) and up to
``TrainerSettings.parallel_jobs`` of them are worked on at once, never two of one (tenant, task): the next
request of an alias is gated against what the one before it released. Offsets are committed in order, each
once every request before it is done, so a restart replays what was in work (step 2 of the service makes a
replay of a decided request harmless).

On SIGTERM or SIGINT the loop stops taking requests; requests in work are left undecided (not committed,
replayed after a restart), and nothing is published for a job the stop ended.

    HF_HUB_OFFLINE=1 adaptloop trainer               # settings from ADAPTLOOP_TRAINER_* variables
    HF_HUB_OFFLINE=1 adaptloop trainer --max-requests 1
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Mapping

from confluent_kafka import Consumer, Message, TopicPartition

from adaptloop.errors import ConfigError, DeserializationError, TrainingError
from adaptloop.kafka import consumer_config
from adaptloop.processes import mark_ready
from adaptloop.schemas import SerdeContext
from adaptloop.schemas.contract import now_ms
from adaptloop.settings import TrainerSettings
from adaptloop.tasks import Catalogue, load_catalogue
from adaptloop.trainers.queue import FairQueue
from adaptloop.trainers.service import TrainerService

log = logging.getLogger("adaptloop.trainer")

#: A training job can take many minutes between polls; librdkafka's default (5 min) would evict us.
MAX_POLL_INTERVAL_MS = 2 * 60 * 60 * 1000


def queued_request(service: TrainerService, msg: Message) -> Mapping[str, Any]:
    """What the fair queue needs of a polled request (an undecodable one queues as its own tenant, and is
    dead-lettered when its turn comes)."""
    try:
        return service.requests_serde.deserialize(msg.value(), SerdeContext(msg.topic(), msg.partition(), msg.offset()))
    except DeserializationError:
        return {"tenant": "", "task": "", "request_id": f"undecodable@{msg.offset()}", "created_at": 0}


class _Job:
    """One request in work on a daemon thread: a stop ends the process without waiting for it (it is replayed)."""

    def __init__(self, work: Callable[[Message], None], msg: Message, key: tuple[str, str],
                 finished: threading.Event) -> None:
        self.msg, self.key, self.error, self.done = msg, key, None, False
        self._finished = finished
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"request@{msg.offset()}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[Message], None]) -> None:
        try:
            work(self.msg)
        except BaseException as exc:  # handed to the loop, which stops on it
            self.error = exc
        finally:
            self.done = True
            self._finished.set()


class _Stopping(BaseException):
    """SIGTERM arrived while requests were in work (a BaseException, so that no ``except Exception`` on the
    way -- Ray's, ours -- turns a stop into a failed request)."""


def import_gate_libraries() -> None:
    """What the gate's evaluations import (torch, transformers, peft; 4 s on 2 cores), once at start: a first
    request's incumbent evaluation imported them in its thread while the request's training was being set up."""
    import importlib

    for name in ("torch", "transformers", "peft", "adaptloop.trainers.evaluate", "adaptloop.trainers.vllm_eval",
                 "adaptloop.trainers.gate", "adaptloop.trainers.release", "adaptloop.trainers.replay"):
        importlib.import_module(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (resolved lazily on first use)


def run(settings: TrainerSettings, *, max_requests: int | None = None, poll_s: float = 1.0,
        catalogue: Catalogue | None = None) -> int:
    """Consume training requests until SIGTERM/SIGINT (or ``max_requests`` handled); return how many."""
    from adaptloop.trainers import ray_job

    state = {"stop": False}
    parallel = settings.parallel_jobs  # >= 1 (the setting's bound)
    working: dict[int, _Job] = {}  # offset -> its job
    finished = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: stopping", signum)
        state["stop"] = True
        if working:
            raise _Stopping()

    for method in ray_job.RECIPES:  # a broken recipe file or setting stops the start, not a request later
        ray_job.recipe_config(settings, method)
    service = TrainerService(settings, catalogue=catalogue)
    topic = settings.topics.name("training_requests")
    consumer = Consumer(consumer_config(settings.kafka, settings.group_id,
                                        **{"max.poll.interval.ms": MAX_POLL_INTERVAL_MS}))
    handled = 0
    previous: dict = {}
    # The requests topic has one partition (Topics.layout): offsets order it. Requests are served fairly
    # across tenants (trainers.queue), read ahead of those in training.
    queue, messages = FairQueue(), {}

    def on_revoke(consumer: Consumer, partitions: list) -> None:
        queue.clear()
        messages.clear()

    def work(msg: Message) -> None:
        try:
            service.handle(msg)
        except TrainingError as exc:
            if state["stop"]:
                raise  # the stop ended the job: it is replayed after a restart, not a failure to record
            # The Ray job failed: put the failure on record rather than retry it forever.
            request = service.requests_serde.deserialize(msg.value(), SerdeContext(topic, msg.partition(), msg.offset()))
            service.reject(request, f"training failed: {exc}", None)

    try:
        service.follow()
        ray_job.start_ray(settings)
        ray_job.warm_workers(settings)  # they import torch, transformers and trl while the consumer subscribes
        import_gate_libraries()
        # After ray.init, which installs its own SIGTERM handler (it would exit without cleaning up).
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        consumer.subscribe([topic], on_revoke=on_revoke)
        mark_ready()
        log.info("trainer ready: group %s on %s, %d job(s) at once, artifacts in %s, base model %s",
                 settings.group_id, topic, parallel, settings.artifact_dir, service.base_model)
        while not state["stop"] and (max_requests is None or handled < max_requests):
            room = parallel - len(working)
            if max_requests is not None:
                room = min(room, max_requests - handled - len(working))
            if working and (room <= 0 or not len(queue)):
                finished.wait(poll_s)
                finished.clear()
                timeout = 0.0
            else:
                timeout = 0.0 if len(queue) else poll_s
            # Read what is there (the poll also keeps this consumer in its group while jobs run).
            for msg in consumer.consume(100, timeout=timeout):
                if msg.error():
                    log.warning("consumer: %s", msg.error())
                    continue
                queue.add(msg.offset(), queued_request(service, msg))
                messages[msg.offset()] = msg
            busy = {job.key for job in working.values()}
            while room > 0 and (picked := queue.next(busy)) is not None:
                offset, request = picked
                key = (request["tenant"], request["task"])
                if len(queue):
                    log.info("request %s of %s/%s next; waiting: %s", request["request_id"][:12], request["tenant"],
                             request["task"], queue.waiting(now_ms()))
                working[offset] = _Job(work, messages.pop(offset), key, finished)
                busy.add(key)
                room -= 1
            for offset in [o for o, job in working.items() if job.done]:
                job = working.pop(offset)
                if job.error is not None:  # anything but a recorded failure stops the service, as it always has
                    raise job.error
                position = queue.done(offset)
                if position is not None:  # the oldest request not done yet: a restart reads from there
                    consumer.commit(offsets=[TopicPartition(topic, job.msg.partition(), position)], asynchronous=False)
                handled += 1
    except _Stopping:
        log.info("stopped with %d request(s) in work; not committed, they will be replayed", len(working))
    finally:
        state["stop"] = True
        consumer.close()
        service.close()
        ray_job.stop_ray()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("trainer stopped after %d requests", handled)
    return handled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop trainer", description="Run the training service.")
    parser.add_argument("--max-requests", type=int, default=None, help="exit after handling this many requests")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TrainerSettings()
    if settings.omp_wait_policy:  # before torch or Ray start: OpenMP reads it once, Ray's workers inherit it
        os.environ.setdefault("OMP_WAIT_POLICY", settings.omp_wait_policy)
    try:
        catalogue = load_catalogue()
    except ConfigError as exc:
        print(f"adaptloop trainer: {exc}", file=sys.stderr)
        return 2
    run(settings, max_requests=args.max_requests, catalogue=catalogue)
    return 0


if __name__ == "__main__":
    sys.exit(main())
