"""The gateway's records, produced in ``ack`` or ``outbox`` mode: interactions (every call) and outcomes
(``POST /v1/feedback``), each keyed by its episode (``adaptloop.sdk.partition_key``, ``outcome_key``).

``serving.gateway`` says what each mode promises a caller, ``serving.outbox`` how the outbox keeps
records across a kill; ``InteractionLog`` below is where the two meet the producer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any, Mapping

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from adaptloop.errors import DeliveryError
from adaptloop.kafka import producer_config
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.sdk import outcome_key, partition_key
from adaptloop.serving.outbox import Outbox
from adaptloop.settings import GatewaySettings

log = logging.getLogger("adaptloop.gateway")

DELIVERY_MARGIN_S = 5.0
#: Pause before an interaction the broker refused is produced again from the outbox.
OUTBOX_RETRY_S = 2.0


class InteractionLog:
    """Produces interactions and outcomes (``stem``): ``write`` awaits the broker's acknowledgement (ack mode); ``enqueue``
    returns once the record is in the outbox (outbox mode) and the broker takes it from there.

    A background thread polls the producer; its delivery callbacks hop onto the event loop.
    ``linger.ms=0``: a record leaves at once, so an awaited ack costs one broker round trip.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.topic = settings.topics.name("interactions")
        registry = settings.kafka.schema_registry_url
        #: stem -> (topic, serializer)
        self._targets = {"interaction": (self.topic, serde_for("interaction", registry).serialize),
                         "outcome": (settings.topics.name("outcomes"), serde_for("outcome", registry).serialize)}
        # librdkafka reports a failure at delivery.timeout.ms (settings.kafka.delivery_timeout_s); the
        # margin only guards against a callback that never comes.
        self.timeout_s = settings.kafka.delivery_timeout_s + DELIVERY_MARGIN_S
        # Nagle off: a record queued while another is in flight leaves at once, not after its ACK.
        self._producer = Producer(producer_config(settings.kafka, **{"linger.ms": 0, "socket.nagle.disable": True}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="interaction-delivery", daemon=True)
        self._outbox_dir = settings.outbox_path()
        self._outbox_max_bytes = settings.outbox_max_mib << 20
        self.outbox: Outbox | None = None
        self.retry_s = OUTBOX_RETRY_S
        self.retries = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retrying: dict[int, asyncio.TimerHandle] = {}
        self._retry_ids = itertools.count()
        self._closing = False

    def start(self) -> "InteractionLog":
        """In the event loop that will own the outbox: opens it and sends what a previous gateway left."""
        self._loop = asyncio.get_running_loop()
        self.outbox = Outbox(self._outbox_dir, max_bytes=self._outbox_max_bytes)
        self._thread.start()
        for segment, (topic, key, value) in self.outbox.leftovers():
            self._produce(topic, key, value, segment)
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def _encoded(self, record: Mapping[str, Any], stem: str) -> tuple[str, bytes, bytes]:
        topic, serialize = self._targets[stem]
        key = outcome_key(record) if stem == "outcome" else partition_key(record["interaction_id"])
        return topic, key.encode(), serialize(record, SerdeContext(topic))

    async def write(self, record: Mapping[str, Any], stem: str = "interaction") -> None:
        """Return once the broker acknowledged ``record`` (an interaction or an outcome); ``DeliveryError`` otherwise."""
        loop = asyncio.get_running_loop()
        acknowledged: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            loop.call_soon_threadsafe(_settle, acknowledged, err)

        topic, key, value = self._encoded(record, stem)
        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            raise DeliveryError(f"{stem} of {record['interaction_id']} not queued: {exc}") from exc
        try:
            await asyncio.wait_for(acknowledged, self.timeout_s)
        except TimeoutError as exc:
            raise DeliveryError(f"{stem} of {record['interaction_id']} not acknowledged within "
                                f"{self.timeout_s}s") from exc

    def enqueue(self, record: Mapping[str, Any], stem: str = "interaction") -> None:
        """Return once ``record`` is in the outbox (``OutboxError`` if it cannot be); it is produced
        in the loop's next turn, after the answer went out (the producer's threads then compete with
        nothing on the response path), and again after each refusal until the broker acknowledges it."""
        topic, key, value = self._encoded(record, stem)
        segment = self.outbox.append(topic, key, value)
        self._loop.call_soon(self._produce, topic, key, value, segment)

    def _produce(self, topic: str, key: bytes, value: bytes, segment: int) -> None:
        loop = self._loop

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            loop.call_soon_threadsafe(self._delivered, topic, key, value, segment, err)

        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            self._delivered(topic, key, value, segment, exc)

    def _delivered(self, topic: str, key: bytes, value: bytes, segment: int, err: Any) -> None:
        if err is None:
            self.outbox.acknowledged(segment)
            return
        if self._closing:
            return  # stays in the outbox for the next gateway
        self.retries += 1
        log.warning("interaction %s not taken by the broker (%s); in the outbox, retried in %.0f s",
                    key.decode(errors="replace"), err, self.retry_s)
        retry_id = next(self._retry_ids)
        self._retrying[retry_id] = self._loop.call_later(self.retry_s, self._retry, topic, key, value, segment,
                                                         retry_id)

    def _retry(self, topic: str, key: bytes, value: bytes, segment: int, retry_id: int) -> None:
        self._retrying.pop(retry_id, None)
        if not self._closing:
            self._produce(topic, key, value, segment)

    def stats(self) -> dict[str, Any]:
        return {"outbox_bytes": self.outbox.unacknowledged_bytes if self.outbox else 0, "outbox_retries": self.retries}

    def begin_close(self) -> None:
        """In the loop, before ``close``: no more retries; what is refused from now on stays in the outbox."""
        self._closing = True
        for handle in self._retrying.values():
            handle.cancel()
        self._retrying.clear()

    def close(self) -> None:
        """Wait (bounded) for what is in flight; the outbox keeps whatever the broker did not take."""
        remaining = self._producer.flush(self.timeout_s)
        self._stop.set()
        self._thread.join(5)
        if remaining:
            log.error("%d interactions not acknowledged at shutdown (those in outbox mode stay in %s)",
                      remaining, self._outbox_dir)

    def close_outbox(self) -> None:
        """In the loop, after ``close``: the delivery callbacks it scheduled have run by now."""
        if self.outbox is not None:
            self.outbox.close()


def _settle(future: asyncio.Future, err: KafkaError | None) -> None:
    if future.done():  # the waiter timed out already
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(DeliveryError(f"interaction not acknowledged: {err}"))
