"""``adaptloop canary``: the canary controller, and the manual ``adaptloop release promote|rollback``.

    adaptloop canary                                  # watches every alias with a RELEASED canary
    adaptloop release promote acme--extract--0123abcd --reason "checked by hand"
    adaptloop release rollback acme--extract--0123abcd --reason "customer complaint"

A RELEASED version (the trainer's gate found it better, or could not decide) is a canary: the gateway
sends it ``ADAPTLOOP_GATEWAY_CANARY_SHARE`` of its alias's traffic, or the smaller share its release
carries (``canary_share``: an undecided gate's, set by its uncertainty); the incumbent (the alias's
PROMOTED version, or an earlier canary still undecided when this one came, else the base model) gets the rest. The controller compares both sides' outcomes from the
curated stream (``served_by`` names the version that answered, null = base; a SUCCESS is a success,
CORRECTION and FAILURE are not), counted from the canary's ``created_at`` on so that both sides are
measured over the same period, each example once (at-least-once upstream).

The test and its guards: ``adaptloop.serving.canary_decision``.

Every decision is a release record for the version (decided_by ``canary`` or ``manual``) with its
evidence as JSON; promoting retires every other servable version of the alias (RETIRED records).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from adaptloop.errors import AdaptloopError, BrokerError, ConfigError, DeserializationError, ServingError
from adaptloop.kafka import DeliveryTracker, consumer_config, partitions_of
from adaptloop.processes import mark_ready
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import release_decision
from adaptloop.serving.canary_decision import Decision, RequestStats, Tally, Thresholds, decide
from adaptloop.serving.registry import Release, ReleaseReader
from adaptloop.settings import CanarySettings, admin_key
from adaptloop.tasks import load_catalogue

log = logging.getLogger("adaptloop.canary")

BASE = "base"
READY_TIMEOUT_S = 120.0


def success(record: Mapping[str, Any]) -> bool:
    return record["kind"] == "SUCCESS"


# --- release records ------------------------------------------------------------------------------

def decision_record(release: Release, state: str, *, reason: str, decided_by: str,
                    evidence: Mapping[str, Any]) -> dict[str, Any]:
    """A new record for ``release``'s version: its newest record with the decision applied."""
    if release.record is None:
        raise ServingError(f"no record kept for {release.version}")
    return release_decision(release.record, state, reason=reason, decided_by=decided_by, evidence=evidence)


def decisions_for(releases: Mapping[str, Release], version: str, action: str, *, reason: str, decided_by: str,
                  evidence: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records one decision writes: PROMOTED + RETIRED for the alias's other live versions, or ROLLED_BACK."""
    release = releases.get(version)
    if release is None:
        raise ServingError(f"no release {version} on the registry")
    if action == "rollback":
        return [decision_record(release, "ROLLED_BACK", reason=reason, decided_by=decided_by, evidence=evidence)]
    if action != "promote":
        raise ValueError(action)
    records = [decision_record(release, "PROMOTED", reason=reason, decided_by=decided_by, evidence=evidence)]
    for other in releases.values():
        if (other.tenant, other.task) == (release.tenant, release.task) and other.version != version and other.servable:
            records.append(decision_record(other, "RETIRED", reason=f"superseded by {version}", decided_by=decided_by,
                                           evidence={"superseded_by": version}))
    return records


class ReleaseWriter:
    def __init__(self, settings: CanarySettings) -> None:
        self.topic = settings.topics.name("releases")
        self.serialize = serde_for("adapter_release", settings.kafka.schema_registry_url).serialize
        self.producer = DeliveryTracker(settings.kafka)

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Every record acknowledged, or ``DeliveryError``."""
        for record in records:
            self.producer.send(self.topic, self.serialize(record, SerdeContext(self.topic)), key=record["version"])
        self.producer.flush()


# --- the controller -------------------------------------------------------------------------------

def canary_and_incumbent(releases: Mapping[str, Release], tenant: str, task: str) -> tuple[Release | None, Release | None]:
    """(canary, incumbent) of an alias, None for the base; the gateway routes the same way.

    The canary is the newest RELEASED version newer than the newest PROMOTED one. The incumbent is the newest
    servable version older than the canary: the PROMOTED one, or an earlier canary not decided yet when this one
    came. That earlier canary is what the gate compared this one with and what served the alias until now, so it
    keeps the traffic the new canary does not take (and is judged again if the new one is rolled back)."""
    mine = [r for r in releases.values() if (r.tenant, r.task) == (tenant, task)]
    key = lambda r: (r.created_at, r.offset)  # noqa: E731
    promoted = max((r for r in mine if r.state == "PROMOTED"), key=key, default=None)
    newer = [r for r in mine if r.state == "RELEASED" and (promoted is None or key(r) > key(promoted))]
    canary = max(newer, key=key, default=None)
    if canary is None:
        return None, promoted
    return canary, max((r for r in newer if key(r) < key(canary)), key=key, default=promoted)


class Outcomes:
    """Curated examples per (tenant, task, served_by): example id -> (event_time, success)."""

    def __init__(self) -> None:
        self.by_side: dict[tuple[str, str, str], dict[str, tuple[int, bool]]] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        side = (record["tenant"], record["task"], record.get("served_by") or BASE)
        self.by_side.setdefault(side, {})[record["example_id"]] = (int(record.get("event_time") or 0), success(record))

    def tally(self, tenant: str, task: str, served_by: str, since_ms: int) -> Tally:
        rows = [ok for t, ok in self.by_side.get((tenant, task, served_by), {}).values() if t >= since_ms]
        return Tally(sum(rows), len(rows))


class CuratedReader:
    """The curated topic from its beginning, no consumer group (a restarted controller rebuilds its tallies)."""

    def __init__(self, settings: CanarySettings, outcomes: Outcomes) -> None:
        self.settings = settings
        self.topic = settings.topics.name("curated")
        self.outcomes = outcomes
        self.undecodable = 0
        self._deserialize = serde_for("curated_example", settings.kafka.schema_registry_url).deserialize
        self._consumer = Consumer(consumer_config(settings.kafka, group_id=f"adaptloop-canary-{time.time_ns()}",
                                                  **{"fetch.wait.max.ms": 100}))
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING)
                               for p in partitions_of(settings.kafka, self.topic)])

    def poll(self, timeout_s: float) -> int:
        try:
            messages = self._consumer.consume(500, timeout=timeout_s)
        except KafkaException as exc:
            raise BrokerError(f"reading {self.topic}: {exc}") from exc
        for msg in messages:
            if msg.error():
                if msg.error().fatal():
                    raise BrokerError(f"reading {self.topic}: {msg.error()}")
                continue
            try:
                self.outcomes.add(self._deserialize(msg.value(), SerdeContext(self.topic, msg.partition(), msg.offset())))
            except (DeserializationError, KeyError, TypeError, ValueError) as exc:
                # The streams' own output; a bad one is logged and counted, and decides nothing.
                self.undecodable += 1
                log.error("undecodable curated record at %s:%s: %s", msg.partition(), msg.offset(), exc)
        return len(messages)

    def close(self) -> None:
        self._consumer.close()


def fetch_stats(http: httpx.Client, urls: Iterable[str], alias_name: str, since_ms: int) -> dict[str, RequestStats]:
    """Every gateway's ``/stats`` of one alias since ``since_ms``, summed: served version or 'base' -> numbers
    (p95: the worst gateway's)."""
    merged: dict[str, dict[str, RequestStats]] = {}
    for url in urls:
        try:
            response = http.get(url.rstrip("/") + "/stats", params={"alias": alias_name, "since_ms": since_ms},
                                timeout=2.0)
            response.raise_for_status()
            data = response.json()["aliases"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("gateway %s has no stats now (%s)", url, exc)
            continue
        for name, sides in data.items():
            for served, side in sides.items():
                old = merged.setdefault(name, {}).get(served, RequestStats())
                merged[name][served] = RequestStats(old.requests + int(side["requests"]), old.errors + int(side["errors"]),
                                                    max(old.p95_ms, float(side["p95_ms"])))
    return merged.get(alias_name, {})


class Controller:
    def __init__(self, settings: CanarySettings) -> None:
        self.settings = settings
        self.thresholds = Thresholds.from_settings(settings)
        self.reader = ReleaseReader(settings.kafka, settings.topics, name="canary-registry")
        self.outcomes = Outcomes()
        self.writer = ReleaseWriter(settings)
        self.decided: set[str] = set()
        self.watching: dict[str, str] = {}

    def step(self, stats: Callable[[str, int], Mapping[str, RequestStats]]) -> list[tuple[str, Decision]]:
        """Judge every alias's canary once; write the decisions taken. ``stats(alias, since_ms)``: gateway numbers."""
        releases = self.reader.releases()
        taken = []
        for tenant, task in sorted({(r.tenant, r.task) for r in releases.values() if r.state == "RELEASED"}):
            canary, incumbent = canary_and_incumbent(releases, tenant, task)
            if canary is None or canary.version in self.decided:
                continue
            incumbent_name = incumbent.version if incumbent else BASE
            alias_stats = stats(f"{tenant}/{task}", canary.created_at)
            decision = decide(self.outcomes.tally(tenant, task, canary.version, canary.created_at),
                              self.outcomes.tally(tenant, task, incumbent_name, canary.created_at),
                              alias_stats.get(canary.version, RequestStats()),
                              alias_stats.get(incumbent_name, RequestStats()), self.thresholds)
            if decision.action is None:
                if self.watching.get(canary.version) != json.dumps(decision.evidence["canary"]):
                    self.watching[canary.version] = json.dumps(decision.evidence["canary"])
                    log.info("watching %s vs %s: %s", canary.version, incumbent_name, decision.evidence["test"])
                continue
            evidence = decision.evidence | {"incumbent_version": incumbent_name, "since_ms": canary.created_at}
            self.writer.write(decisions_for(releases, canary.version, decision.action, reason=decision.reason,
                                            decided_by="canary", evidence=evidence))
            self.decided.add(canary.version)
            log.info("%s %s: %s", decision.action, canary.version, decision.reason)
            taken.append((canary.version, decision))
        return taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop canary", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = CanarySettings()
    try:
        # A broken catalogue stops the controller at start, as it stops every process of the stack.
        catalogue = load_catalogue()
    except ConfigError as exc:
        print(f"adaptloop canary: {exc}", file=sys.stderr)
        return 2
    log.info("tasks of %s: %s", catalogue.source, sorted(catalogue))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller = Controller(settings)
    curated: CuratedReader | None = None
    admin = admin_key(settings.gateway_admin_key, settings.gateway_admin_key_file)
    http = httpx.Client(headers={"authorization": f"Bearer {admin}"})  # the gateways' /stats is for operators only
    try:
        controller.reader.start()
        if not controller.reader.wait_caught_up(READY_TIMEOUT_S):
            raise BrokerError(f"the registry reader did not catch up: {controller.reader.error}")
        curated = CuratedReader(settings, controller.outcomes)
        mark_ready()
        log.info("canary controller ready; gateways %s", settings.gateway_urls)
        next_step = 0.0
        while not stop.is_set():
            curated.poll(0.2)
            if not controller.reader.alive:
                raise BrokerError(f"the registry reader stopped: {controller.reader.error}")
            if time.monotonic() >= next_step:
                controller.step(lambda name, since: fetch_stats(http, settings.gateway_urls, name, since))
                next_step = time.monotonic() + settings.poll_s
        return 0
    except AdaptloopError as exc:
        log.error("%s", exc)
        return 1
    finally:
        controller.reader.stop()
        if curated is not None:
            curated.close()
        http.close()


def release_main(argv: list[str] | None = None) -> int:
    """``adaptloop release promote|rollback VERSION --reason TEXT``: a manual decision, recorded like the controller's."""
    parser = argparse.ArgumentParser(prog="adaptloop release", description="Promote or roll back a version by hand.")
    parser.add_argument("action", choices=("promote", "rollback"))
    parser.add_argument("version")
    parser.add_argument("--reason", required=True, help="why (kept in the release record)")
    parser.add_argument("--by", default="", help="who decided (kept in the evidence)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = CanarySettings()
    reader = ReleaseReader(settings.kafka, settings.topics, name="release-cli").start()
    try:
        if not reader.wait_caught_up(60):
            print(f"adaptloop release: the registry did not answer: {reader.error}", file=sys.stderr)
            return 1
        records = decisions_for(reader.releases(), args.version, args.action, reason=f"manual: {args.reason}",
                                decided_by="manual", evidence={"note": args.reason, "by": args.by})
        ReleaseWriter(settings).write(records)
    except AdaptloopError as exc:
        print(f"adaptloop release: {exc}", file=sys.stderr)
        return 1
    finally:
        reader.stop()
    for record in records:
        print(f"{record['version']} -> {record['state']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
