"""The curation agents' shared state and the join: decode, redact, join, score; grace periods and age windows
on ticks; state kept bounded; metrics. The dedupe and window bodies are ``dedupe_agent`` and ``window_agent``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping

import faust
from aiokafka.errors import KafkaError
from faust.types import TP, EventT

from adaptloop.erasure import subject_key
from adaptloop.errors import ContractError, DeliveryError, DeserializationError
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import dead_letter, reject_code_of
from adaptloop.settings import ErasureSettings, StreamsSettings
from adaptloop.streams import dedupe, stages
from adaptloop.streams.dedupe_agent import DedupeAgent
from adaptloop.streams.delivery import StagedWrites, after_delivery, run_batched, send_acknowledged
from adaptloop.streams.erasures import ErasureFeed
from adaptloop.streams.internal_topics import internal_topics
from adaptloop.streams.metrics import ADMITTED, DEAD_LETTERED, ERASED, REJECTED, CurationMetrics
from adaptloop.streams.pii import INTERACTION_TEXT, OUTCOME_TEXT, Redactor, redact_record
from adaptloop.streams.stages import SourceRef
from adaptloop.streams.state import ERASED_MARK, Swept, Sweeper, stamped
from adaptloop.streams.trajectories import Episodes
from adaptloop.streams.window_agent import WindowAgent
from adaptloop.streams.windows import window_due_by_age
from adaptloop.tasks import Catalogue, load_catalogue

log = logging.getLogger(__name__)

#: The two sides of a join as stored in the join table.
INTERACTION, OUTCOME = "interaction", "outcome"



class Curation(DedupeAgent, WindowAgent):
    """The agents' bodies: decode, redact, join, score, dedupe, window; everything they send is awaited."""

    def __init__(self, app: faust.App, settings: StreamsSettings, *, erasures: ErasureFeed | None = None,
                 catalogue: Catalogue | None = None) -> None:
        self.app = app
        self.settings = settings
        self.catalogue = catalogue if catalogue is not None else load_catalogue()
        names = settings.topics
        layout = names.layout()
        registry = settings.kafka.schema_registry_url
        contract = stages.Contract(tasks=dict(self.catalogue.tasks), max_record_bytes=settings.max_record_bytes,
                                   tenants=frozenset(settings.tenants),
                                   max_future_ms=int(settings.max_future_s * 1000))

        def topic(which: str) -> faust.TopicT:
            name = names.name(which)
            return app.topic(name, key_serializer="raw", value_serializer="raw", partitions=layout[name][0])

        self.interactions = topic("interactions")
        self.outcomes = topic("outcomes")
        # One join agent reads both (co-partitioned by interaction id): an interaction and its outcome
        # that arrive close together then share a batch, and their join state is never written (below).
        self.join_inputs = app.topic(self.interactions.get_topic_name(), self.outcomes.get_topic_name(),
                                     key_serializer="raw", value_serializer="raw", partitions=names.partitions)
        self.curated = topic("curated")
        self.dead_letters = topic("dead_letters")
        self.training_requests = topic("training_requests")
        scored_name, ticks_name = internal_topics(settings)
        self.scored = app.topic(scored_name, key_serializer="raw", value_serializer="raw", partitions=names.partitions)
        self.ticks = app.topic(ticks_name, key_serializer="raw", value_serializer="raw", partitions=names.partitions)
        self.decoders = {
            INTERACTION: stages.Decoder("interaction", registry_url=registry, contract=contract),
            OUTCOME: stages.Decoder("outcome", registry_url=registry, contract=contract),
        }
        self.contract = contract
        self.redactor = Redactor(custom=settings.pii_patterns, phone_region=settings.phone_region)
        self.subject_secret = ErasureSettings().secret()
        self.curated_serde = serde_for("curated_example", registry)
        self.request_serde = serde_for("training_request", registry)
        self.dead_letter_serde = serde_for("dead_letter", registry)
        self.erasures = erasures
        self.metrics = CurationMetrics()
        self.horizon_ms = int(settings.outcome_horizon_s * 1000)
        table_schema = faust.Schema(key_serializer="json", value_serializer="json")

        def table(name: str) -> faust.TableT:
            return app.Table(name, partitions=names.partitions, schema=table_schema)

        # interaction id -> {"interaction": side, "outcomes": [side...], "due": ms|None} until curated, then
        #                   {"emitted": kind}; side = {"record", "ref", "redactions", "subjects"}. Every entry of
        #                   the tables below but "windows" carries "at" and "p" (``streams.state``: they expire).
        self.joins = table("joins")
        # The join agent's writes, written at its batch's end, before the batch is acked: a pair completed
        # within one batch writes only its "emitted" flag. The tick task reads through them too.
        self.staged_joins = StagedWrites(self.joins)
        # "tenant/task/example_id" -> {"hash", "sig", "decision"}: dedupe decisions survive replays; the exact
        # and near-duplicate index of the admitted ones is rebuilt from it (at most one admitted per hash,
        # the newest ``dedupe_max_per_task``)
        self.seen = table("dedupe_seen")
        # "tenant/task" -> windows.new_window_state() | {"p": partition}
        self.windows = table("windows")
        # The window agent's newest states in this batch, written once per batch (one changelog record,
        # not one per example) and before any await, so that no other task (the tick) ever reads a
        # stale window from the table.
        self.staged_windows = StagedWrites(self.windows)
        # "tenant/task/example_id" -> {"o": the curated offset that counted it} (a repeat of an example counts once)
        self.counted = table("window_counted")
        # "tenant/episode_id" -> the episode's newest turn and its episode-level outcomes (streams.trajectories)
        self.episodes = Episodes(self, table("episodes"))
        # Joins being sent right now: the table flag is written only after delivery (at least once).
        self._in_flight: set[str] = set()
        # request id -> set once its send is over; a task that finds a request in flight waits for this.
        self._requests_in_flight: dict[str, asyncio.Event] = {}
        # The window agent's next curated offset per partition, and the hole it last asked to read again
        # (offset, when): it counts in offset order (``WindowAgent._in_offset_order``).
        self._window_next: dict[TP, int] = {}
        self._window_sought: dict[TP, tuple[int, float]] = {}
        # partition -> {interaction id: due ms}; rebuilt from the join table after a rebalance.
        self._due: dict[int, dict[str, int]] | None = None
        # "tenant/task" -> near-duplicate index; rebuilt lazily from the seen table after a rebalance.
        self._indexes: dict[str, dedupe.NearDuplicateIndex] = {}
        self.sweeper = Sweeper({
            "joins": Swept(self.joins, on_evict=self._count_orphans, holds_records=True),
            "episodes": Swept(self.episodes.table, holds_records=True),
            "window_counted": Swept(self.counted),
            "dedupe_seen": Swept(self.seen, lasting=lambda entry: entry["decision"]["admitted"]),
        }, ttl_ms=self.horizon_ms, every_ms=int(settings.state_sweep_s * 1000))

    # ------------------------------------------------------------------ plumbing

    async def _send(self, topic: faust.TopicT, key: str | bytes | None, value: bytes) -> None:
        """Acknowledged before the input record counts as processed (with its batch's, in a batched agent)."""
        self.staged_windows.write()
        await send_acknowledged(topic, key, value, timeout_s=self.settings.kafka.delivery_timeout_s)

    async def run_batched(self, stream: faust.StreamT, stage: str, handle, *,
                          before_settle: Callable[[], None] | None = None) -> None:
        await run_batched(stream, lambda event: self.guarded(stage, event, handle),
                          max_events=self.settings.batch_max_events, within_s=self.settings.batch_within_s,
                          timeout_s=self.settings.kafka.delivery_timeout_s, before_settle=before_settle)

    async def send_dead_letter(self, event: EventT, ref: SourceRef, stage: str, error: Exception) -> None:
        record = dead_letter(ref, event.key, event.value, stage=stage, error=error)
        log.warning("dead letter from %s/%d@%d (%s): %s", ref.topic, ref.partition, ref.offset, stage, record["reason"])
        topic = self.dead_letters.get_topic_name()
        # Keyed by where the record came from, not by its own key: a key can be as large as the producer allows,
        # and a dead letter that cannot be sent would end the worker on the same record at every restart.
        where = f"{ref.topic}/{ref.partition}@{ref.offset}"
        await self._send(self.dead_letters, where, self.dead_letter_serde.serialize(record, SerdeContext(topic)))
        self.metrics.record(stage, DEAD_LETTERED, reason=record["reason"])

    async def guarded(self, stage: str, event: EventT, body) -> None:
        """Run one record through ``body``; a record that breaks a stage becomes a dead letter, the stream goes on.

        Broker failures are not the record's fault: an unacknowledged send ends the worker at once
        (``delivery.stop_now``), and its restart resumes from the last committed offset. Anything else a stage
        raises is: hostile content reaches code in ways no list of exception types foresees (a ``RecursionError``
        on deep nesting, a bug that one record's shape exposes), and an error that ended the worker would end
        its restart on the same record again, for every tenant. The dead letter keeps the record to replay.
        """
        try:
            await body(event)
        except (DeliveryError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 -- see above: one record never stops the stream
            ref = SourceRef(event.message.topic, event.message.partition, event.message.offset)
            log.exception("%s stage failed on %s/%d@%d", stage, ref.topic, ref.partition, ref.offset)
            await self.send_dead_letter(event, ref, stage, exc)

    def erased(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.erasures.erasures.match(record) if self.erasures is not None else None

    async def send_scored(self, example: Mapping[str, Any]) -> None:
        """A curated example to the dedupe stage (keyed by its tenant/task), acknowledged with its batch."""
        value = self.curated_serde.serialize(example, SerdeContext(self.scored.get_topic_name()))
        await self._send(self.scored, stages.curated_key(example["tenant"], example["task"]), value)

    # ------------------------------------------------------------------ decode + redact + join

    def _side(self, side: str, record: dict[str, Any], ref: SourceRef) -> dict[str, Any]:
        """Redact the record in place (before it is stored anywhere) and wrap it with what fired."""
        found = redact_record(record, self.redactor, INTERACTION_TEXT if side == INTERACTION else OUTCOME_TEXT)
        subjects = sorted({subject_key(record["tenant"], value, self.subject_secret) for value in found.subjects})
        return {"record": record, "ref": ref.as_dict(), "redactions": dict(found.counts), "subjects": subjects}

    async def on_input(self, event: EventT) -> None:
        side = INTERACTION if event.message.topic == self.interactions.get_topic_name() else OUTCOME
        await self.on_side(side, event)

    async def on_side(self, side: str, event: EventT) -> None:
        """One interaction or outcome: decode, redact, store; curate once the pair is complete and due."""
        ref = SourceRef(event.message.topic, event.message.partition, event.message.offset)
        try:
            record = self.decoders[side](event.key, event.value, ref)
        except (DeserializationError, ContractError) as exc:
            await self.send_dead_letter(event, ref, stages.STAGE_DECODE, exc)
            return
        interaction_id = record["interaction_id"]
        tenant_task = stages.curated_key(record["tenant"], record.get("task", "-"))
        if side == OUTCOME and record.get("episode_id"):
            if self.erased(record) is None:
                await self.episodes.on_outcome(record, self._side(side, record, ref), ref.partition)
            return
        if self.erased(record) is not None:
            self.metrics.record(stages.STAGE_JOIN, ERASED, tenant_task=tenant_task)
            if side == INTERACTION:
                self.staged_joins.put(interaction_id, stamped({"emitted": ERASED_MARK}, now=stages.now_ms(),
                                                              partition=ref.partition))
            return
        entry = dict(self.staged_joins.get(interaction_id) or {})
        if entry.get("emitted") == ERASED_MARK:
            self.metrics.record(stages.STAGE_JOIN, ERASED, tenant_task=tenant_task)
            return
        if entry.get("emitted") or interaction_id in self._in_flight:
            if side == OUTCOME:
                self.metrics.record(stages.STAGE_JOIN, REJECTED, tenant_task=tenant_task,
                                    reason="after_curated: the example was already curated")
            log.info("%s %s: already curated, ignored (%s)", side, interaction_id, ref)
            return
        wrapped = self._side(side, record, ref)
        if side == INTERACTION:
            if INTERACTION in entry:
                log.info("interaction %s: duplicate, ignored (%s)", interaction_id, ref)
                return
            entry[INTERACTION] = wrapped
            if record.get("episode_id"):
                self.episodes.note_turn(record, wrapped, ref.partition)
        else:
            outcomes = list(entry.get("outcomes") or [])
            if any(o["record"]["outcome_id"] == record["outcome_id"] for o in outcomes):
                log.info("outcome %s: duplicate, ignored (%s)", record["outcome_id"], ref)
                return
            entry["outcomes"] = outcomes + [wrapped]
        entry = stamped(entry, now=stages.now_ms(), partition=ref.partition)
        if INTERACTION in entry and entry.get("outcomes"):
            if any(stages.is_final(o["record"]) for o in entry["outcomes"]):
                await self.emit(interaction_id, entry)
                return
            if entry.get("due") is None:
                entry["due"] = stages.now_ms() + int(self.settings.outcome_grace_s * 1000)
                self._schedule(interaction_id, entry)
        self.staged_joins.stage(interaction_id, entry)

    def curate_sides(self, side: Mapping[str, Any], outcome_sides: list[Mapping[str, Any]]) -> tuple[dict, dict[str, int]]:
        """The curated example of a stored interaction side and its outcome sides (``_side``), with the PII
        rules that fired on any of them."""
        interaction = side["record"]
        outcomes = [(o["record"], SourceRef.from_dict(o["ref"])) for o in outcome_sides]
        redactions: dict[str, int] = dict(side["redactions"])
        subjects = set(side["subjects"])
        for o in outcome_sides:
            subjects.update(o["subjects"])
            for rule, n in o["redactions"].items():
                redactions[rule] = redactions.get(rule, 0) + n
        example = stages.curate(interaction, outcomes, interaction_ref=SourceRef.from_dict(side["ref"]),
                                spec=self.catalogue.get(interaction["task"]),
                                holdout_percent=self.settings.holdout_percent, horizon_ms=self.horizon_ms,
                                redactions=redactions, subjects=subjects)
        return example, redactions

    def _schedule(self, interaction_id: str, entry: dict[str, Any]) -> None:
        if self._due is not None:
            self._due.setdefault(int(entry["p"]), {})[interaction_id] = int(entry["due"])

    async def emit(self, interaction_id: str, entry: dict[str, Any]) -> None:
        """Curate a complete join: precedence, horizon, score; send it to the dedupe stage; once the broker
        acknowledged it, mark it emitted (until then ``_in_flight`` keeps the other side and ticks off it)."""
        self._in_flight.add(interaction_id)
        try:
            example, redactions = self.curate_sides(entry[INTERACTION], entry["outcomes"])
            tenant_task = stages.curated_key(example["tenant"], example["task"])
            if self.erased(example) is not None:
                self.metrics.record(stages.STAGE_JOIN, ERASED, tenant_task=tenant_task)
                self.staged_joins.put(interaction_id, stamped({"emitted": ERASED_MARK}, now=stages.now_ms(),
                                                              partition=int(entry["p"])))
                self._settled(interaction_id, entry)
                return
            value = self.curated_serde.serialize(example, SerdeContext(self.scored.get_topic_name()))
            await self._send(self.scored, tenant_task, value)
            # Sent: until its "emitted" flag (after the acknowledgement), ``_in_flight`` stands for the entry.
            self.staged_joins.discard(interaction_id)
        except BaseException:
            self._settled(interaction_id, entry)
            raise

        def emitted() -> None:
            self.staged_joins.put(interaction_id, stamped({"emitted": example["kind"]}, now=stages.now_ms(),
                                                          partition=int(entry["p"])))
            self._settled(interaction_id, entry)
            self.metrics.redactions(tenant_task, redactions)
            if example["admitted"]:
                self.metrics.record(stages.STAGE_JOIN, ADMITTED, tenant_task=tenant_task)
            else:
                self.metrics.record(stages.STAGE_JOIN, REJECTED, tenant_task=tenant_task,
                                    reason=reject_code_of(example) or "unknown")

        after_delivery(emitted)

    def _settled(self, interaction_id: str, entry: dict[str, Any]) -> None:
        self._in_flight.discard(interaction_id)
        if self._due is not None:
            self._due.get(int(entry.get("p", -1)), {}).pop(interaction_id, None)

    # ------------------------------------------------------------------ ticks: grace periods and age windows

    async def on_tick(self, event: EventT) -> None:
        partition = event.message.partition
        now = stages.now_ms()
        if self._due is None:  # after a (re)start or rebalance: rebuild from the recovered table
            self._due = {}
            for interaction_id, entry in list(self.joins.items()) + self.staged_joins.staged_items():
                if isinstance(entry, dict) and entry.get("due") is not None and not entry.get("emitted"):
                    self._schedule(interaction_id, entry)
        for interaction_id, due in sorted(self._due.get(partition, {}).items(), key=lambda item: item[1]):
            if due > now or interaction_id in self._in_flight:
                continue
            entry = self.staged_joins.get(interaction_id)
            if not entry or entry.get("emitted"):
                self._due[partition].pop(interaction_id, None)
                continue
            await self.emit(interaction_id, dict(entry))
        await self.episodes.tick(partition, now)
        self.keep_bounded(partition, now)
        for key, state in list(self.windows.items()):
            if not isinstance(state, dict) or state.get("p") != partition:
                continue
            if state.get("pending"):
                await self._send_request(key, dict(state))
            elif window_due_by_age(state, now=now, max_age_ms=int(self.settings.window_max_age_s * 1000),
                                          min_examples=self.min_examples(key.split("/", 1)[1])):
                tenant, task = key.split("/", 1)
                await self._fire(key, tenant, task, dict(state), trigger=f"age>={self.settings.window_max_age_s:g}s")

    def keep_bounded(self, partition: int, now: int) -> None:
        """Erase pending entries a new erasure matches; delete entries past the horizon (``streams.state``)."""
        busy = self._busy
        self.sweeper.erase(partition, self.erasures.erasures if self.erasures is not None else None, now, skip=busy)
        if self.sweeper.due(partition, now):
            self.sweeper.sweep(partition, now, skip=busy)

    def _busy(self, key: str) -> bool:
        """Being sent, or written at this batch's end: not the sweeper's to touch now."""
        return (key in self._in_flight or key in self.episodes.in_flight or self.staged_joins.holds(key))

    def _count_orphans(self, interaction_id: str, entry: Mapping[str, Any]) -> None:
        """A join entry leaves for age: outcomes whose interaction never came are counted, not silently lost."""
        if entry.get("emitted") or INTERACTION in entry:
            return
        for side in entry.get("outcomes") or []:
            record = side["record"]
            self.metrics.record(stages.STAGE_JOIN, REJECTED,
                                tenant_task=stages.curated_key(record["tenant"], record.get("task") or "?"),
                                reason="orphan_outcome: no interaction within the outcome horizon")
            log.warning("outcome %s: its interaction %s never came within the horizon; dropped",
                        record["outcome_id"], interaction_id)

    def on_rebalance(self) -> None:
        """Partitions moved: in-memory indexes may describe partitions this worker no longer (or newly) owns."""
        self._due = None
        self._indexes.clear()
        self._window_next.clear()
        self.episodes.on_rebalance()

    # ------------------------------------------------------------------ metrics

    async def refresh_lag(self) -> None:
        """Consumer lag of the input topics: partition end minus this worker's position (Tansu's ends
        count batches: behind a multi-record batch the lag reads low); table sizes."""
        consumer = self.app.consumer
        for tp in self.app.assignor.assigned_actives():
            if tp.topic not in (self.interactions.get_topic_name(), self.outcomes.get_topic_name()):
                continue
            try:
                position = await consumer.position(tp)
                highwater = consumer.highwater(tp)
            except (KafkaError, KeyError, AssertionError) as exc:
                log.debug("lag of %s unknown: %r", tp, exc)
                continue
            if position is not None and highwater is not None:
                self.metrics.set_lag(tp.topic, tp.partition, max(0, int(highwater) - int(position)))
        self.metrics.set_state(self.sweeper.sizes(), self.sweeper.evicted)

