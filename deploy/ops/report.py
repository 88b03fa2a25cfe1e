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

``report_data`` reads and shapes the records; this module renders the pages, ``report_plots`` draws
with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from adaptloop.errors import AdaptloopError
from adaptloop.ops.report_data import (Pair, Records, attribute_dead_letter, dead_letter_decoders, decisions, funnel,
                                       loss_curves, ms, pairs, read_records, rolling_success, slug, success_by_version,
                                       success_points)


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

    from adaptloop.ops.report_plots import plot_funnel, plot_losses, plot_success

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
