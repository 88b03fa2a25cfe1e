"""How ``adaptloop status`` shows one snapshot (``adaptloop.ops.status.collect``): rich tables and lines."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping


def render(snapshot: Mapping[str, Any]):
    """A rich renderable of one snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    at = time.strftime("%H:%M:%S", time.gmtime(snapshot["at"] / 1000))
    parts: list[Any] = [Text(f"adaptloop status  {at}Z  broker {snapshot['bootstrap']}  "
                             f"(collected in {snapshot['collect_seconds']}s)", style="bold")]

    procs = Table(title="processes", title_justify="left")
    for column in ("name", "pid", "state"):
        procs.add_column(column)
    for p in snapshot["processes"]:
        procs.add_row(p["name"], str(p["pid"]), Text("alive", "green") if p["alive"] else Text("DEAD", "red"))
    if not snapshot["processes"]:
        procs.add_row("(no stack.json: no local stack started by `adaptloop up`)", "", "")
    parts.append(procs)

    topics = Table(title="topics (counted by reading)", title_justify="left")
    for column in ("topic", "messages", "per partition", "group lag"):
        topics.add_column(column)
    lag_by_topic: dict[str, list[str]] = {}
    for row in snapshot["lag"]:
        lag_by_topic.setdefault(row["topic"], []).append(f"{row['group']}: {row['lag']}")
    for t in snapshot["topics"]:
        topics.add_row(t["topic"], str(t["messages"]) if t["exists"] else "(missing)",
                       " ".join(f"{p}:{n}" for p, n in t["partitions"].items()),
                       ", ".join(lag_by_topic.get(t["topic"], [])))
    parts.append(topics)

    stages = Table(title="per tenant/task, by stage", title_justify="left")
    stages.add_column("tenant/task", no_wrap=True)
    for column in ("inter-\nactions", "out-\ncomes", "admitted\ntrain/hold", "rejected\nby reason",
                   "training\nrequests", "releases\nby state"):
        stages.add_column(column)
    for key, s in snapshot["stages"].items():
        stages.add_row(key, str(s["interactions"]), str(s["outcomes"]),
                       f"{s['curated_admitted_train']}/{s['curated_admitted_holdout']}",
                       " ".join(f"{r}:{n}" for r, n in s["curated_rejected"].items()) or "0",
                       str(s["training_requests"]), " ".join(f"{st}:{n}" for st, n in s["releases"].items()) or "0")
    parts.append(stages)
    if snapshot["dead_letters"] or snapshot["erasures"]:
        parts.append(Text("dead letters: " + (", ".join(f"{k} x{n}" for k, n in snapshot["dead_letters"].items())
                                              or "none")
                          + "   erasures: " + (", ".join(f"{k} x{n}" for k, n in snapshot["erasures"].items())
                                               or "none")))

    if snapshot.get("trainer_queue"):
        parts.append(Text("trainer queue (in serving order; the first may be training): " + ", ".join(
            f"{q['tenant']}/{q['task']} {q['request_id'][:8]} waited {q['waited_s']:.0f}s"
            for q in snapshot["trainer_queue"])))

    releases = Table(title="releases (newest record per version)", title_justify="left")
    for column in ("version", "state", "by", "candidate vs incumbent"):
        releases.add_column(column)
    for r in snapshot["releases"]:
        style = {"PROMOTED": "green", "RELEASED": "cyan", "REJECTED": "yellow"}.get(r["state"], "red")
        releases.add_row(r["version"], Text(r["state"], style), r["decided_by"],
                         f"{r['candidate']:.3f} vs {r['incumbent']} {r['incumbent_score']:.3f}")
    parts.append(releases)

    gateway = snapshot["gateway"]
    routing = Table(title=f"gateway routing ({gateway['url']})", title_justify="left")
    for column in ("model / alias", "routes to", "canary / other", "traffic share (gateway /stats)"):
        routing.add_column(column)
    traffic = dict(gateway.get("traffic", {}))
    for r in gateway["routes"]:
        shares = traffic.pop(str(r["model"]), {})
        routing.add_row(str(r["model"]), r["routes_to"], json.dumps(r["extra"]) if r["extra"] else "",
                        " ".join(f"{v}:{s['share']:.0%} ({s['requests']})" for v, s in shares.items()))
    for alias, shares in traffic.items():
        routing.add_row(alias, "", "", " ".join(f"{v}:{s['share']:.0%} ({s['requests']})" for v, s in shares.items()))
    if not gateway["ok"]:
        routing.add_row("(gateway not answering)", gateway["error"] or "", "")
    parts.append(routing)

    sidecar, metrics = snapshot["sidecar"], snapshot["streams_metrics"]
    parts.append(Text("sidecar: " + (json.dumps(sidecar["body"])[:300] if sidecar["ok"] else f"not answering ({sidecar['error'][:80]})")))
    parts.append(Text("curation metrics: " + (json.dumps(metrics["body"])[:300] if metrics["ok"]
                                              else f"not answering ({metrics['error'][:80]})")))
    for topic, bad in snapshot.get("undecodable", {}).items():
        parts.append(Text(f"undecodable records on {topic}: {bad['count']} (first: {bad['first'][:120]})",
                          style="yellow"))
    for problem in snapshot["problems"]:
        parts.append(Text(f"problem: {problem}", style="red"))
    return Group(*parts)
