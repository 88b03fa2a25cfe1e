"""The trainer service (``adaptloop trainer``): training requests in, adapter releases out.

For each record of the training-requests topic:

1. decode it (an undecodable record goes to the dead-letter topic with its reason and is committed);
2. if a release whose ``lineage.request_id`` is this request's id exists, return it (a replay trains nothing);
3. snapshot the dataset (``adaptloop.trainers.snapshot``): exactly the curated records named by the
   request's offset ranges, the last record per example, this tenant/task, erasures excluded,
   written once, content-addressed, to the dataset store;
4. pick the method from the signal (SFT / KTO / DPO / a KTO mixture) and check the plan against
   vLLM's rules (``adaptloop.trainers.release``);
5. train a LoRA adapter in a Ray Train job (``adaptloop.trainers.ray_job``), resuming from the
   request's newest checkpoint if a previous attempt was killed;
6. check the adapter folder against vLLM's rules, evaluate candidate and incumbent on the holdout
   and the candidate on the regression suite (holdouts of the tenant's earlier live releases), and
   gate (``adaptloop.trainers.gate``, a paired test on the holdout): RELEASED ("better", or "undecided"
   with a small ``canary_share`` of its own) or REJECTED, with the evidence (steps 5 and 6:
   ``adaptloop.trainers.train_and_gate``; the record: ``adaptloop.trainers.release_record``);
7. publish the AdapterRelease keyed by its version, wait for the broker's acknowledgement, and
   only then commit the request's offset (at-least-once; step 2 makes the replay harmless).

A request that cannot give an adapter (no examples, too few, single-class KTO data, no holdout,
unknown task, a missing base model, a plan or an adapter vLLM would refuse) yields a REJECTED
release with the reason, so the decision is on record and the service goes on with the next.

The consumer loop around it (``adaptloop trainer``: the fair queue, jobs at once, commits, stopping) is
``adaptloop.trainers.service_loop``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from confluent_kafka import Message

from adaptloop.errors import AdaptloopError, ArtifactError, ConfigError, DeserializationError, TrainingError
from adaptloop.kafka import DeliveryTracker, Range
from adaptloop.records import read_decoded
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import SourceRef, dead_letter
from adaptloop.settings import TrainerSettings
from adaptloop.tasks import Catalogue, TaskSpec, load_catalogue
from adaptloop.trainers.release_record import build_release
from adaptloop.trainers.snapshot import Plan, Snapshot, build_snapshot, choose_method, write_snapshot
from adaptloop.trainers.train_and_gate import TrainAndGate

log = logging.getLogger("adaptloop.trainer")

STAGE = "trainer"


def build_dataset(records: list[Mapping[str, Any]], tenant: str, task: str, erasures: Any = None) -> Snapshot:
    """The snapshot of ``records`` (in topic order) for tenant/task; pure (see ``snapshot.build_snapshot``)."""
    return build_snapshot([(0, i, r) for i, r in enumerate(records)], tenant=tenant, task=task, ranges=[],
                          erasures=erasures)


class TrainerService(TrainAndGate):
    """What one ``adaptloop trainer`` process holds: settings, serdes, a producer, the base model path."""

    def __init__(self, settings: TrainerSettings, *, catalogue: Catalogue | None = None) -> None:
        from adaptloop.artifacts import base_model_digest
        from adaptloop.model import ensure_base_model

        self.settings = settings
        self.catalogue = catalogue if catalogue is not None else load_catalogue()
        registry = settings.kafka.schema_registry_url
        self.requests_serde = serde_for("training_request", registry)
        self.releases_serde = serde_for("adapter_release", registry)
        self.dead_letter_serde = serde_for("dead_letter", registry)
        self.producer = DeliveryTracker(settings.kafka)
        # A missing base model is a per-request rejection, not a crash loop: it may be mounted later.
        self.base_model: Path | None = None
        self.base_digest: str | None = None
        self.base_error = ""
        self.tails: dict[str, Any] = {}
        self.resolve_base_model(ensure_base_model, base_model_digest)

    def resolve_base_model(self, ensure, digest) -> bool:
        if self.base_model is not None:
            return True
        try:
            self.base_model = Path(ensure(self.settings.home, self.settings.model.path))
            self.base_digest = digest(self.base_model)
        except (ConfigError, ArtifactError, OSError) as exc:
            self.base_model, self.base_error = None, str(exc)
            log.error("base model unavailable: %s", exc)
            return False
        return True

    # -- reading ---------------------------------------------------------------------------------

    def follow(self) -> None:
        """Follow the releases and erasures topics from now on (a long-lived trainer): each request then reads
        them in about ``settle_s`` rather than a fresh read's join and idle wait (``adaptloop.tail``)."""
        from adaptloop.tail import TopicTail

        topics = self.settings.topics
        self.tails = {"releases": TopicTail(self.settings.kafka, topics.name("releases"), "adapter_release").start(),
                      "erasures": TopicTail(self.settings.kafka, topics.name("erasures"), "erasure").start()}

    def close(self) -> None:
        for tail in self.tails.values():
            tail.close()
        self.tails = {}

    def releases(self) -> list[dict]:
        """Every record of the releases topic, in order (it keeps every decision)."""
        if "releases" in self.tails:
            return [p.record for p in self.tails["releases"].records()]
        topic = self.settings.topics.name("releases")
        return [p.record for p in read_decoded(self.settings.kafka, topic, "adapter_release", idle_s=1.0)]

    def erasures(self):
        from adaptloop.erasure import ErasureSet

        if "erasures" in self.tails:
            return ErasureSet.of(p.record for p in self.tails["erasures"].records())
        return ErasureSet.read(self.settings.kafka, self.settings.topics)

    def snapshot(self, request: Mapping[str, Any], erasures: Any) -> Snapshot:
        """Read exactly the named ranges, build the snapshot and write it (once) to the dataset store."""
        curated = self.settings.topics.name("curated")
        ranges = request["examples"]
        foreign = sorted({r["topic"] for r in ranges} - {curated})
        if foreign:
            raise ContractViolation(f"ranges name topics other than {curated}: {foreign}")
        read = read_decoded(self.settings.kafka, curated, "curated_example",
                            [Range(r["partition"], r["start_offset"], r["end_offset"]) for r in ranges])
        positioned = [(p.partition, p.offset, p.record) for p in read]
        built = build_snapshot(positioned, tenant=request["tenant"], task=request["task"], ranges=ranges,
                               erasures=erasures)
        return write_snapshot(built, self.settings.store_url())

    # -- one request -----------------------------------------------------------------------------

    def process(self, request: Mapping[str, Any]) -> dict:
        """Handle one decoded TrainingRequest: publish its release (acknowledged) and return it. A replayed
        request returns the release already decided for it, without training or publishing."""
        from adaptloop.model import ensure_base_model
        from adaptloop.artifacts import base_model_digest

        request_id, tenant, task = request["request_id"], request["tenant"], request["task"]
        short = request_id[:12]
        releases = self.releases()
        previous = [r for r in releases if r["lineage"]["request_id"] == request_id]
        if previous:
            log.info("request %s: already decided (%s %s), not training again", short, previous[-1]["state"],
                     previous[-1]["version"])
            return previous[-1]
        if not self.resolve_base_model(ensure_base_model, base_model_digest):
            return self.reject(request, f"base model unavailable: {self.base_error}", None)
        try:
            spec = self.catalogue.get(task)
        except ConfigError as exc:
            return self.reject(request, str(exc), None)
        disagreement = self.catalogue.disagreement(task, request.get("task_digest") or "", theirs="curation")
        if disagreement:
            return self.reject(request, disagreement, None)
        erasures = self.erasures()
        try:
            snapshot = self.snapshot(request, erasures)
        except ContractViolation as exc:
            return self.reject(request, str(exc), None)
        plan = choose_method(snapshot.train, spec.method or self.settings.method)
        log.info("request %s: %s/%s snapshot %s at %s: %d train, %d holdout, %s; method %s (%s)", short, tenant, task,
                 snapshot.digest[:19], snapshot.uri, len(snapshot.train), len(snapshot.holdout),
                 snapshot.manifest["counts"], plan.method, plan.reason)
        problem = self.plan_problem(plan, snapshot, spec)
        if problem:
            return self.reject(request, problem, snapshot, plan=plan)
        return self.train_and_gate(request, spec, snapshot, plan, releases, erasures)

    def plan_problem(self, plan: Plan, snapshot: Snapshot, spec: TaskSpec) -> str | None:
        """Why this plan cannot give ``spec``'s task an adapter, or None."""
        from adaptloop.trainers.kto import class_weights
        from adaptloop.trainers.ray_job import recipe_config
        from adaptloop.trainers.release import ReleaseCheckError, check_plan

        minimum = spec.min_examples or self.settings.min_train_examples
        if len(plan.examples) < minimum:
            return (f"too few training examples: {len(plan.examples)} usable TRAIN examples for "
                    f"{snapshot.manifest['tenant']}/{snapshot.manifest['task']} in the named ranges, need {minimum} "
                    f"(dropped: {snapshot.manifest['dropped']})")
        if plan.method == "kto":
            desirable = sum(1 for e in plan.examples if e["label"])
            try:
                class_weights(desirable, len(plan.examples) - desirable)
            except TrainingError as exc:
                return str(exc)
        if not snapshot.holdout:
            return "no HOLDOUT examples with a right answer in the named ranges: cannot evaluate"
        recipe = recipe_config(self.settings, plan.method, spec=spec)
        try:
            check_plan(rank=recipe.lora_rank, target_modules=recipe.target_modules,
                       max_lora_rank=self.settings.max_lora_rank, base_dir=self.base_model)
        except ReleaseCheckError as exc:
            return str(exc)
        return None

    def reject(self, request: Mapping[str, Any], reason: str, snapshot: Snapshot | None, *, plan: Plan | None = None,
               version: str | None = None, artifact: tuple[Path, str] | None = None,
               training: dict | None = None, lora_rank: int = 0) -> dict:
        """A REJECTED release: the request could not give an adapter (``lora_rank`` 0), or gave one vLLM would
        refuse (of ``lora_rank``)."""
        tenant, task, request_id = request["tenant"], request["task"], request["request_id"]
        release = self.release_record(
            request, state="REJECTED", reason=reason,
            version=version or f"{tenant}--{task}--rejected-{request_id[:12]}",
            artifact_uri=str(artifact[0]) if artifact else None, digest=artifact[1] if artifact else None,
            snapshot=snapshot, method=plan.method if plan else "none", config={}, lora_rank=lora_rank,
            evaluation={"metric": "none", "holdout_count": len(snapshot.holdout) if snapshot else 0,
                        "candidate_score": 0.0, "incumbent": "none", "incumbent_score": 0.0,
                        "margin": self.settings.gate_margin},
            regression=[], training=training or {},
            evidence={"rule": "input checks before training" if artifact is None else "release checks (vLLM's rules)",
                      "error": reason, "plan": plan.reason if plan else None,
                      "signal": plan.counts if plan else None,
                      "snapshot": {k: snapshot.manifest[k] for k in ("counts", "dropped", "erasures")} if snapshot else None},
            parent_version=None)
        self.publish(release)
        log.warning("request %s: REJECTED: %s", request_id[:12], reason)
        return release

    def release_record(self, request: Mapping[str, Any], **fields: Any) -> dict:
        """A release of ``request`` by this trainer (see ``release_record.build_release`` for the fields)."""
        return build_release(request, base_model=self.settings.model.name, base_model_digest=self.base_digest, **fields)

    def publish(self, release: dict) -> None:
        topic = self.settings.topics.name("releases")
        value = self.releases_serde.serialize(release, SerdeContext(topic))
        self.producer.send_sync(topic, value, key=release["version"])

    def dead_letter(self, msg: Message, error: Exception) -> None:
        topic = self.settings.topics.name("dead_letters")
        record = dead_letter(SourceRef(msg.topic(), msg.partition(), msg.offset()), msg.key(), msg.value(),
                             stage=STAGE, error=error)
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


def process_request(settings: TrainerSettings, request: Mapping[str, Any]) -> dict:
    """Process one decoded TrainingRequest in this process (tests, notebooks); see ``TrainerService.process``."""
    return TrainerService(settings).process(request)
