"""Loop latency: from the N-th admitted example (the one that fires a training request) to the
adapter serving traffic at the gateway, by stage, with the slowest stage named.

``latencies()`` reads the timestamps the loop already records (``adaptloop loop-bench``,
``adaptloop demo`` and ``adaptloop tool-bench`` call it after their cycles):

    outcome recorded      max(interaction event_time, outcome event_time) of the N-th example
    curated               curated_at of that example                      -> stage "curation"
    request               training request created_at                     -> stage "request"
    picked up             trainer log "request <id>: ... trigger="        -> stage "trainer queue"
    snapshot              trainer log "request <id>: ... snapshot"        -> stage "snapshot"
    trained               trainer log "request <id>: ray job finished"    -> stage "training"
    released              release created_at (after both evaluations)     -> stage "evaluation"
    loaded                the sidecar's loaded_at at GET /adapters        -> stage "sidecar load"
    routed                when the gateway took the first call it routed there (the interaction's
                          event_time, stamped as it is recorded, less its latency_ms) -> stage "gateway routing"

"gateway routing" ends at the first call the gateway sent to the adapter, so it includes how soon traffic
came: the demo's next calls follow as soon as the gateway's /v1/models lists the version.
The trainer's three inner stages come from its log (the only place they are timed today); when
the log is not readable here (a remote trainer) they are one stage, "trainer". Every figure is a
difference of wall-clock timestamps taken on this machine; on a shared 2-core machine they are
noisy.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Mapping

import httpx

from adaptloop.errors import AdaptloopError, StackError
from adaptloop.ops.report_data import ms
from adaptloop.schemas.contract import SERVABLE

#: Stage -> (from, to) timestamp names, in loop order.
STAGES: dict[str, tuple[str, str]] = {
    "curation": ("outcome_recorded", "curated"),
    "request": ("curated", "request"),
    "trainer queue": ("request", "picked_up"),
    "snapshot": ("picked_up", "snapshot"),
    "training": ("snapshot", "trained"),
    "evaluation": ("trained", "released"),
    "sidecar load": ("released", "loaded"),
    "gateway routing": ("loaded", "routed"),
}
_LOG_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


#: How far a trainer log line may lie outside [request created, release created] and still count (clocks, rounding).
LOG_SLACK_MS = 60_000


def parse_trainer_log(text: str, request_id: str, *, not_before_ms: int | None = None,
                      not_after_ms: int | None = None) -> dict[str, int]:
    """Epoch-ms timestamps of one request's trainer stages from the service log (asctime, local time).

    A request id is a digest of its examples, so a log kept across runs (the demo's home) may name the
    same id for an earlier run: only lines within [``not_before_ms``, ``not_after_ms``] count, the first
    one of each stage.
    """
    short = re.escape(request_id[:12])
    patterns = {"picked_up": rf"request {short}: \S+ trigger=", "snapshot": rf"request {short}: \S+ snapshot ",
                "trained": rf"request {short}: ray job finished"}
    found: dict[str, int] = {}
    for name, pattern in patterns.items():
        for match in re.finditer(_LOG_TIME + r"[^\n]*?" + pattern, text):
            at = int(dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000)
            if (not_before_ms is None or at >= not_before_ms) and (not_after_ms is None or at <= not_after_ms):
                found[name] = at
                break
    return found


def breakdown(stamps: Mapping[str, int | None]) -> dict[str, Any]:
    """Stage durations (s) from timestamps (ms); the trainer's inner stages fold into "trainer" when missing."""
    stages: dict[str, float] = {}
    inner = ("trainer queue", "snapshot", "training", "evaluation")
    have_inner = all(stamps.get(STAGES[s][0]) is not None and stamps.get(STAGES[s][1]) is not None for s in inner)
    for name, (start, end) in STAGES.items():
        if name in inner and not have_inner:
            if name == "trainer queue" and stamps.get("request") is not None and stamps.get("released") is not None:
                stages["trainer"] = round((stamps["released"] - stamps["request"]) / 1000, 2)
            continue
        if stamps.get(start) is not None and stamps.get(end) is not None:
            stages[name] = round((stamps[end] - stamps[start]) / 1000, 2)
    total = sum(stages.values())
    slowest = max(stages, key=stages.get) if stages else None
    return {"stages": stages, "total_s": round(total, 2), "slowest": slowest,
            "share": {k: round(v / total, 3) if total else 0.0 for k, v in stages.items()}}


def release_stamps(release: Mapping[str, Any], request: Mapping[str, Any], curated: Mapping[tuple[int, int], dict],
                   outcomes: Mapping[str, dict], first_served_ms: int | None, loaded_at_ms: int | None,
                   trainer_log: str | None) -> dict[str, int | None]:
    """The timestamps of one release's way through the loop (see the module docstring)."""
    ends = [(r["partition"], r["end_offset"] - 1) for r in request["examples"] if r["end_offset"] > r["start_offset"]]
    fired = [curated[key] for key in ends if key in curated]
    example = max(fired, key=lambda e: ms(e["curated_at"])) if fired else None
    stamps: dict[str, int | None] = {"request": ms(request["created_at"]), "released": ms(release["created_at"]),
                                     "loaded": loaded_at_ms, "routed": first_served_ms}
    if example is not None:
        lineage = example.get("lineage") or {}
        ids = [lineage.get("winning_outcome_id")] + list(lineage.get("outcome_ids") or [])
        outcome_times = [ms(outcomes[i]["event_time"]) for i in ids if i in outcomes]
        stamps["curated"] = ms(example["curated_at"])
        stamps["outcome_recorded"] = max([ms(example["event_time"])] + outcome_times) if example.get("event_time") else None
    if trainer_log:
        stamps.update(parse_trainer_log(trainer_log, request["request_id"],
                                        not_before_ms=stamps["request"] - LOG_SLACK_MS,
                                        not_after_ms=stamps["released"] + LOG_SLACK_MS))
    return stamps


def latencies(kafka, topics, *, sidecar_url: str | None, trainer_log: Path | None) -> list[dict[str, Any]]:
    """Loop latency of every release that was served (RELEASED/PROMOTED) on this stack."""
    from adaptloop.records import read_decoded

    def read(which: str, stem: str) -> list[tuple[int, int, dict]]:
        return [(p.partition, p.offset, p.record)
                for p in read_decoded(kafka, topics.name(which), stem, idle_s=1.0, timeout_s=120)]

    releases = [r for _, _, r in read("releases", "adapter_release")]
    requests = {r["request_id"]: r for _, _, r in read("training_requests", "training_request")}
    curated = {(p, o): r for p, o, r in read("curated", "curated_example")}
    outcomes = {r["outcome_id"]: r for _, _, r in read("outcomes", "outcome")}
    first_served: dict[str, int] = {}
    for _, _, r in read("interactions", "interaction"):
        version = (r.get("adapter") or {}).get("version")
        if version:
            routed = ms(r["event_time"]) - int(r.get("latency_ms") or 0)
            first_served[version] = min(first_served.get(version, 1 << 62), routed)
    loaded: dict[str, dict] = {}
    if sidecar_url:
        try:
            loaded = httpx.get(sidecar_url.rstrip("/") + "/adapters", timeout=5).json().get("loaded", {})
        except (httpx.HTTPError, ValueError) as exc:
            raise StackError(f"the sidecar at {sidecar_url} did not answer /adapters: {exc}") from exc
    log_text = trainer_log.read_text(errors="replace") if trainer_log and trainer_log.exists() else None
    out, seen = [], set()
    for release in releases:
        version = release["version"]
        if release["state"] not in SERVABLE or version in seen:
            continue
        seen.add(version)
        request = requests.get(release["lineage"]["request_id"])
        if request is None:
            continue  # e.g. a release published by hand
        stamps = release_stamps(release, request, curated, outcomes, first_served.get(version),
                                (loaded.get(version) or {}).get("loaded_at"), log_text)
        out.append({"version": version, "tenant": release["tenant"], "task": release["task"],
                    "train_count": request["train_count"], "stamps_ms": stamps} | breakdown(stamps))
    return out
