"""The Faust curation app: thin agents around the pure stages of ``adaptloop.streams.stages``.

    interactions ─┐ decode+contract ──bad──> dead letters
    outcomes ─────┘ join table (by interaction id, either arrival order) -> score -> curated
    curated ─────── window table (by tenant/task) -> every N admitted TRAIN examples -> training requests

Delivery is at least once (Tansu has no transactions): every record this app sends is awaited
until the broker acknowledged it before the input record counts as processed. After a crash a
record may be curated twice; consumers de-duplicate by ``example_id`` / ``request_id``.

Build it with ``create_app(settings)``; ``adaptloop.streams.worker`` runs it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.types import EventT
from mode.supervisors import CrashingSupervisor

from adaptloop.errors import ContractError, DeliveryError, DeserializationError
from adaptloop.processes import mark_ready
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import KafkaSettings, StreamsSettings
from adaptloop.streams import stages
from adaptloop.streams.stages import SourceRef
from adaptloop.tasks import task_spec

log = logging.getLogger(__name__)

#: The two sides of a join as stored in the join table.
INTERACTION, OUTCOME = "interaction", "outcome"


def _broker_options(kafka: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "broker": [f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
    }
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(kafka.ssl_ca_location) if kafka.ssl_ca_location else None)
    if kafka.security_protocol.startswith("SASL"):
        options["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username, password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism, ssl_context=context)
    elif context is not None:
        options["broker_credentials"] = faust.SSLCredentials(context)
    return options


def _tansu_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Tansu reports a partition's end as its newest *batch's* first offset + 1, and Faust's table
    recovery stops reading a changelog at that end: records after it in a multi-record batch would
    be lost from the table on restart. One record per batch keeps the end exact (costs throughput,
    so only on the embedded broker, the same switch that turns producer idempotence off)."""
    return {"producer_max_batch_size": 1} if kafka.embedded else {}


class Curation:
    """The agents' bodies: decode, join, score, window; everything they send is awaited."""

    def __init__(self, app: faust.App, settings: StreamsSettings) -> None:
        self.app = app
        self.settings = settings
        names = settings.topics
        layout = names.layout()
        registry = settings.kafka.schema_registry_url
        contract = stages.Contract(max_record_bytes=settings.max_record_bytes)

        def topic(which: str) -> faust.TopicT:
            name = names.name(which)
            return app.topic(name, key_serializer="raw", value_serializer="raw", partitions=layout[name][0])

        self.interactions = topic("interactions")
        self.outcomes = topic("outcomes")
        self.curated = topic("curated")
        self.dead_letters = topic("dead_letters")
        self.training_requests = topic("training_requests")
        self.decoders = {
            INTERACTION: stages.Decoder("interaction", registry_url=registry, contract=contract),
            OUTCOME: stages.Decoder("outcome", registry_url=registry, contract=contract),
        }
        self.contract = contract
        self.curated_serde = serde_for("curated_example", registry)
        self.request_serde = serde_for("training_request", registry)
        self.dead_letter_serde = serde_for("dead_letter", registry)
        # interaction id -> {"interaction": {"record", "ref"}, "outcome": {...}} until joined, then {"emitted": kind}.
        table_schema = faust.Schema(key_serializer="json", value_serializer="json")
        self.joins = app.Table("joins", partitions=names.partitions, schema=table_schema)
        # "tenant/task" -> stages.new_window_state()
        self.windows = app.Table("windows", partitions=names.partitions, schema=table_schema)
        # Joins being sent right now: the table flag is written only after delivery (at least once).
        self._in_flight: set[str] = set()

    async def _send(self, topic: faust.TopicT, key: str | bytes | None, value: bytes) -> None:
        """Send and wait for the broker's acknowledgement; ``DeliveryError`` (the worker crashes) if none comes."""
        timeout_s = self.settings.kafka.delivery_timeout_s
        try:
            pending = await topic.send(key=key.encode() if isinstance(key, str) else key, value=value, force=True)
            await asyncio.wait_for(pending, timeout_s)
        except (asyncio.TimeoutError, KafkaError) as exc:
            raise DeliveryError(f"{topic.get_topic_name()}: not acknowledged within {timeout_s}s: {exc!r}") from exc

    async def send_dead_letter(self, event: EventT, ref: SourceRef, stage: str, error: Exception) -> None:
        record = stages.dead_letter(ref, event.key, event.value, stage=stage, error=error)
        log.warning("dead letter from %s/%d@%d (%s): %s", ref.topic, ref.partition, ref.offset, stage, record["reason"])
        topic = self.dead_letters.get_topic_name()
        await self._send(self.dead_letters, event.key, self.dead_letter_serde.serialize(record, SerdeContext(topic)))

    async def on_side(self, side: str, event: EventT) -> None:
        """One interaction or outcome: decode it, store it, and curate the pair once both are here."""
        ref = SourceRef(event.message.topic, event.message.partition, event.message.offset)
        try:
            record = self.decoders[side](event.key, event.value, ref)
        except (DeserializationError, ContractError) as exc:
            await self.send_dead_letter(event, ref, stages.STAGE_DECODE, exc)
            return
        interaction_id = record["interaction_id"]
        entry = dict(self.joins.get(interaction_id) or {})
        if entry.get("emitted") or interaction_id in self._in_flight:
            log.info("%s %s: already curated, ignored (%s)", side, interaction_id, ref)
            return
        if side in entry:
            # First one wins; later outcomes of the same interaction are not merged yet.
            log.info("%s %s: duplicate while waiting for its pair, ignored (%s)", side, interaction_id, ref)
            return
        entry[side] = {"record": record, "ref": ref.as_dict()}
        if INTERACTION not in entry or OUTCOME not in entry:
            self.joins[interaction_id] = entry
            return
        self._in_flight.add(interaction_id)
        try:
            example = self.score(entry)
            topic = self.curated.get_topic_name()
            value = self.curated_serde.serialize(example, SerdeContext(topic))
            await self._send(self.curated, stages.curated_key(example["tenant"], example["task"]), value)
            self.joins[interaction_id] = {"emitted": example["kind"]}
        finally:
            self._in_flight.discard(interaction_id)

    def score(self, entry: dict[str, Any]) -> dict[str, Any]:
        interaction, outcome = entry[INTERACTION], entry[OUTCOME]
        return stages.score(
            interaction["record"], outcome["record"],
            interaction_ref=SourceRef.from_dict(interaction["ref"]), outcome_ref=SourceRef.from_dict(outcome["ref"]),
            spec=task_spec(interaction["record"]["task"], dict(self.contract.tasks)),
            holdout_percent=self.settings.holdout_percent)

    async def on_curated(self, event: EventT) -> None:
        """One curated example: count it for its (tenant, task) and fire a training request when due."""
        ref = SourceRef(event.message.topic, event.message.partition, event.message.offset)
        try:
            example = self.curated_serde.deserialize(event.value, SerdeContext(ref.topic, ref.partition, ref.offset))
        except DeserializationError as exc:
            await self.send_dead_letter(event, ref, stages.STAGE_WINDOW, exc)
            return
        key = stages.curated_key(example["tenant"], example["task"])
        previous = self.windows.get(key)
        state, fire = stages.window_update(previous, example, partition=ref.partition,
                                           offset=ref.offset, window_size=self.settings.window_size)
        if state == previous:
            log.info("curated %s@%d: replayed, already counted", ref.topic, ref.offset)
            return
        if fire:
            request = stages.training_request(example["tenant"], example["task"], state, curated_topic=ref.topic)
            topic = self.training_requests.get_topic_name()
            await self._send(self.training_requests, key, self.request_serde.serialize(request, SerdeContext(topic)))
            log.info("training request %s for %s: %d train, %d holdout", request["request_id"][:12], key,
                     request["train_count"], request["holdout_count"])
        # Written after the request is acknowledged: a crash in between repeats the same request id.
        self.windows[key] = state


def create_app(settings: StreamsSettings) -> faust.App:
    """A Faust app for ``settings``; nothing global, nothing started."""
    app = faust.App(
        settings.app_id,
        **_broker_options(settings.kafka),
        # Tansu: a group join waits half the session timeout; 2 s causes rebalance storms.
        broker_session_timeout=6,
        # Tansu has no transactions: at least once, consumers de-duplicate by id.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_request_timeout=settings.kafka.delivery_timeout_s,
        **_tansu_options(settings.kafka),
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=1,
        topic_disable_leader=True,
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        datadir=str(settings.data_dir),
        web_port=settings.web_port,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        autodiscover=False,
    )
    curation = Curation(app, settings)
    app.curation = curation  # for introspection from a worker shell

    @app.agent(curation.interactions, name="interactions", supervisor_strategy=CrashingSupervisor)
    async def interactions(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await curation.on_side(INTERACTION, event)

    @app.agent(curation.outcomes, name="outcomes", supervisor_strategy=CrashingSupervisor)
    async def outcomes(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await curation.on_side(OUTCOME, event)

    @app.agent(curation.curated, name="window", supervisor_strategy=CrashingSupervisor)
    async def windows(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await curation.on_curated(event)

    readiness = {"marked": False}

    async def on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
        # Partitions are assigned and tables recovered: the agents consume from here on.
        if not readiness["marked"]:
            readiness["marked"] = True
            mark_ready()
            log.info("curation ready: partitions assigned, tables recovered")

    app.on_rebalance_complete.connect(on_rebalance_complete)
    return app
