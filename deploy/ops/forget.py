"""Erasure (``adaptloop forget``): tombstone the data, then find and act on every adapter that learned from it.

    adaptloop forget --interaction 7d0c... [--tenant acme]
    adaptloop forget --session s-42 --tenant acme --retire
    adaptloop forget --subject alice@example.com --tenant acme --reason "art. 17 request"
    adaptloop forget --subject "+1 (415) 555-2671" --tenant acme
    adaptloop forget --subject EMP-123456 --tenant acme --raw

A subject is keyed as curation keys it (``adaptloop.ops.subjects``): the same PII detectors
(``adaptloop.streams.pii``, with curation's ``ADAPTLOOP_STREAMS_PHONE_REGION`` and
``ADAPTLOOP_STREAMS_PII_PATTERNS``) turn it into the value they take from a text that holds it, so
``+1 (415) 555-2671`` erases the examples that said "call 415-555-2671". A value they do not recognise
as one identifier of a person is refused (no curated example can carry its key) unless ``--raw``. The key is an
HMAC under the deployment's subject-key secret (``ADAPTLOOP_ERASURE_SUBJECT_SECRET``, else the file
``ADAPTLOOP_ERASURE_SUBJECT_SECRET_FILE``): forget must read the one curation reads. ``--legacy-key`` keys
it as examples curated before keys took a secret were keyed.

In this order, each step acknowledged by the broker before the next:

1. an Erasure record on the erasures topic (``adaptloop.erasure``): curation drops matching
   interactions and outcomes from now on, and every dataset snapshot excludes matching examples;
2. through lineage (``adaptloop.ops.lineage``), every adapter version whose ``train_example_ids``
   hold a matching curated example; for each one that is live (RELEASED or PROMOTED) a new
   release record with ``decided_by="erasure"`` and the evidence (erasure id, matched example
   ids): ``--retire`` makes it RETIRED (serving unloads it); otherwise it keeps its state with
   the reason "flagged: retrain without erased data" and
3. a training request over the same ranges, trigger ``erasure:<erasure id>``, whose id is
   sha256("<old request id>:<erasure id>"): the trainer snapshots the ranges again without the
   erased examples and gates the retrained adapter against the flagged one;
4. in the trainer's stores (``adaptloop.ops.erasure_sweep``; ``ADAPTLOOP_TRAINER_ARTIFACT_DIR`` and
   ``_DATASET_STORE``): every snapshot of the tenant that holds a matching example is rewritten without
   it (the old folder keeps only a note naming the new digest), and the adapter folder, checkpoints and
   Ray run state of every version that learned from one and is not live now are deleted. A flagged
   adapter serves, and stays, until its successor replaces it: run the same forget again then.

What stays on the broker's immutable logs: interactions, outcomes and dead letters as they arrived (until
``ADAPTLOOP_TOPICS_RAW_RETENTION_MS``; embedded Tansu expires nothing) and curated examples (redacted; every
reader applies the erasure). Curation purges its own table entries; a gateway's outbox keeps a record only
until the broker takes it. deploy/README.md, "Erasure": what remains where.

The erasure id is derived from (tenant, scope, key), so running the same forget twice writes no
second decision and no second request: every step checks what is already on the topics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from adaptloop.erasure import INTERACTION, SESSION, SUBJECT, ErasureSet, build_erasure
from adaptloop.errors import ConfigError
from adaptloop.kafka import DeliveryTracker, ensure_topics
from adaptloop.ops.erasure_sweep import ArtifactStore, Sweep, sweep_store
from adaptloop.ops.lineage import LineageRecords, decisions_by_version, learned_from, ranges_contain
from adaptloop.ops.subjects import normalize_subject
from adaptloop.records import Positioned
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import (SERVABLE, ReleaseState, code_version, now_ms, release_decision,
                                        training_request)
from adaptloop.settings import ErasureSettings, KafkaSettings, StreamsSettings, Topics, TrainerSettings

DECIDED_BY = "erasure"
FLAG_REASON = "flagged: retrain without erased data"


def erasure_id_for(tenant: str, scope: str, key: str) -> str:
    """Deterministic: forgetting the same thing twice is the same erasure (no second retraining)."""
    return "era-" + hashlib.sha256(f"{tenant}\0{scope}\0{key}".encode()).hexdigest()[:24]


def retrain_request_id(old_request_id: str, erasure_id: str) -> str:
    return hashlib.sha256(f"{old_request_id}:{erasure_id}".encode()).hexdigest()


@dataclass
class AdapterAction:
    """What forget does about one adapter version that learned from erased examples."""

    version: str
    previous_state: str
    action: str  # "retire" | "flag" | "none (not live)" | "none (already decided)"
    learned_from: list[str]
    decision: dict | None = None
    retrain_request: dict | None = None
    release: Mapping[str, Any] = field(default_factory=dict, repr=False)  # its newest record before forget

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "previous_state": self.previous_state, "action": self.action,
                "learned_from": self.learned_from,
                "new_state": self.decision["state"] if self.decision else None,
                "retrain_request_id": self.retrain_request["request_id"] if self.retrain_request else None}


@dataclass
class ForgetPlan:
    erasure: dict
    matched: list[Positioned]
    adapters: list[AdapterAction] = field(default_factory=list)
    requests_already_published: list[str] = field(default_factory=list)
    sweep: Sweep | None = None  # what was deleted and rewritten in the trainer's stores (None: not swept)

    def summary(self) -> dict[str, Any]:
        return {"erasure": self.erasure,
                "matched_examples": sorted({p.record["example_id"] for p in self.matched}),
                "adapters": [a.summary() for a in self.adapters],
                "requests_already_published": self.requests_already_published,
                "store": self.sweep.summary() if self.sweep else None}


def infer_tenant(records: LineageRecords, scope: str, key: str) -> str:
    """The tenant of an interaction or session, from its curated examples (needed when --tenant is left out)."""
    field_name = "example_id" if scope == INTERACTION else "session_id"
    tenants = sorted({p.record["tenant"] for p in records.curated if p.record[field_name] == key})
    if len(tenants) != 1:
        found = f"tenants {tenants}" if tenants else "no curated example"
        raise ConfigError(f"cannot infer the tenant of {scope.lower()} {key!r} ({found}): pass --tenant")
    return tenants[0]


def retrain_request(old: Mapping[str, Any] | None, release: Mapping[str, Any], erasure_id: str,
                    erased: list[Positioned], *, created_at: int, code: str) -> dict:
    """The same ranges again, under a new id; counts less the erased examples they held."""
    lineage = release["lineage"]
    ranges = [dict(r) for r in (old["examples"] if old else lineage["examples"])]
    inside = [p for p in erased if ranges_contain(ranges, p.topic, p.partition, p.offset) and p.record["admitted"]]
    erased_train = len({p.record["example_id"] for p in inside if p.record["split"] == "TRAIN"})
    erased_holdout = len({p.record["example_id"] for p in inside if p.record["split"] == "HOLDOUT"})
    old_train = old["train_count"] if old else len(lineage["train_example_ids"])
    old_holdout = old["holdout_count"] if old else release["evaluation"]["holdout_count"]
    return training_request(request_id=retrain_request_id(lineage["request_id"], erasure_id),
                            tenant=release["tenant"], task=release["task"], trigger=f"erasure:{erasure_id}",
                            examples=ranges, train_count=max(0, old_train - erased_train),
                            holdout_count=max(0, old_holdout - erased_holdout), code_version=code, created_at=created_at)


def plan_forget(erasure: Mapping[str, Any], records: LineageRecords, *, retire: bool,
                decided_at: int | None = None, code: str = "adaptloop") -> ForgetPlan:
    """Pure: which examples the erasure matches, which adapters learned from them, what to publish."""
    decided_at = now_ms() if decided_at is None else decided_at
    matcher = ErasureSet.of([erasure])
    matched = [p for p in records.curated if matcher.match(p.record) is not None]
    plan = ForgetPlan(dict(erasure), matched)
    requests = {p.record["request_id"]: p.record for p in records.requests}
    erasure_id = erasure["erasure_id"]
    for version, decisions in decisions_by_version(records.releases).items():
        first, latest = decisions[0].record, decisions[-1].record
        learned = sorted({p.record["example_id"] for p in matched if learned_from(first, p) == "train"})
        if not learned:
            continue
        action = AdapterAction(version, latest["state"], "retire" if retire else "flag", learned, release=latest)
        plan.adapters.append(action)
        done = any(d.record.get("decided_by") == DECIDED_BY
                   and json.loads(d.record.get("evidence_json") or "{}").get("erasure_id") == erasure_id
                   for d in decisions)
        if done:
            action.action = "none (already decided)"
            continue
        if latest["state"] not in SERVABLE:
            action.action = "none (not live)"
            continue
        evidence = {"erasure_id": erasure_id, "scope": erasure["scope"], "key": erasure["key"],
                    "tenant": erasure["tenant"], "matched_example_ids": learned, "previous_state": latest["state"],
                    "decided_at": decided_at, "action": action.action}
        if retire:
            action.decision = release_decision(latest, ReleaseState.RETIRED, decided_by=DECIDED_BY, evidence=evidence,
                                               reason=f"retired: learned from erased data (erasure {erasure_id})")
            continue
        old = requests.get(first["lineage"]["request_id"])
        request = retrain_request(old, first, erasure_id, matched, created_at=decided_at, code=code)
        evidence["retrain_request_id"] = request["request_id"]
        action.decision = release_decision(latest, latest["state"], decided_by=DECIDED_BY, evidence=evidence,
                                           reason=f"{FLAG_REASON} (erasure {erasure_id}, "
                                                  f"retrain request {request['request_id'][:12]})")
        if request["request_id"] in requests:
            plan.requests_already_published.append(request["request_id"])
        else:
            action.retrain_request = request
    return plan


@dataclass
class Forgetter:
    """Reads what lineage needs, writes the erasure, the decisions and the retraining requests (acknowledged),
    then sweeps ``store`` (``adaptloop.ops.erasure_sweep``; None: the stores are left as they are)."""

    kafka: KafkaSettings
    topics: Topics
    store: ArtifactStore | None = None

    def forget(self, *, scope: str, key: str, tenant: str | None, retire: bool = False,
               requested_by: str | None = None, reason: str | None = None) -> ForgetPlan:
        records = LineageRecords.read(self.kafka, self.topics)
        existing = ErasureSet.of(p.record for p in records.erasures)
        if tenant is None:
            if scope == SUBJECT:
                raise ConfigError("--subject needs --tenant (the subject key is salted per tenant)")
            tenant = infer_tenant(records, scope, key)
        erasure = build_erasure(tenant=tenant, scope=scope, key=key, requested_by=requested_by, reason=reason,
                                erasure_id=erasure_id_for(tenant, scope, key))
        plan = plan_forget(erasure, records, retire=retire, code=code_version())
        ensure_topics(self.kafka, self.topics)  # never let a produce auto-create a topic with the broker's defaults
        producer = DeliveryTracker(self.kafka)
        # 1. The tombstone first: a retraining request must never be read before it.
        if (existing.by_scope[scope].get((tenant, key)) or {}).get("erasure_id") != erasure["erasure_id"]:
            self._send(producer, "erasures", "erasure", erasure, erasure["erasure_id"])
            producer.flush()
        # 2. The decisions, then 3. the retraining requests.
        for action in plan.adapters:
            if action.decision:
                self._send(producer, "releases", "adapter_release", action.decision, action.version)
        producer.flush()
        for action in plan.adapters:
            if action.retrain_request:
                request = action.retrain_request
                self._send(producer, "training_requests", "training_request", request,
                           f"{request['tenant']}/{request['task']}")
        producer.flush()
        # 4. Only now, every decision on record: the stores (a retired version's artifacts, the snapshots).
        if self.store is not None:
            plan.sweep = sweep_store(self.store, plan, records)
        return plan

    def _send(self, producer: DeliveryTracker, which: str, stem: str, record: Mapping[str, Any], key: str) -> None:
        topic = self.topics.name(which)
        value = serde_for(stem, self.kafka.schema_registry_url).serialize(record, SerdeContext(topic))
        producer.send(topic, value, key=key)


def render(plan: ForgetPlan) -> str:
    e = plan.erasure
    lines = [f"erasure {e['erasure_id']}: {e['tenant']} {e['scope'].lower()} {e['key']}",
             f"  matched {len({p.record['example_id'] for p in plan.matched})} curated example(s); "
             "curation and every future snapshot exclude them"]
    if not plan.adapters:
        lines.append("  no adapter learned from them")
    for a in plan.adapters:
        line = f"  adapter {a.version} ({a.previous_state}): {a.action}"
        if a.retrain_request:
            line += f"; retraining request {a.retrain_request['request_id'][:12]} published"
        lines.append(line + f"  [learned from {len(a.learned_from)}]")
    for request_id in plan.requests_already_published:
        lines.append(f"  retraining request {request_id[:12]} was already published")
    if plan.sweep is None:
        lines.append("  the trainer's stores were not swept")
    else:
        lines += plan.sweep.lines() or ["  no snapshot or adapter artifact in the stores held them"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop forget", description="Erase an interaction, a session or a "
                                     "data subject; retrain or retire every adapter that learned from it.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--interaction", help="an interaction id")
    which.add_argument("--session", help="a session id")
    which.add_argument("--subject", help="an identifier (e-mail, phone, card, IBAN, IP, a PII pattern's user id), "
                       "in any written form: keyed as curation keys it, stored only as its salted key")
    parser.add_argument("--tenant", help="the tenant (required with --subject; else inferred from curated data)")
    parser.add_argument("--retire", action="store_true", help="retire affected adapters instead of retraining them")
    parser.add_argument("--requested-by", help="who asked (recorded on the erasure)")
    parser.add_argument("--reason", help="why (recorded on the erasure)")
    parser.add_argument("--raw", action="store_true", help="with --subject: key the value as written (case and "
                        "whitespace folded), for a user id a PII pattern matches in curation but not here")
    parser.add_argument("--legacy-key", action="store_true", help="with --subject: key it as examples curated "
                        "before subject keys took the deployment's secret were keyed (run it beside the usual one)")
    parser.add_argument("--json", action="store_true", help="print the plan that was carried out as JSON")
    args = parser.parse_args(argv)
    if args.subject is not None and not args.tenant:
        parser.error("--subject needs --tenant")
    if (args.raw or args.legacy_key) and args.subject is None:
        parser.error("--raw and --legacy-key go with --subject")
    subject = None
    if args.interaction:
        scope, key = INTERACTION, args.interaction
    elif args.session:
        scope, key = SESSION, args.session
    else:
        streams = StreamsSettings()  # curation's PII settings: the subject must be keyed as curation keys it
        try:
            subject = normalize_subject(args.subject, phone_region=streams.phone_region,
                                        pii_patterns=streams.pii_patterns, raw=args.raw)
        except ValueError as exc:
            print(f"adaptloop forget: {exc}", file=sys.stderr)
            return 2
        try:
            secret = None if args.legacy_key else ErasureSettings().secret()  # curation's: the same keys
        except ConfigError as exc:
            print(f"adaptloop forget: {exc}", file=sys.stderr)
            return 2
        scope, key = SUBJECT, subject.key(args.tenant, secret)
    try:
        store = ArtifactStore.of(TrainerSettings())  # the trainer's: where its snapshots and adapters are
        plan = Forgetter(KafkaSettings(), Topics(), store).forget(
            scope=scope, key=key, tenant=args.tenant, retire=args.retire, requested_by=args.requested_by,
            reason=args.reason)
    except ConfigError as exc:
        print(f"adaptloop forget: {exc}", file=sys.stderr)
        return 2
    if args.json:
        summary = plan.summary()
        if subject is not None:
            summary["subject"] = {"kind": subject.kind, "normalized_by": subject.normalized_by, "key": key}
        print(json.dumps(summary, indent=2, default=str))
    else:
        if subject is not None:
            print(f"subject keyed as {subject.kind} (normalized by {subject.normalized_by}): {key}")
        print(render(plan))
    if plan.sweep is not None and plan.sweep.problems:
        print("adaptloop forget: the records are written, but erased content may remain (see NOT ERASED); "
              "run the same forget again once that is fixed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
