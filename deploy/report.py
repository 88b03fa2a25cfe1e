"""``adaptloop report``: what the loop did, per (tenant, task), as an HTML page with PNG plots.

    adaptloop report --out ./report                      # reads the topics of the running stack
    adaptloop report --out ./report --demo demo.json     # plus the demo's own per-cycle measurements

One page per (tenant, task) (``<tenant>--<task>.html``) and an ``index.html`` linking them:

- validator success of the served agent over time: every curated example is one verdict on an
  answer the agent served (SUCCESS: the answer was right; CORRECTION / FAILURE: it was not),
  placed at the interaction's event time, with a rolling mean, the release decisions marked
  (RELEASED / PROMOTED green, REJECTED / ROLLED_BACK red, RETIRED grey) and the demo's
  measurements, when given, as large dots;
- the gate's evidence per release record (every decision is a record: gate, canary, manual, erasure);
- training loss curves from ``release.training_json`` (``{"loss_curve": [[step, loss], ...]}``;
  older releases carry ``"{}"`` and are listed as "not recorded");
- the data funnel by stage: interactions, outcomes, curated (admitted / rejected by reason),
  dead letters (attributed by decoding the original bytes; the rest are listed on the index),
  training requests, release records by state.

The shaping functions are pure (records in, plain data out) and unit tested; ``read_records``
reads every topic over the broker; ``report_plots`` draws with matplotlib's Agg backend (no display
needed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
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
    from adaptloop.kafka import read_ranges
    from adaptloop.schemas import SerdeContext, serde_for

    out = Records()
    for attr, which, stem in (("interactions", "interactions", "interaction"), ("outcomes", "outcomes", "outcome"),
                              ("curated", "curated", "curated_example"), ("dead_letters", "dead_letters", "dead_letter"),
                              ("requests", "training_requests", "training_request"),
                              ("releases", "releases", "adapter_release")):
        topic = topics.name(which)
        decode = serde_for(stem, kafka.schema_registry_url).deserialize
        bucket = getattr(out, attr)
        for msg in read_ranges(kafka, topic, idle_s=idle_s, timeout_s=120):
            try:
                bucket.append(decode(msg.value(), SerdeContext(topic, msg.partition(), msg.offset())))
            except DeserializationError as exc:
                print(f"report: skipping an undecodable record: {exc}", file=sys.stderr)
    return out


def dead_letter_decoders(registry_url: str | None = None) -> dict[str, Any]:
    from adaptloop.schemas import SerdeContext, serde_for

    context = SerdeContext("dead-letter-original")
    return {stem: (lambda value, d=serde_for(stem, registry_url).deserialize: d(value, context))
            for stem in ("interaction", "outcome")}


# -- drawing -------------------------------------------------------------------------------------


# -- HTML ----------------------------------------------------------------------------------------


def slug(pair: Pair) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{pair[0]}--{pair[1]}")


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>adaptloop report: {{ pair[0] }} / {{ pair[1] }}</title>
<style>body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top} pre{margin:0;white-space:pre-wrap;font-size:11px}
.RELEASED,.PROMOTED{color:green}.REJECTED,.ROLLED_BACK{color:#b00}.RETIRED{color:#777}</style></head><body>
<p><a href="index.html">all (tenant, task) pairs</a></p>
<h1>{{ pair[0] }} / {{ pair[1] }}</h1>
<p>Generated {{ generated }}.</p>
<h2>Validator success of the served agent</h2>
<img src="{{ slug }}-success.png" alt="success over time">
<table><tr><th>served by</th><th>verdicts</th><th>successes</th><th>success</th></tr>
{% for row in by_version %}<tr><td>{{ row.served_by }}</td><td>{{ row.count }}</td><td>{{ row.successes }}</td>
<td>{{ "%.0f%%"|format(100 * row.success) }}</td></tr>{% endfor %}</table>
{% if measurements %}<h3>Demo measurements (fresh cases, judged against the truth)</h3>
<table><tr><th>cycle</th><th>served by</th><th>cases</th><th>success</th></tr>
{% for m in measurements %}<tr><td>{{ m.cycle }}</td><td>{{ m.served_by|join(", ") }}</td><td>{{ m.count }}</td>
<td>{{ "%.0f%%"|format(100 * m.success) }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Gate evidence per release record</h2>
<table><tr><th>time</th><th>version</th><th>state</th><th>decided by</th><th>candidate</th><th>incumbent</th>
<th>holdout</th><th>train ex.</th><th>regression</th><th>reason / evidence</th></tr>
{% for d in decisions %}<tr><td>{{ d.time }}</td><td>{{ d.version }}</td><td class="{{ d.state }}">{{ d.state }}</td>
<td>{{ d.decided_by }}</td><td>{{ d.candidate }}</td><td>{{ d.incumbent }}</td><td>{{ d.holdout_count }}</td>
<td>{{ d.train_examples }}</td><td>{% for r in d.regression %}<pre>{{ r }}</pre>{% endfor %}</td>
<td>{{ d.reason }}{% if d.evidence %}<pre>{{ d.evidence }}</pre>{% endif %}</td></tr>{% endfor %}</table>
{% if latencies %}<h2>Loop latency (N-th admitted example to the adapter serving)</h2>
<table><tr><th>version</th>{% for s in stage_names %}<th>{{ s }} (s)</th>{% endfor %}<th>total (s)</th><th>slowest</th></tr>
{% for l in latencies %}<tr><td>{{ l.version }}</td>{% for s in stage_names %}<td>{{ l.stages.get(s, "") }}</td>{% endfor %}
<td>{{ l.total_s }}</td><td>{{ l.slowest }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Training loss</h2>
<img src="{{ slug }}-loss.png" alt="loss curves">
{% if no_curve %}<p>No loss curve recorded for: {{ no_curve|join(", ") }}.</p>{% endif %}
<h2>Data funnel</h2>
<img src="{{ slug }}-funnel.png" alt="data funnel">
<table>{% for k, v in funnel.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
</body></html>
"""

INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>adaptloop report</title>
<style>body{font-family:sans-serif;margin:2em} td,th{border:1px solid #ccc;padding:3px 6px}
table{border-collapse:collapse}</style></head><body>
<h1>adaptloop report</h1><p>Generated {{ generated }}.</p>
<table><tr><th>tenant / task</th><th>verdicts</th><th>first success</th><th>last success (rolling)</th><th>releases</th></tr>
{% for p in pages %}<tr><td><a href="{{ p.slug }}.html">{{ p.pair[0] }} / {{ p.pair[1] }}</a></td><td>{{ p.verdicts }}</td>
<td>{{ p.first }}</td><td>{{ p.last }}</td><td>{{ p.releases }}</td></tr>{% endfor %}</table>
<p>Dead letters that could not be attributed to a tenant: {{ unattributed }}.</p>
</body></html>
"""


def _when(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.timezone.utc).strftime("%H:%M:%S")


def _pct(value: Any) -> str:
    return "" if value is None else f"{value:.0%}"


def write_report(records: Records, out_dir: Path, *, demo: Mapping[str, Any] | None = None,
                 dead_letter_pairs: Sequence[Pair | None] | None = None,
                 latencies: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    """Write index.html plus one page and three PNGs per (tenant, task); return the pages."""
    from jinja2 import Environment

    from adaptloop.report_plots import plot_funnel, plot_losses, plot_success

    env = Environment(autoescape=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    stamps = [ms(r["event_time"]) for r in records.interactions] + [ms(r["created_at"]) for r in records.releases]
    origin = min(stamps) if stamps else 0
    dl_pairs = list(dead_letter_pairs) if dead_letter_pairs is not None else []
    demo_cycles = (demo or {}).get("measurements", [])
    pages, index_rows = [], []
    for pair in pairs(records):
        name = slug(pair)
        points = success_points(records.curated, pair)
        marks = decisions(records.releases, pair)
        measurements = [m for m in demo_cycles if (m["tenant"], m["task"]) == pair]
        curves = loss_curves(records.releases, pair)
        counts = funnel(records, pair, dl_pairs)
        plot_success(out_dir / f"{name}-success.png", pair, points, marks, measurements, origin)
        plot_losses(out_dir / f"{name}-loss.png", pair, curves)
        plot_funnel(out_dir / f"{name}-funnel.png", pair, counts)
        rows = [d | {"time": _when(d["at_ms"]), "candidate": _pct(d["candidate_score"]),
                     "incumbent": f"{d['incumbent'] or ''} {_pct(d['incumbent_score'])}",
                     "evidence": json.dumps(d["evidence"], indent=1) if d["evidence"] else ""} for d in marks]
        pair_latencies = [l for l in latencies if (l.get("tenant"), l.get("task")) == pair]
        stage_names = list(dict.fromkeys(s for l in pair_latencies for s in l["stages"]))
        html = env.from_string(PAGE).render(
            pair=pair, slug=name, generated=generated, by_version=success_by_version(points), measurements=measurements,
            decisions=rows, funnel=counts, no_curve=sorted({d["version"] for d in marks if d["state"] != "REJECTED"} - set(curves)),
            latencies=pair_latencies, stage_names=stage_names)
        page = out_dir / f"{name}.html"
        page.write_text(html)
        pages.append(page)
        rolling = rolling_success(points)
        index_rows.append({"pair": pair, "slug": name, "verdicts": len(points),
                           "first": _pct(rolling[0][1]) if rolling else "", "last": _pct(rolling[-1][1]) if rolling else "",
                           "releases": ", ".join(f"{d['state']}" for d in marks)})
    unattributed = sum(1 for p in dl_pairs if p is None)
    (out_dir / "index.html").write_text(env.from_string(INDEX).render(generated=generated, pages=index_rows,
                                                                     unattributed=unattributed))
    return pages


def build_report(kafka, topics, out_dir: Path, *, demo: Mapping[str, Any] | None = None,
                 latencies: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    """Read the topics over the broker and write the report."""
    records = read_records(kafka, topics)
    decoders = dead_letter_decoders(kafka.schema_registry_url)
    dl_pairs = [attribute_dead_letter(r, decoders) for r in records.dead_letters]
    return write_report(records, out_dir, demo=demo, dead_letter_pairs=dl_pairs, latencies=latencies)


def main(argv: list[str] | None = None) -> int:
    from adaptloop.settings import KafkaSettings, Topics

    parser = argparse.ArgumentParser(prog="adaptloop report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("adaptloop-report"), help="folder for index.html and the PNGs")
    parser.add_argument("--demo", type=Path, help="a demo result JSON (adaptloop demo --json): its measurements are plotted")
    args = parser.parse_args(argv)
    demo = json.loads(args.demo.read_text()) if args.demo else None
    try:
        pages = build_report(KafkaSettings(), Topics(), args.out, demo=demo,
                             latencies=(demo or {}).get("loop_latency", []))
    except AdaptloopError as exc:
        print(f"adaptloop report failed: {exc}", file=sys.stderr)
        return 1
    print(f"report: {args.out / 'index.html'} ({len(pages)} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
