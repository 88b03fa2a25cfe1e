"""Lineage: from an adapter back to the events it learned from, and from an event forward to every adapter.

    adaptloop lineage acme--order-extract--3f2a9c...        # adapter -> decisions, dataset, ranges, evidence
    adaptloop lineage --interaction 7d0c...  [--json]        # interaction -> examples -> requests -> adapters

The chain is recorded in the records themselves, so lineage is a fold over three topics:

    CuratedExample  (example_id = interaction id; lineage.interaction = topic/partition/offset)
        -> TrainingRequest  (examples: [start, end) offset ranges of the curated topic)
        -> AdapterRelease   (lineage.request_id, lineage.examples ranges, lineage.train_example_ids,
                             lineage.dataset_digest / dataset_uri; one record per decision)

Everything below ``LineageRecords.read`` is a pure function over decoded records with their
positions, unit tested without a broker. Records that do not decode are kept in ``undecodable``
and shown, never skipped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from adaptloop.kafka import read_topics
from adaptloop.records import Positioned, decode_all
from adaptloop.schemas.contract import reject_code_of
from adaptloop.settings import KafkaSettings, Topics

DEFAULT_IDLE_S = 1.0


# -- reading --------------------------------------------------------------------------------------


@dataclass
class LineageRecords:
    """The topics lineage folds over, decoded, in topic order (erasures too: forget needs them)."""

    curated: list[Positioned] = field(default_factory=list)
    requests: list[Positioned] = field(default_factory=list)
    releases: list[Positioned] = field(default_factory=list)
    erasures: list[Positioned] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)

    #: attribute -> (Topics attribute, record stem)
    SOURCES = {"curated": ("curated", "curated_example"), "requests": ("training_requests", "training_request"),
               "releases": ("releases", "adapter_release"), "erasures": ("erasures", "erasure")}

    @classmethod
    def read(cls, kafka: KafkaSettings, topics: Topics, *, idle_s: float = DEFAULT_IDLE_S) -> "LineageRecords":
        names = {attr: topics.name(which) for attr, (which, _) in cls.SOURCES.items()}
        raw = read_topics(kafka, names.values(), idle_s=idle_s)
        records = cls()
        for attr, (_, stem) in cls.SOURCES.items():
            setattr(records, attr, decode_all(raw[names[attr]], stem, kafka.schema_registry_url, records.undecodable))
        return records


# -- pure folds ------------------------------------------------------------------------------------


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"unparsed": text}


def ranges_contain(ranges: Iterable[Mapping[str, Any]], topic: str, partition: int, offset: int) -> bool:
    """Whether any [start_offset, end_offset) range of ``topic``/``partition`` holds ``offset``."""
    return any(r["topic"] == topic and r["partition"] == partition and r["start_offset"] <= offset < r["end_offset"]
               for r in ranges)


def decisions_by_version(releases: Iterable[Positioned]) -> dict[str, list[Positioned]]:
    """Every release record per adapter version, in topic order (the last one is the version's state)."""
    by_version: dict[str, list[Positioned]] = {}
    for release in releases:
        by_version.setdefault(release.record["version"], []).append(release)
    return by_version


def current_state(decisions: list[Positioned]) -> str:
    return decisions[-1].record["state"]


def decision_summary(p: Positioned) -> dict[str, Any]:
    r = p.record
    return {"state": r["state"], "decided_by": r.get("decided_by", "gate"), "reason": r["reason"],
            "created_at": r["created_at"], "offset": p.offset, "evidence": _json(r.get("evidence_json"))}


def adapter_lineage(version: str, records: LineageRecords) -> dict[str, Any]:
    """An adapter back to its data: every decision, the dataset, the request, the source ranges, the gate."""
    decisions = decisions_by_version(records.releases).get(version)
    if not decisions:
        raise KeyError(version)
    first = decisions[0].record
    lineage = first["lineage"]
    request = next((p for p in records.requests if p.record["request_id"] == lineage["request_id"]), None)
    return {
        "version": version,
        "tenant": first["tenant"],
        "task": first["task"],
        "state": current_state(decisions),
        "digest": first.get("digest"),
        "artifact_uri": first.get("artifact_uri"),
        "base_model": first["base_model"],
        "base_model_digest": first.get("base_model_digest"),
        "method": first["method"],
        "decisions": [decision_summary(p) for p in decisions],
        "gate": {"evaluation": first["evaluation"], "regression": first.get("regression", []),
                 "evidence": _json(first.get("evidence_json"))},
        "dataset": {"digest": lineage["dataset_digest"], "uri": lineage.get("dataset_uri", ""),
                    "train_examples": len(lineage["train_example_ids"]),
                    "source_ranges": [dict(r) for r in lineage["examples"]]},
        "request": None if request is None else {
            "request_id": request.record["request_id"], "trigger": request.record["trigger"],
            "created_at": request.record["created_at"], "offset": request.offset,
            "train_count": request.record["train_count"], "holdout_count": request.record["holdout_count"]},
        "request_id": lineage["request_id"],
        "parent_version": lineage.get("parent_version"),
        "code_version": lineage["code_version"],
        "config": _json(lineage.get("config_json")),
        "training": _json(first.get("training_json")),
    }


def learned_from(release: Mapping[str, Any], example: Positioned) -> str | None:
    """How a release used a curated example: "train", "holdout"/"in range", or None (not at all).

    ``train_example_ids`` is the authority; a range containing the example's position without the
    id in the train set means the example was read for the snapshot but not trained on.
    """
    lineage = release["lineage"]
    if example.record["example_id"] in lineage["train_example_ids"]:
        return "train"
    if ranges_contain(lineage["examples"], example.topic, example.partition, example.offset):
        return "holdout" if example.record["split"] == "HOLDOUT" else "in range"
    return None


def example_summary(p: Positioned) -> dict[str, Any]:
    r = p.record
    return {"example_id": r["example_id"], "tenant": r["tenant"], "task": r["task"], "session_id": r["session_id"],
            "split": r["split"], "kind": r["kind"], "admitted": r["admitted"],
            "reject_code": reject_code_of(r), "reject_reason": r.get("reject_reason"),
            "position": {"topic": p.topic, "partition": p.partition, "offset": p.offset},
            "interaction": dict(r["lineage"]["interaction"])}


def examples_matching(records: LineageRecords, predicate) -> list[Positioned]:
    return [p for p in records.curated if predicate(p.record)]


def forward_lineage(examples: list[Positioned], records: LineageRecords) -> dict[str, Any]:
    """Curated examples forward to every training request whose ranges hold them and every adapter that used them."""
    requests = [p for p in records.requests
                if any(ranges_contain(p.record["examples"], e.topic, e.partition, e.offset) for e in examples)]
    adapters = []
    for version, decisions in decisions_by_version(records.releases).items():
        first = decisions[0].record
        uses = {e.record["example_id"]: how for e in examples if (how := learned_from(first, e))}
        if uses:
            adapters.append({"version": version, "tenant": first["tenant"], "task": first["task"],
                             "state": current_state(decisions), "request_id": first["lineage"]["request_id"],
                             "dataset_digest": first["lineage"]["dataset_digest"],
                             "learned_from": sorted(k for k, how in uses.items() if how == "train"),
                             "uses": uses})
    return {"examples": [example_summary(e) for e in examples],
            "requests": [{"request_id": p.record["request_id"], "tenant": p.record["tenant"], "task": p.record["task"],
                          "trigger": p.record["trigger"], "offset": p.offset} for p in requests],
            "adapters": adapters}


def interaction_lineage(interaction_id: str, records: LineageRecords, tenant: str | None = None) -> dict[str, Any]:
    """An interaction forward: its curated example(s) (one per re-emission), requests and adapters."""
    examples = examples_matching(records, lambda r: r["example_id"] == interaction_id
                                 and (tenant is None or r["tenant"] == tenant))
    return {"interaction_id": interaction_id} | forward_lineage(examples, records)


# -- the command -----------------------------------------------------------------------------------


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def dataset_rewrites(uri: str) -> list[dict]:
    """The erasures that rewrote the snapshot at ``uri`` since the release named it (``trainers.snapshot.rewrites``);
    a store this machine cannot read is said so, not fatal."""
    if not uri:
        return []
    from adaptloop.trainers.snapshot import rewrites

    try:
        return rewrites(uri)
    except (OSError, ValueError, ImportError) as exc:
        return [{"unreadable": f"(snapshot store not readable here: {type(exc).__name__}: {exc})"}]


def render_adapter(view: Mapping[str, Any]) -> str:
    lines = [f"adapter {view['version']}  ({view['tenant']}/{view['task']}, now {view['state']})",
             f"  artifact  {view['artifact_uri']}  digest {view['digest']}",
             f"  base      {view['base_model']}  {view['base_model_digest'] or ''}".rstrip(),
             f"  dataset   {view['dataset']['digest']}  {view['dataset']['uri']}".rstrip(),
             *(f"            rewritten by erasure {', '.join(n['erasure_ids'])}: {n['rows_removed']} example(s) out, "
               f"now {n['rewritten_into']}" if "rewritten_into" in n else f"            {n['unreadable']}"
               for n in view["dataset"].get("rewritten", ())),
             f"            {view['dataset']['train_examples']} train examples from "
             + ", ".join(f"{r['topic']}[{r['partition']}] {r['start_offset']}..{r['end_offset']}"
                         for r in view["dataset"]["source_ranges"])]
    request = view["request"]
    lines.append(f"  request   {view['request_id']}" + (
        f"  trigger {request['trigger']}, {request['train_count']} train / {request['holdout_count']} holdout, "
        f"at {_ts(request['created_at'])}" if request else "  (not on the requests topic)"))
    if view["parent_version"]:
        lines.append(f"  parent    {view['parent_version']}")
    ev = view["gate"]["evaluation"]
    lines.append(f"  gate      {ev['metric']}: candidate {ev['candidate_score']:.3f} vs {ev['incumbent']} "
                 f"{ev['incumbent_score']:.3f} (margin {ev['margin']:.3f}) on {ev['holdout_count']} holdout examples")
    for r in view["gate"]["regression"]:
        lines.append(f"            regression {r['task']} from {r['source_version']}: {r['candidate_score']:.3f} vs "
                     f"{r['incumbent_score']:.3f} on {r['holdout_count']} -> {'pass' if r['passed'] else 'FAIL'}")
    lines.append("  decisions")
    for d in view["decisions"]:
        lines.append(f"    @{d['offset']:<5d} {d['state']:<11s} by {d['decided_by']:<8s} {d['reason']}")
    return "\n".join(lines)


def render_interaction(view: Mapping[str, Any]) -> str:
    lines = [f"interaction {view['interaction_id']}"]
    if not view["examples"]:
        lines.append("  no curated example (not curated yet, erased, or unknown)")
    for e in view["examples"]:
        pos, src = e["position"], e["interaction"]
        verdict = "admitted" if e["admitted"] else f"rejected: {e['reject_code']} ({e['reject_reason']})"
        lines.append(f"  example   {e['tenant']}/{e['task']} {e['split']} {e['kind']} {verdict} "
                     f"at {pos['topic']}[{pos['partition']}]@{pos['offset']} "
                     f"(from {src['topic']}[{src['partition']}]@{src['offset']})")
    for r in view["requests"]:
        lines.append(f"  request   {r['request_id']}  trigger {r['trigger']}")
    for a in view["adapters"]:
        how = ", ".join(sorted(set(a["uses"].values())))
        lines.append(f"  adapter   {a['version']}  {a['state']}  ({how}; dataset {a['dataset_digest'][:23]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop lineage",
                                     description="Trace an adapter back to its data, or an interaction forward to adapters.")
    parser.add_argument("adapter", nargs="?", help="an adapter version")
    parser.add_argument("--interaction", help="an interaction id (= curated example id)")
    parser.add_argument("--tenant", help="restrict --interaction to this tenant")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if bool(args.adapter) == bool(args.interaction):
        parser.error("name an ADAPTER version or --interaction ID (one of them)")
    kafka, topics = KafkaSettings(), Topics()
    records = LineageRecords.read(kafka, topics)
    if args.adapter:
        try:
            view = adapter_lineage(args.adapter, records)
        except KeyError:
            print(f"adaptloop lineage: no release record for adapter {args.adapter!r} on {topics.name('releases')}",
                  file=sys.stderr)
            return 1
        view["dataset"]["rewritten"] = dataset_rewrites(view["dataset"]["uri"])
        text = render_adapter(view)
    else:
        view = interaction_lineage(args.interaction, records, args.tenant)
        text = render_interaction(view)
    view = dict(view) | ({"undecodable": records.undecodable} if records.undecodable else {})
    print(json.dumps(view, indent=2, default=str) if args.json else text)
    for problem in records.undecodable if not args.json else ():
        print(f"warning: undecodable record: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
