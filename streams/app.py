"""The Faust curation app: thin agents around the pure stages of ``adaptloop.streams.stages``.

    interactions ─┐ decode+contract ──bad──> dead letters        (any stage's bad record: dead letter, go on)
    outcomes ─────┘ redact PII -> erasures? -> join table (by interaction id, either order, several outcomes)
                    -> precedence + horizon -> score ──> {app_id}-scored (keyed tenant/task)
    scored ──────── erasures? -> dedupe per (tenant, task): exact hash + MinHash/LSH (tables) -> curated
    curated ─────── window table (by tenant/task): N admitted TRAIN examples, or T old with >= min -> training requests
    {app_id}-ticks  one tick per partition per ``tick_s``: grace periods end, age-triggered windows fire

When an example is curated: at once when a human correction joined (nothing outranks it); otherwise
``outcome_grace_s`` (wall clock) after the first outcome joined, so a stronger outcome arriving within
the grace period wins; the example is emitted once, with every outcome in its lineage (winner first).
An outcome arriving after its example was curated is counted (rejected ``after_curated``) and logged,
never re-emitted: consumers see one example per interaction, except for at-least-once repeats.

Delivery is at least once (Tansu has no transactions): every record this app sends is awaited until
the broker acknowledged it before the input record counts as processed. After a crash a record may
be sent twice: the same example (same ``example_id``, same content, same dedupe decision, which is
kept per example in a table) or the same training request (same ``request_id``). The window counts
an example id once (``counted`` table), so requests stay exact; the trainer de-duplicates its dataset
by ``example_id`` and its queue by ``request_id``. A request is written to the window table as
``pending`` (and flushed) before it is sent, so a crash right as a window fires resends that same
request, never a second one for the window.

Metrics (per worker; see ``adaptloop.streams.metrics`` for the JSON shape), on the worker's web port
(``ADAPTLOOP_STREAMS_WEB_PORT``, default 6066, bound to 127.0.0.1):

    GET http://127.0.0.1:6066/metrics             Prometheus text: adaptloop_streams_records_total{stage,
                                                  tenant_task,result,reason}, adaptloop_streams_redactions_total
                                                  {tenant_task,rule}, adaptloop_streams_consumer_lag{topic,partition}
    GET http://127.0.0.1:6066/adaptloop/metrics   the same numbers as JSON: {"stages", "tenants", "consumer_lag"}

Build it with ``create_app(settings)``; ``adaptloop.streams.worker`` runs it. The agents' bodies are
``adaptloop.streams.curation.Curation`` (join and ticks) with ``dedupe_agent`` and ``window_agent``; the
internal topics are created by ``adaptloop.streams.internal_topics``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import faust
from mode.supervisors import CrashingSupervisor

from adaptloop.processes import mark_ready
from adaptloop.settings import StreamsSettings
from adaptloop.streams import stages
from adaptloop.streams.curation import Curation
from adaptloop.streams.delivery import event_context
from adaptloop.streams.erasures import ErasureFeed
from adaptloop.streams.faust_app import new_app
from adaptloop.streams.metrics import CONTENT_TYPE_LATEST
from adaptloop.tasks import Catalogue

log = logging.getLogger(__name__)


def create_app(settings: StreamsSettings, *, erasures: ErasureFeed | None = None,
               catalogue: Catalogue | None = None) -> faust.App:
    """A Faust app for ``settings`` and the task catalogue (default: ``load_catalogue()``); nothing global,
    nothing started."""
    app = new_app(settings)
    curation = Curation(app, settings, erasures=erasures, catalogue=catalogue)
    app.curation = curation  # for introspection from a worker shell

    @app.agent(curation.join_inputs, name="join", supervisor_strategy=CrashingSupervisor)
    async def join(stream: faust.StreamT) -> None:
        await curation.run_batched(stream, stages.STAGE_JOIN, curation.on_input, before_settle=curation.staged_joins.write)

    @app.agent(curation.scored, name="dedupe", supervisor_strategy=CrashingSupervisor)
    async def deduplicate(stream: faust.StreamT) -> None:
        await curation.run_batched(stream, stages.STAGE_DEDUPE, curation.on_scored)

    # Not ``run_batched``: a request must be flushed to the table as pending before it is sent and
    # marked sent after (see ``_fire``), so its sends are awaited where they happen.

    @app.agent(curation.curated, name="window", supervisor_strategy=CrashingSupervisor)
    async def windows(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            for event in events:
                with event_context(event):
                    await curation.guarded(stages.STAGE_WINDOW, event, curation.on_curated)
            curation.staged_windows.write()

    @app.agent(curation.ticks, name="ticks", supervisor_strategy=CrashingSupervisor)
    async def ticks(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await curation.on_tick(event)

    @app.timer(settings.tick_s)
    async def tick() -> None:
        """One tick per owned partition of the ticks topic: the tick agent then works in that partition's context."""
        if curation.erasures is not None:
            curation.erasures.poll()
        ticks_topic = curation.ticks.get_topic_name()
        for tp in app.assignor.assigned_actives():
            if tp.topic == ticks_topic:
                await curation.ticks.send(key=b"tick", value=b"", partition=tp.partition)

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        await curation.refresh_lag()
        return web.bytes(curation.metrics.prometheus(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/adaptloop/metrics")
    async def json_metrics(web: Any, request: Any) -> Any:
        await curation.refresh_lag()
        return web.json(curation.metrics.snapshot())

    readiness = {"marked": False}

    async def on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
        # Partitions are assigned and tables recovered: the agents consume from here on.
        curation.on_rebalance()
        if not readiness["marked"]:
            readiness["marked"] = True
            # What start-up built (Faust, phonenumbers' metadata, the recovered tables) lives as long as
            # the worker: out of the collector's reach, a full collection scans only what came later
            # (each one took ~100 ms of a busy worker before; measured with gc.callbacks under the bench).
            gc.freeze()
            mark_ready()
            log.info("curation ready: partitions assigned, tables recovered (event loop: %s)",
                     type(asyncio.get_running_loop()).__module__)

    app.on_rebalance_complete.connect(on_rebalance_complete)
    return app
