"""The window per (tenant, task): count curated examples, decide when a training request is due, build it.

    window_update(state, example, ...)    ->  new per-(tenant, task) state, fire or not
    training_request(...)                 ->  a TrainingRequest dict with a deterministic id

Pure and Faust-free, like ``adaptloop.streams.stages``; the window agent (``adaptloop.streams.window_agent``)
keeps the state in a table.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from adaptloop.schemas.contract import code_version as current_code_version, now_ms
from adaptloop.schemas.contract import training_request as training_request_record
from adaptloop.streams.stages import TRAIN


def new_window_state() -> dict[str, Any]:
    """JSON-safe per-(tenant, task) state kept in a Faust table.

    ``newest``: partition -> newest curated offset counted (idempotence under replay); ``since_fire``:
    admitted TRAIN examples since the last request; ``opened_at``: when the first of them was counted
    (wall clock, for the age trigger); ``pending``: a request decided but not yet acknowledged (resent,
    same id, after a crash).
    """
    return {"train_count": 0, "holdout_count": 0, "newest": {}, "since_fire": 0, "opened_at": None,
            "fired": 0, "pending": None}


def window_update(state: Mapping[str, Any] | None, example: Mapping[str, Any], *, partition: int,
                  offset: int, window_size: int, now: int | None = None) -> tuple[dict[str, Any], bool]:
    """Count one curated example; return the new state and whether a training request is due by count.

    Only admitted examples count; the request fires when ``window_size`` admitted TRAIN examples arrived
    since the previous one. A record at or below ``newest`` of its partition (replayed after a crash:
    the table's changelog is ahead of the committed offsets) changes nothing.
    """
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, not {window_size}")
    new = new_window_state() | dict(state or {})
    new["newest"] = dict(new["newest"])
    previous = new["newest"].get(str(partition), -1)
    if offset <= previous:
        return new, False
    new["newest"][str(partition)] = offset
    fire = False
    if example["admitted"]:
        if example["split"] == TRAIN:
            new["train_count"] += 1
            new["since_fire"] += 1
            if new["opened_at"] is None:
                new["opened_at"] = now if now is not None else now_ms()
            fire = new["since_fire"] >= window_size
        else:
            new["holdout_count"] += 1
    return new, fire


def window_due_by_age(state: Mapping[str, Any], *, now: int, max_age_ms: int, min_examples: int) -> bool:
    """The age trigger: at least ``min_examples`` new TRAIN examples, the first of them ``max_age_ms`` ago."""
    opened = state.get("opened_at")
    return (opened is not None and state.get("since_fire", 0) >= max(1, min_examples)
            and now - opened >= max_age_ms)


def window_fired(state: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """The state once ``request`` is decided: a new window opens; the request waits in ``pending`` until acked."""
    return dict(state) | {"since_fire": 0, "opened_at": None, "fired": int(state.get("fired", 0)) + 1,
                          "pending": dict(request)}


def example_ranges(topic: str, state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The cumulative dataset: every curated record of this key so far, [0, newest + 1) per partition."""
    return [{"topic": topic, "partition": int(p), "start_offset": 0, "end_offset": int(o) + 1}
            for p, o in sorted(state["newest"].items(), key=lambda item: int(item[0]))]


def request_id(tenant: str, task: str, ranges: list[Mapping[str, Any]]) -> str:
    """Deterministic: the same (tenant, task, ranges) after a crash and replay gives the same id."""
    canonical = json.dumps({"tenant": tenant, "task": task, "examples": list(ranges)}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def training_request(tenant: str, task: str, state: Mapping[str, Any], *, curated_topic: str,
                     trigger: str | None = None, code_version: str | None = None,
                     created_at: int | None = None, task_digest: str | None = None) -> dict[str, Any]:
    """A TrainingRequest (schemas/avro/training_request.v2.avsc) for the state that just fired; ``task_digest``
    is the task as this worker's catalogue defines it (the trainer checks its own against it)."""
    ranges = example_ranges(curated_topic, state)
    return training_request_record(
        request_id=request_id(tenant, task, ranges), tenant=tenant, task=task,
        trigger=trigger or f"count>={int(state['train_count'])}", examples=ranges,
        train_count=state["train_count"], holdout_count=state["holdout_count"],
        code_version=code_version or current_code_version(), created_at=created_at, task_digest=task_digest)
