"""The report's data (``adaptloop report``): the loop's records read from the topics and shaped per (tenant, task).

The shaping functions are pure (records in, plain data out) and unit tested; ``read_records`` reads
every topic over the broker. ``report`` renders them, ``report_plots`` draws them.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from adaptloop.errors import AdaptloopError, DeserializationError
from adaptloop.schemas.contract import reject_code_of

#: Curated kinds that mean "the served answer was right".
SUCCESS_KINDS = ("SUCCESS",)
ROLLING_WINDOW = 10


Pair = tuple[str, str]


def ms(value: Any) -> int:
    """Epoch milliseconds from an int or an aware datetime (fastavro's timestamp-millis)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp() * 1000)
    return int(value)


@dataclass
class Records:
    """Every decoded record of the loop's topics, in topic order (per partition)."""

    interactions: list[dict] = field(default_factory=list)
    outcomes: list[dict] = field(default_factory=list)
    curated: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    releases: list[dict] = field(default_factory=list)


# -- pure shaping --------------------------------------------------------------------------------


def pairs(records: Records) -> list[Pair]:
    """Every (tenant, task) that has interactions, curated examples, requests or releases."""
    found = {(r["tenant"], r["task"]) for group in (records.interactions, records.curated, records.requests,
                                                    records.releases) for r in group}
    return sorted(found)


def latest_examples(curated: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The last record per example_id (a re-emitted example supersedes the earlier one)."""
    latest: dict[str, Mapping[str, Any]] = {}
    for record in curated:
        latest.pop(record["example_id"], None)
        latest[record["example_id"]] = record
    return list(latest.values())


@dataclass(frozen=True)
class Verdict:
    at_ms: int
    ok: bool
    served_by: str | None


def success_points(curated: Iterable[Mapping[str, Any]], pair: Pair) -> list[Verdict]:
    """One verdict per curated example of ``pair`` on the answer the agent served, by event time.

    Examples rejected for a reason other than the answer's quality (a contract problem, a
    near-duplicate, an erasure) are still a verdict on the answer: SUCCESS or not."""
    points = [Verdict(ms(r.get("event_time") or r["curated_at"]), r["kind"] in SUCCESS_KINDS, r.get("served_by"))
              for r in latest_examples(curated) if (r["tenant"], r["task"]) == pair]
    return sorted(points, key=lambda p: p.at_ms)


def rolling_success(points: Sequence[Verdict], window: int = ROLLING_WINDOW) -> list[tuple[int, float]]:
    """(time, share of successes among the last ``window`` verdicts on the same served version)
    after each verdict: the mean restarts when another version starts answering, so a new
    adapter's line does not inherit its predecessor's verdicts."""
    out = []
    start = 0
    for i, point in enumerate(points):
        if i and point.served_by != points[i - 1].served_by:
            start = i
        chunk = points[max(start, i + 1 - window): i + 1]
        out.append((point.at_ms, sum(p.ok for p in chunk) / len(chunk)))
    return out


def success_by_version(points: Sequence[Verdict]) -> list[dict[str, Any]]:
    """Success per served version (base = None), in order of first use."""
    order: list[str | None] = []
    counts: dict[str | None, list[int]] = {}
    for p in points:
        if p.served_by not in counts:
            order.append(p.served_by)
            counts[p.served_by] = [0, 0]
        counts[p.served_by][0] += p.ok
        counts[p.served_by][1] += 1
    return [{"served_by": v or "base", "successes": counts[v][0], "count": counts[v][1],
             "success": counts[v][0] / counts[v][1]} for v in order]


def _json(text: str | None) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return {"unparsable": text}


def decisions(releases: Iterable[Mapping[str, Any]], pair: Pair) -> list[dict[str, Any]]:
    """Every release record of ``pair`` (each is a decision) with its evidence, in topic order."""
    rows = []
    for r in releases:
        if (r["tenant"], r["task"]) != pair:
            continue
        evaluation = dict(r.get("evaluation") or {})
        rows.append({
            "at_ms": ms(r["created_at"]), "version": r["version"], "state": r["state"],
            "decided_by": r.get("decided_by") or "gate", "reason": r.get("reason") or "",
            "candidate_score": evaluation.get("candidate_score"), "incumbent": evaluation.get("incumbent"),
            "incumbent_score": evaluation.get("incumbent_score"), "holdout_count": evaluation.get("holdout_count"),
            "ci": (evaluation.get("ci_low"), evaluation.get("ci_high")),
            "incumbent_ci": (evaluation.get("incumbent_ci_low"), evaluation.get("incumbent_ci_high")),
            "regression": list(r.get("regression") or []), "evidence": _json(r.get("evidence_json")),
            "request_id": (r.get("lineage") or {}).get("request_id"),
            "dataset_digest": (r.get("lineage") or {}).get("dataset_digest"),
            "train_examples": len((r.get("lineage") or {}).get("train_example_ids") or []),
        })
    return rows


def loss_curves(releases: Iterable[Mapping[str, Any]], pair: Pair) -> dict[str, list[tuple[float, float]]]:
    """version -> [(step, loss)] from ``training_json``; versions without a curve are absent."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in releases:
        if (r["tenant"], r["task"]) != pair:
            continue
        training = _json(r.get("training_json"))
        curve = training.get("loss_curve") if isinstance(training, dict) else None
        points = [(float(p[0]), float(p[1])) for p in curve or []
                  if isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p)]
        if points:
            curves[r["version"]] = points
    return curves


def attribute_dead_letter(record: Mapping[str, Any], decoders: Mapping[str, Any]) -> Pair | None:
    """(tenant, task) of a dead letter when its original bytes still decode as an interaction
    (or a tenant-only outcome: task ``?``); None when they do not."""
    value = record.get("value")
    if value is None:
        return None
    for stem, decode in decoders.items():
        try:
            decoded = decode(value)
        except (DeserializationError, AdaptloopError, ValueError, KeyError, TypeError):
            continue
        return decoded["tenant"], decoded.get("task", "?") if stem == "interaction" else "?"
    return None


def funnel(records: Records, pair: Pair, dead_letter_pairs: Sequence[Pair | None] = ()) -> dict[str, int]:
    """Counts by stage for ``pair``, in the loop's order."""
    interaction_ids = {r["interaction_id"] for r in records.interactions if (r["tenant"], r["task"]) == pair}
    examples = [r for r in latest_examples(records.curated) if (r["tenant"], r["task"]) == pair]
    out: dict[str, int] = {
        "interactions": len(interaction_ids),
        "outcomes": len({o["outcome_id"] for o in records.outcomes if o["interaction_id"] in interaction_ids}),
        "curated": len(examples),
        "admitted": sum(1 for e in examples if e["admitted"]),
        "admitted TRAIN": sum(1 for e in examples if e["admitted"] and e["split"] == "TRAIN"),
        "admitted HOLDOUT": sum(1 for e in examples if e["admitted"] and e["split"] == "HOLDOUT"),
    }
    rejected = Counter(reject_code_of(e) or "unknown" for e in examples if not e["admitted"])
    for reason, count in rejected.most_common():
        out[f"rejected: {reason}"] = count
    out["dead letters"] = sum(1 for p in dead_letter_pairs if p is not None and p[0] == pair[0] and p[1] in (pair[1], "?"))
    out["training requests"] = len({r["request_id"] for r in records.requests if (r["tenant"], r["task"]) == pair})
    latest_state: dict[str, str] = {}
    for r in records.releases:
        if (r["tenant"], r["task"]) == pair:
            latest_state[r["version"]] = r["state"]
    for state, count in sorted(Counter(latest_state.values()).items()):
        out[f"adapters {state}"] = count
    return out


# -- reading -------------------------------------------------------------------------------------


def read_records(kafka, topics, *, idle_s: float = 1.0) -> Records:
    """Every record of every loop topic, decoded (an undecodable one is skipped and counted in the log)."""
    from adaptloop.records import read_decoded

    out = Records()
    for attr, which, stem in (("interactions", "interactions", "interaction"), ("outcomes", "outcomes", "outcome"),
                              ("curated", "curated", "curated_example"), ("dead_letters", "dead_letters", "dead_letter"),
                              ("requests", "training_requests", "training_request"),
                              ("releases", "releases", "adapter_release")):
        undecodable: list[str] = []
        getattr(out, attr).extend(p.record for p in read_decoded(kafka, topics.name(which), stem, idle_s=idle_s,
                                                                 timeout_s=120, undecodable=undecodable))
        for why in undecodable:
            print(f"report: skipping an undecodable record: {why}", file=sys.stderr)
    return out


def dead_letter_decoders(registry_url: str | None = None) -> dict[str, Any]:
    from adaptloop.schemas import SerdeContext, serde_for

    context = SerdeContext("dead-letter-original")
    return {stem: (lambda value, d=serde_for(stem, registry_url).deserialize: d(value, context))
            for stem in ("interaction", "outcome")}



def slug(pair: Pair) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{pair[0]}--{pair[1]}")
