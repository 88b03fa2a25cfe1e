"""``adaptloop status``: the stack at a glance, live (rich), once, or as JSON.

    adaptloop status               # refreshes every ADAPTLOOP_STATUS_REFRESH_S (5 s) until Ctrl-C
    adaptloop status --once        # one snapshot, printed
    adaptloop status --once --json # the same snapshot as JSON (what the tests read)

What one snapshot holds, and where each part comes from:

* processes: the stack's ``stack.json`` (written by ``adaptloop up``), each pid alive or not;
* topics: message count per topic and partition, counted by reading (Tansu's watermarks lie),
  and per consumer group its committed offsets and lag against those counted ends;
* stages per (tenant, task): interactions, outcomes (tenant from the outcome, task from its
  interaction), curated examples admitted (train/holdout) and rejected by reason (the last
  record per example id wins: curation may re-emit), training requests, releases by state (the
  last record per version wins), erasures per tenant; dead letters by stage and error type;
* routing: the gateway's ``/v1/models`` (alias -> the version it routes to, and any canary
  fields it reports; ``ADAPTLOOP_STATUS_GATEWAY_KEY`` if it wants a key), its ``/stats`` (calls
  per alias and served version: the canary's measured share), the sidecar's ``/adapters``, and the curation worker's
  ``/adaptloop/metrics``: each optional, its absence shown, never fatal;
* the trainer's queue: requests no release answers yet, in the order the trainer serves them, with their wait.

Every part is computed by a pure function from decoded records; ``collect`` only reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import httpx
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException

from adaptloop.errors import AdaptloopError, ConfigError
from adaptloop.kafka import admin, read_topics
from adaptloop.ops.status_view import render
from adaptloop.records import decode_all
from adaptloop.schemas.contract import now_ms, reject_code_of
from adaptloop.settings import ADMIN_KEY_FILE, StatusSettings, admin_key
from adaptloop.tasks import load_catalogue

STATE_FILE = "stack.json"
#: Topic (attribute of Topics) -> record stem, for the topics whose records status decodes.
DECODED = {"interactions": "interaction", "outcomes": "outcome", "curated": "curated_example",
           "training_requests": "training_request", "releases": "adapter_release", "dead_letters": "dead_letter",
           "erasures": "erasure"}


# -- processes -------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie answers kill(0) until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def processes(state_file: Path, alive=pid_alive) -> list[dict[str, Any]]:
    if not state_file.exists():
        return []
    try:
        state = json.loads(state_file.read_text())
    except ValueError as exc:
        return [{"name": f"(unreadable {state_file}: {exc})", "pid": None, "alive": False}]
    return [{"name": name, "pid": pid, "alive": alive(int(pid))} for name, pid in state.items()]


# -- topics and lag --------------------------------------------------------------------------------


def partition_ends(messages: Iterable[Any]) -> dict[int, int]:
    """Per partition, the offset after the last record read (what "end" means when watermarks lie)."""
    ends: dict[int, int] = {}
    for msg in messages:
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)
    return ends


def topic_rows(raw: Mapping[str, list[Any]], partitions: Mapping[str, list[int]]) -> list[dict[str, Any]]:
    rows = []
    for name, messages in raw.items():
        counts = Counter(m.partition() for m in messages)
        rows.append({"topic": name, "exists": name in partitions, "messages": len(messages),
                     "partitions": {str(p): counts.get(p, 0) for p in partitions.get(name, [])}})
    return rows


def group_lag(committed: Mapping[str, Mapping[tuple[str, int], int]],
              ends: Mapping[str, Mapping[int, int]]) -> list[dict[str, Any]]:
    """Per group and topic: committed offsets and lag = counted end - committed (no commit: everything)."""
    rows = []
    for group, offsets in sorted(committed.items()):
        for topic in sorted({t for t, _ in offsets}):
            topic_ends = ends.get(topic, {})
            parts = sorted({p for t, p in offsets if t == topic} | set(topic_ends))
            lag = 0
            for p in parts:
                position = offsets.get((topic, p), -1)
                lag += max(0, topic_ends.get(p, 0) - max(position, 0))
            rows.append({"group": group, "topic": topic, "lag": lag,
                         "committed": {str(p): offsets.get((topic, p), -1) for p in parts}})
    return rows


def committed_offsets(settings: StatusSettings, topic_names: Iterable[str]) -> dict[str, dict[tuple[str, int], int]]:
    """Committed offsets of every group (or the configured ones) on our topics; {} if the broker cannot say."""
    client = admin(settings.kafka)
    groups = list(settings.groups)
    if not groups:
        listed = client.list_consumer_groups(request_timeout=settings.http_timeout_s * 5).result()
        groups = sorted(g.group_id for g in listed.valid)
    ours = set(topic_names)
    out: dict[str, dict[tuple[str, int], int]] = {}
    for group in groups:
        # One group per request: librdkafka's admin API takes exactly one group per call here.
        future = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                    request_timeout=settings.http_timeout_s * 5)[group]
        offsets = {(tp.topic, tp.partition): tp.offset for tp in future.result().topic_partitions
                   if tp.topic in ours}
        if offsets:
            out[group] = offsets
    return out


# -- stages ----------------------------------------------------------------------------------------


def _key(record: Mapping[str, Any]) -> str:
    return f"{record['tenant']}/{record['task']}"


def stage_counts(records: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per "tenant/task": how many records reached each stage (pure; ``records`` by Topics attribute)."""
    stages: dict[str, dict[str, Any]] = {}

    def entry(key: str) -> dict[str, Any]:
        return stages.setdefault(key, {"interactions": 0, "outcomes": 0, "curated_admitted_train": 0,
                                       "curated_admitted_holdout": 0, "curated_rejected": {},
                                       "training_requests": 0, "releases": {}})

    task_of: dict[str, str] = {}
    for r in records.get("interactions", []):
        task_of[r["interaction_id"]] = _key(r)
        entry(_key(r))["interactions"] += 1
    for r in records.get("outcomes", []):
        entry(task_of.get(r["interaction_id"], f"{r['tenant']}/?"))["outcomes"] += 1
    last_example = {r["example_id"]: r for r in records.get("curated", [])}
    for r in last_example.values():
        e = entry(_key(r))
        if r["admitted"]:
            e["curated_admitted_train" if r["split"] == "TRAIN" else "curated_admitted_holdout"] += 1
        else:
            code = reject_code_of(r) or "unknown"
            e["curated_rejected"][code] = e["curated_rejected"].get(code, 0) + 1
    for r in {r["request_id"]: r for r in records.get("training_requests", [])}.values():
        entry(_key(r))["training_requests"] += 1
    for r in {r["version"]: r for r in records.get("releases", [])}.values():
        states = entry(_key(r))["releases"]
        states[r["state"]] = states.get(r["state"], 0) + 1
    return dict(sorted(stages.items()))


def release_rows(releases: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Newest record per version, in order of first appearance."""
    latest: dict[str, Mapping[str, Any]] = {}
    for r in releases:
        latest[r["version"]] = r
    rows = []
    for r in latest.values():
        ev = r["evaluation"]
        rows.append({"version": r["version"], "alias": _key(r), "state": r["state"],
                     "decided_by": r.get("decided_by", "gate"), "candidate": ev["candidate_score"],
                     "incumbent": ev["incumbent"], "incumbent_score": ev["incumbent_score"], "reason": r["reason"]})
    return rows


def trainer_queue(requests: list[Mapping[str, Any]], releases: list[Mapping[str, Any]],
                  now_ms: int) -> list[dict[str, Any]]:
    """Training requests no release answers yet, in the order a trainer starting now would serve them (the first
    may be in training), with how long each has waited: the trainer's fair queue (``trainers.queue``) replayed."""
    from adaptloop.trainers.queue import FairQueue

    answered = {r["lineage"]["request_id"] for r in releases}
    queue = FairQueue()
    for offset, request in enumerate({r["request_id"]: r for r in requests}.values()):
        if request["request_id"] not in answered:
            queue.add(offset, request)
    return queue.waiting(now_ms)


def dead_letter_counts(dead: list[Mapping[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(f"{d['source_topic']} {d['stage']} {d['error_type']}" for d in dead).items()))


def erasure_counts(erasures: list[Mapping[str, Any]]) -> dict[str, int]:
    unique = {e["erasure_id"]: e for e in erasures}
    return dict(sorted(Counter(f"{e['tenant']} {e['scope']}" for e in unique.values()).items()))


# -- HTTP (all optional) ---------------------------------------------------------------------------


def get_json(url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``{"ok": True, "body": ...}`` or ``{"ok": False, "error": ...}``: a service that is down is a fact to show."""
    try:
        response = httpx.get(url, timeout=timeout_s, headers=dict(headers or {}))
    except httpx.HTTPError as exc:
        return {"ok": False, "url": url, "error": f"{type(exc).__name__}: {exc}"}
    if response.status_code != 200:
        return {"ok": False, "url": url, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
    try:
        return {"ok": True, "url": url, "body": response.json()}
    except ValueError:
        return {"ok": False, "url": url, "error": "not JSON: " + response.text[:200]}


def routing_rows(models: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The gateway's /v1/models entries: alias, the version it routes to, any other fields it reports."""
    if not models.get("ok"):
        return []
    body = models["body"]
    entries = body.get("data", body) if isinstance(body, dict) else body
    rows = []
    for m in entries if isinstance(entries, list) else []:
        extra = {k: v for k, v in m.items() if k not in ("id", "object", "created", "owned_by", "adapter")}
        rows.append({"model": m.get("id"), "routes_to": m.get("adapter") or "base", "extra": extra})
    return rows


def traffic_shares(stats: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The gateway's ``/stats`` (calls per alias and served version) as shares: what the canary really gets."""
    if not stats.get("ok") or not isinstance(stats["body"], dict):
        return {}
    shares: dict[str, dict[str, Any]] = {}
    for alias, by_version in sorted((stats["body"].get("aliases") or {}).items()):
        total = sum(v.get("requests", 0) for v in by_version.values())
        shares[alias] = {version: {"requests": v.get("requests", 0), "errors": v.get("errors", 0),
                                   "share": round(v.get("requests", 0) / total, 3) if total else 0.0,
                                   "p95_ms": v.get("p95_ms")}
                         for version, v in sorted(by_version.items())}
    return shares


# -- one snapshot ----------------------------------------------------------------------------------


def collect(settings: StatusSettings) -> dict[str, Any]:
    """One snapshot of everything ``status`` shows (reads topics, asks the broker and the services)."""
    started = time.monotonic()
    names = {which: settings.topics.name(which) for which in DECODED}
    all_topics = list(settings.topics.layout())
    snapshot: dict[str, Any] = {"at": now_ms(), "bootstrap": settings.kafka.bootstrap_servers,
                                "processes": processes(settings.home / STATE_FILE), "problems": []}
    try:
        metadata = admin(settings.kafka).list_topics(timeout=10)
        partitions = {t: sorted(m.partitions) for t, m in metadata.topics.items() if m.error is None}
        raw = read_topics(settings.kafka, all_topics, idle_s=settings.idle_s)
    except (AdaptloopError, KafkaException) as exc:
        snapshot["problems"].append(f"broker: {exc}")
        partitions, raw = {}, {t: [] for t in all_topics}
    snapshot["topics"] = topic_rows(raw, partitions)
    try:
        catalogue = load_catalogue()
        snapshot["tasks"] = {"source": catalogue.source, "tasks": {
            name: {"kind": spec.kind, "version": spec.version, "digest": spec.digest} for name, spec in catalogue.tasks.items()}}
    except ConfigError as exc:
        snapshot["tasks"] = {"source": None, "tasks": {}}
        snapshot["problems"].append(f"task catalogue: {exc}")
    records: dict[str, list[Mapping[str, Any]]] = {}
    snapshot["undecodable"] = {}
    for which, stem in DECODED.items():
        undecodable: list[str] = []
        records[which] = [p.record for p in decode_all(raw.get(names[which], []), stem,
                                                       settings.kafka.schema_registry_url, undecodable)]
        if undecodable:
            # On the event topics these are what curation dead-letters; elsewhere they are a problem.
            snapshot["undecodable"][names[which]] = {"count": len(undecodable), "first": undecodable[0]}
    try:
        committed = committed_offsets(settings, all_topics) if partitions else {}
    except KafkaException as exc:
        snapshot["problems"].append(f"consumer groups: {exc}")
        committed = {}
    snapshot["lag"] = group_lag(committed, {t: partition_ends(m) for t, m in raw.items()})
    snapshot["stages"] = stage_counts(records)
    snapshot["dead_letters"] = dead_letter_counts(records["dead_letters"])
    snapshot["erasures"] = erasure_counts(records["erasures"])
    snapshot["releases"] = release_rows(records["releases"])
    snapshot["trainer_queue"] = trainer_queue(records["training_requests"], records["releases"], snapshot["at"])
    key = settings.gateway_key.get_secret_value() if settings.gateway_key else None
    models = get_json(settings.gateway_url.rstrip("/") + "/v1/models", settings.http_timeout_s,
                      {"authorization": f"Bearer {key}"} if key else None)
    operator = admin_key(settings.gateway_admin_key, settings.gateway_admin_key_file or settings.home / ADMIN_KEY_FILE)
    stats = get_json(settings.gateway_url.rstrip("/") + "/stats", settings.http_timeout_s,
                     {"authorization": f"Bearer {operator}"})
    snapshot["gateway"] = {"ok": models["ok"], "url": models["url"], "error": models.get("error"),
                           "routes": routing_rows(models), "traffic": traffic_shares(stats),
                           "stats_error": stats.get("error")}
    adapters = get_json(settings.sidecar_url.rstrip("/") + "/adapters", settings.http_timeout_s)
    snapshot["sidecar"] = adapters
    snapshot["streams_metrics"] = get_json(settings.streams_url.rstrip("/") + "/adaptloop/metrics",
                                           settings.http_timeout_s)
    snapshot["collect_seconds"] = round(time.monotonic() - started, 2)
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop status", description="Live view of the stack (Ctrl-C ends it).")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    parser.add_argument("--home", type=Path, help="stack home (default: ADAPTLOOP_STATUS_HOME or the local stack's)")
    args = parser.parse_args(argv)
    settings = StatusSettings(**({"home": args.home} if args.home else {}))
    if args.json:
        print(json.dumps(collect(settings), indent=2, default=str))
        return 0
    from rich.console import Console

    console = Console()
    if args.once:
        console.print(render(collect(settings)))
        return 0
    from rich.live import Live

    try:
        with Live(render(collect(settings)), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(settings.refresh_s)
                live.update(render(collect(settings)), refresh=True)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
