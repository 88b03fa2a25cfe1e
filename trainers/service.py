"""The trainer service (``adaptloop trainer``): training requests in, adapter releases out.

For each record of the training-requests topic:

1. decode it (an undecodable record goes to the dead-letter topic with its reason and is committed);
2. skip it if a release whose ``lineage.request_id`` is this request's id already exists (replays);
3. materialise the dataset: exactly the curated records named by the request's offset ranges,
   this tenant/task, admitted, deduplicated by ``example_id``, split TRAIN/HOLDOUT by the record;
   its digest is the sha256 of the canonical JSON of the sorted examples, and a snapshot is kept
   at ``<artifact_dir>/<request_id>/dataset.json``;
4. train a LoRA adapter with the SFT recipe in a Ray Train job (``adaptloop.trainers.ray_job``);
5. evaluate candidate and incumbent on the holdout examples and gate: RELEASED iff
   ``candidate >= incumbent + gate_margin``, else REJECTED;
6. publish the AdapterRelease keyed by its version, wait for the broker's acknowledgement, and
   only then commit the request's offset (at-least-once; step 2 makes the replay harmless).

A request that cannot give an adapter (no examples, no holdout, unknown task) yields a REJECTED
release with the reason, so the decision is on record and the request is not retried forever.

    HF_HUB_OFFLINE=1 adaptloop trainer               # settings from ADAPTLOOP_TRAINER_* variables
    HF_HUB_OFFLINE=1 adaptloop trainer --max-requests 1
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from confluent_kafka import Consumer, Message

from adaptloop.errors import AdaptloopError, ConfigError, DeserializationError, TrainingError
from adaptloop.kafka import DeliveryTracker, Range, consumer_config, read_ranges
from adaptloop.processes import mark_ready
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import TrainerSettings
from adaptloop.tasks import TaskSpec, task_spec

log = logging.getLogger("adaptloop.trainer")

METHOD = "sft"
STAGE = "trainer"
#: Fewer admitted TRAIN examples than this: the request is rejected without training.
MIN_TRAIN_EXAMPLES = 8
#: A training job can take many minutes between polls; librdkafka's default (5 min) would evict us.
MAX_POLL_INTERVAL_MS = 2 * 60 * 60 * 1000


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"adaptloop {version('adaptloop')}"
    except PackageNotFoundError:
        return "adaptloop (not installed)"


def now_ms() -> int:
    return int(time.time() * 1000)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Dataset:
    """One immutable dataset snapshot: what a request named, after filtering and deduplication."""

    train: list[dict]
    holdout: list[dict]
    digest: str
    records_read: int
    dropped: dict[str, int]

    @property
    def train_ids(self) -> list[str]:
        return [e["example_id"] for e in self.train]


def _example(record: Mapping[str, Any]) -> dict:
    """The part of a CuratedExample that training and evaluation use (and the digest covers)."""
    return {"example_id": record["example_id"], "split": record["split"], "kind": record["kind"],
            "prompt_messages": [{"role": m["role"], "content": m["content"]} for m in record["prompt_messages"]],
            "completion": record["completion"]}


def build_dataset(records: list[Mapping[str, Any]], tenant: str, task: str) -> Dataset:
    """Filter, deduplicate (first record of an example id wins) and split; pure."""
    dropped = {"other_tenant_or_task": 0, "not_admitted": 0, "duplicate": 0}
    seen: dict[str, dict] = {}
    for record in records:
        if record["tenant"] != tenant or record["task"] != task:
            dropped["other_tenant_or_task"] += 1
        elif not record["admitted"]:
            dropped["not_admitted"] += 1
        elif record["example_id"] in seen:
            dropped["duplicate"] += 1
        else:
            seen[record["example_id"]] = _example(record)
    examples = [seen[k] for k in sorted(seen)]
    digest = "sha256:" + hashlib.sha256(canonical_json(examples).encode()).hexdigest()
    return Dataset(train=[e for e in examples if e["split"] == "TRAIN"],
                   holdout=[e for e in examples if e["split"] == "HOLDOUT"],
                   digest=digest, records_read=len(records), dropped=dropped)


class TrainerService:
    """What one ``adaptloop trainer`` process holds: settings, serdes, a producer, the base model path."""

    def __init__(self, settings: TrainerSettings, *, tasks: Mapping[str, TaskSpec] | None = None) -> None:
        from adaptloop.model import ensure_base_model

        self.settings = settings
        self.tasks = dict(tasks) if tasks else None
        registry = settings.kafka.schema_registry_url
        self.requests_serde = serde_for("training_request", registry)
        self.curated_serde = serde_for("curated_example", registry)
        self.releases_serde = serde_for("adapter_release", registry)
        self.dead_letter_serde = serde_for("dead_letter", registry)
        self.producer = DeliveryTracker(settings.kafka)
        self.base_model = ensure_base_model(settings.home, settings.model.path)

    # -- reading ---------------------------------------------------------------------------------

    def releases(self) -> list[dict]:
        """Every record of the releases topic, in order (Tansu never compacts it)."""
        topic = self.settings.topics.name("releases")
        return [self.releases_serde.deserialize(m.value(), SerdeContext(topic, m.partition(), m.offset()))
                for m in read_ranges(self.settings.kafka, topic, idle_s=1.0)]

    def read_dataset(self, request: Mapping[str, Any]) -> Dataset:
        curated = self.settings.topics.name("curated")
        ranges = request["examples"]
        foreign = sorted({r["topic"] for r in ranges} - {curated})
        if foreign:
            raise ContractViolation(f"ranges name topics other than {curated}: {foreign}")
        records = [self.curated_serde.deserialize(m.value(), SerdeContext(curated, m.partition(), m.offset()))
                   for m in read_ranges(self.settings.kafka, curated,
                                        [Range(r["partition"], r["start_offset"], r["end_offset"]) for r in ranges])]
        return build_dataset(records, request["tenant"], request["task"])

    # -- one request -----------------------------------------------------------------------------

    def process(self, request: Mapping[str, Any]) -> dict | None:
        """Handle one decoded TrainingRequest: publish its release (acknowledged) and return it,
        or return None when a release for this request already exists."""
        from adaptloop.trainers import evaluate as ev

        request_id, tenant, task = request["request_id"], request["tenant"], request["task"]
        short = request_id[:12]
        started = time.monotonic()
        releases = self.releases()
        previous = [r for r in releases if r["lineage"]["request_id"] == request_id]
        if previous:
            log.info("request %s: already decided (%s %s), skipping", short, previous[-1]["state"], previous[-1]["version"])
            return None
        try:
            spec = task_spec(task, self.tasks)
        except ConfigError as exc:
            return self.reject(request, str(exc), None)
        try:
            dataset = self.read_dataset(request)
        except ContractViolation as exc:
            return self.reject(request, str(exc), None)
        log.info("request %s: %s/%s dataset %s: %d train, %d holdout (%d records read, dropped %s)", short, tenant,
                 task, dataset.digest[:19], len(dataset.train), len(dataset.holdout), dataset.records_read, dataset.dropped)
        if len(dataset.train) < MIN_TRAIN_EXAMPLES:
            return self.reject(request, f"too few training examples: {len(dataset.train)} admitted TRAIN examples "
                                        f"for {tenant}/{task} in the named ranges, need {MIN_TRAIN_EXAMPLES}", dataset)
        if not dataset.holdout:
            return self.reject(request, "no HOLDOUT examples in the named ranges: cannot evaluate", dataset)
        incumbent = ev.newest_live_adapter(releases, tenant, task)
        if incumbent.artifact_uri and not Path(incumbent.artifact_uri).is_dir():
            return self.reject(request, f"incumbent {incumbent.version} artifact {incumbent.artifact_uri} is not "
                                        "readable here: cannot compare", dataset)
        if incumbent.artifact_uri and incumbent.digest:
            from adaptloop.artifacts import verify_digest
            from adaptloop.errors import ArtifactError

            try:
                verify_digest(Path(incumbent.artifact_uri), incumbent.digest)
            except ArtifactError as exc:
                return self.reject(request, f"cannot compare with incumbent {incumbent.version}: {exc}", dataset)

        request_dir = Path(self.settings.artifact_dir).resolve() / request_id
        request_dir.mkdir(parents=True, exist_ok=True)
        (request_dir / "dataset.json").write_text(canonical_json({"digest": dataset.digest, "train": dataset.train,
                                                                  "holdout": dataset.holdout}))
        cfg = self.recipe_config(spec, dataset, request_dir / "adapter")
        from adaptloop.trainers import ray_job

        ray_job.start_ray(self.settings)
        result = ray_job.train(self.settings, request_id, cfg)

        from adaptloop.artifacts import adapter_version, artifact_digest

        adapter_dir = Path(result.adapter_dir)
        digest = artifact_digest(adapter_dir)
        version = adapter_version(tenant, task, digest)
        max_new, threads = self.settings.max_new_tokens, self.settings.torch_threads
        candidate = ev.evaluate(spec, self.base_model, dataset.holdout, adapter_dir=adapter_dir, name=version,
                                max_new_tokens=max_new, threads=threads)
        current = ev.evaluate(spec, self.base_model, dataset.holdout, adapter_dir=incumbent.artifact_uri,
                              name=incumbent.version, max_new_tokens=max_new, threads=threads)
        margin = self.settings.gate_margin
        passed = candidate.score >= current.score + margin
        reason = (f"candidate {candidate.score:.3f} {'>=' if passed else '<'} incumbent {incumbent.version} "
                  f"{current.score:.3f} + margin {margin:.3f} on {candidate.count} holdout examples; "
                  f"trained {result.steps} steps in {result.train_seconds:.0f}s, final loss {result.final_loss:.4f}")
        release = self.release_record(
            request, state="RELEASED" if passed else "REJECTED", reason=reason, version=version,
            artifact_uri=str(adapter_dir), digest=digest, dataset=dataset, config=cfg.public(),
            evaluation={"metric": f"success_rate:{spec.scorer}", "holdout_count": candidate.count,
                        "candidate_score": candidate.score, "incumbent": incumbent.version,
                        "incumbent_score": current.score, "margin": margin})
        self.publish(release)
        log.info("request %s: %s %s in %.0fs: %s", short, release["state"], version, time.monotonic() - started, reason)
        return release

    def recipe_config(self, spec: TaskSpec, dataset: Dataset, output_dir: Path):
        from adaptloop.trainers.ray_job import recipe_config

        examples = [{"prompt_messages": e["prompt_messages"], "completion": e["completion"]} for e in dataset.train]
        return recipe_config(self.settings, model_path=str(self.base_model), output_dir=output_dir,
                             examples=examples, system_prompt=spec.system_prompt)

    def reject(self, request: Mapping[str, Any], reason: str, dataset: Dataset | None) -> dict:
        """A REJECTED release without an artifact: the request could not give an adapter."""
        tenant, task, request_id = request["tenant"], request["task"], request["request_id"]
        release = self.release_record(
            request, state="REJECTED", reason=reason, version=f"{tenant}--{task}--rejected-{request_id[:12]}",
            artifact_uri=None, digest=None, dataset=dataset, config={},
            evaluation={"metric": "none", "holdout_count": len(dataset.holdout) if dataset else 0,
                        "candidate_score": 0.0, "incumbent": "none", "incumbent_score": 0.0,
                        "margin": self.settings.gate_margin})
        self.publish(release)
        log.warning("request %s: REJECTED without training: %s", request_id[:12], reason)
        return release

    def release_record(self, request: Mapping[str, Any], *, state: str, reason: str, version: str,
                       artifact_uri: str | None, digest: str | None, dataset: Dataset | None,
                       config: Mapping[str, Any], evaluation: dict) -> dict:
        return {
            "version": version,
            "tenant": request["tenant"],
            "task": request["task"],
            "state": state,
            "reason": reason,
            "base_model": self.settings.model.name,
            "artifact_uri": artifact_uri,
            "digest": digest,
            "lora_rank": self.settings.lora_rank,
            "method": METHOD,
            "evaluation": evaluation,
            "lineage": {
                "request_id": request["request_id"],
                "dataset_digest": dataset.digest if dataset else "",
                "examples": [{"topic": r["topic"], "partition": r["partition"], "start_offset": r["start_offset"],
                              "end_offset": r["end_offset"]} for r in request["examples"]],
                "train_example_ids": dataset.train_ids if dataset else [],
                "code_version": code_version(),
                "config_json": canonical_json(config),
            },
            "created_at": now_ms(),
        }

    def publish(self, release: dict) -> None:
        topic = self.settings.topics.name("releases")
        value = self.releases_serde.serialize(release, SerdeContext(topic))
        self.producer.send_sync(topic, value, key=release["version"])

    def dead_letter(self, msg: Message, error: Exception) -> None:
        topic = self.settings.topics.name("dead_letters")
        record = {"source_topic": msg.topic(), "source_partition": msg.partition(), "source_offset": msg.offset(),
                  "key": msg.key(), "value": msg.value(), "stage": STAGE, "error_type": type(error).__name__,
                  "reason": str(error), "failed_at": now_ms()}
        self.producer.send_sync(topic, self.dead_letter_serde.serialize(record, SerdeContext(topic)))
        log.error("request at %s[%d]@%d is not a TrainingRequest, sent to %s: %s", msg.topic(), msg.partition(),
                  msg.offset(), topic, error)

    def handle(self, msg: Message) -> dict | None:
        """One consumed message: decode, process, publish; the caller commits afterwards."""
        ctx = SerdeContext(msg.topic(), msg.partition(), msg.offset())
        try:
            request = self.requests_serde.deserialize(msg.value(), ctx)
        except DeserializationError as exc:
            self.dead_letter(msg, exc)
            return None
        log.info("request %s: %s/%s trigger=%s ranges=%s", request["request_id"][:12], request["tenant"],
                 request["task"], request["trigger"],
                 [(r["partition"], r["start_offset"], r["end_offset"]) for r in request["examples"]])
        return self.process(request)


class ContractViolation(AdaptloopError):
    """A training request names data it may not use."""


def process_request(settings: TrainerSettings, request: Mapping[str, Any]) -> dict | None:
    """Process one decoded TrainingRequest in this process (tests, notebooks); see ``TrainerService.process``."""
    return TrainerService(settings).process(request)


class _Stopping(Exception):
    """SIGTERM arrived while a request was being worked on."""


def run(settings: TrainerSettings, *, max_requests: int | None = None, poll_s: float = 1.0) -> int:
    """Consume training requests until SIGTERM/SIGINT (or ``max_requests`` handled); return how many."""
    from adaptloop.trainers import ray_job

    state = {"stop": False, "busy": False}

    def on_signal(signum, frame):
        log.info("signal %d: stopping", signum)
        state["stop"] = True
        if state["busy"]:
            raise _Stopping()

    service = TrainerService(settings)
    topic = settings.topics.name("training_requests")
    consumer = Consumer(consumer_config(settings.kafka, settings.group_id,
                                        **{"max.poll.interval.ms": MAX_POLL_INTERVAL_MS}))
    handled = 0
    previous: dict = {}
    try:
        ray_job.start_ray(settings)
        # After ray.init, which installs its own SIGTERM handler (it would exit without cleaning up).
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        consumer.subscribe([topic])
        mark_ready()
        log.info("trainer ready: group %s on %s, artifacts in %s, base model %s", settings.group_id, topic,
                 settings.artifact_dir, service.base_model)
        while not state["stop"] and (max_requests is None or handled < max_requests):
            msg = consumer.poll(poll_s)
            if msg is None:
                continue
            if msg.error():
                log.warning("consumer: %s", msg.error())
                continue
            state["busy"] = True
            try:
                service.handle(msg)
            except TrainingError as exc:
                # The Ray job failed: put the failure on record rather than retry it forever.
                request = service.requests_serde.deserialize(msg.value(), SerdeContext(topic, msg.partition(), msg.offset()))
                service.reject(request, f"training failed: {exc}", None)
            finally:
                state["busy"] = False
            consumer.commit(message=msg, asynchronous=False)
            handled += 1
    except _Stopping:
        log.info("stopped during a request; it was not committed and will be replayed")
    finally:
        consumer.close()
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
    run(settings, max_requests=args.max_requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
