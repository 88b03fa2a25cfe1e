"""The contract between stages, beside the ``.avsc`` files it completes: the symbols records carry and
the helpers every producer stamps records with.

    ReleaseState, SERVABLE, WITHDRAWN    an adapter's state (adapter_release's ``ReleaseState``)
    RejectCode, reject_code_of(example)  why curation did not admit an example (curated_example.v4)
    code_version()                       which code built a record ("adaptloop==0.1.0")
    now_ms()                             the clock records carry (milliseconds since the epoch)
    training_request(...)                a TrainingRequest (curation's window, forget's retraining)
    release_decision(newest, state, ...) an AdapterRelease deciding anew about a version (canary, forget)

Stages decide by these symbols, never by the prose that travels beside them: ``reject_reason`` is
a detail for people, ``reject_code`` what the trainer, curation's metrics and the reports act on.
"""

from __future__ import annotations

import functools
import json
import time
from enum import StrEnum
from typing import Any, Mapping

__all__ = ["SERVABLE", "VERDICT_CODES", "WITHDRAWN", "RejectCode", "ReleaseState", "code_version", "now_ms",
           "reject_code_of", "release_decision", "training_request"]


class ReleaseState(StrEnum):
    """The symbols of adapter_release's ``ReleaseState`` enum."""

    RELEASED = "RELEASED"
    REJECTED = "REJECTED"
    PROMOTED = "PROMOTED"
    ROLLED_BACK = "ROLLED_BACK"
    RETIRED = "RETIRED"


#: States in which an adapter may serve traffic (or is about to, as a canary); plain strings, as records hold them.
SERVABLE = frozenset({ReleaseState.RELEASED.value, ReleaseState.PROMOTED.value})
#: States that take a loaded adapter out of service.
WITHDRAWN = frozenset(s.value for s in ReleaseState) - SERVABLE


class RejectCode(StrEnum):
    """The symbols of curated_example's ``RejectCode`` enum: why an example was not admitted."""

    #: The outcome came from another tenant than the interaction.
    FOREIGN_TENANT = "FOREIGN_TENANT"
    #: The outcome's correction fails the task's validator.
    CORRECTION_INVALID = "CORRECTION_INVALID"
    #: The outcome says success but the task's validator rejects the response.
    RESPONSE_INVALID = "RESPONSE_INVALID"
    #: The outcome is not a success and carries no correction.
    NOT_A_SUCCESS = "NOT_A_SUCCESS"
    #: Every outcome came after the task's horizon.
    AFTER_HORIZON = "AFTER_HORIZON"
    EXACT_DUPLICATE = "EXACT_DUPLICATE"
    NEAR_DUPLICATE = "NEAR_DUPLICATE"
    #: A code this reader does not know (a newer writer's); also the Avro enum's default.
    OTHER = "OTHER"


#: Codes that are a verdict on the answer itself: such a FAILURE is an "undesirable" example for KTO.
VERDICT_CODES = frozenset({RejectCode.NOT_A_SUCCESS.value, RejectCode.RESPONSE_INVALID.value})

#: How curation worded each reason before curated_example.v4 carried a code: prefixes of ``reject_reason``
#: (and a fragment for the horizon), read only for records written without a code.
_LEGACY_PREFIXES = (
    ("outcome tenant ", RejectCode.FOREIGN_TENANT),
    ("correction rejected by ", RejectCode.CORRECTION_INVALID),
    ("outcome says success but ", RejectCode.RESPONSE_INVALID),
    ("outcome is not a success", RejectCode.NOT_A_SUCCESS),
    ("verdict:", RejectCode.NOT_A_SUCCESS),  # the trainer also took this prefix as a verdict
    ("exact duplicate of ", RejectCode.EXACT_DUPLICATE),
    ("near duplicate of ", RejectCode.NEAR_DUPLICATE),
)


def reject_code_of(example: Mapping[str, Any]) -> str | None:
    """The reject code of a CuratedExample: its ``reject_code``, or for a record written before
    curated_example.v4 the code its ``reject_reason`` wording stood for (None: admitted, no reason)."""
    if example.get("reject_code"):
        return str(example["reject_code"])
    reason = example.get("reject_reason")
    if not reason:
        return None
    for prefix, code in _LEGACY_PREFIXES:
        if reason.startswith(prefix):
            return code.value
    if reason.startswith("outcome ") and " past the " in reason:
        return RejectCode.AFTER_HORIZON.value
    return RejectCode.OTHER.value


@functools.cache
def code_version() -> str:
    """Which code built a record, as every record's lineage names it: ``adaptloop==<version>``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"adaptloop=={version('adaptloop')}"
    except PackageNotFoundError:
        return "adaptloop (not installed)"


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch: the time unit of every record's ``*_at``/``event_time``."""
    return int(time.time() * 1000)


def training_request(*, request_id: str, tenant: str, task: str, trigger: str, examples: list[Mapping[str, Any]],
                     train_count: int, holdout_count: int, code_version: str, created_at: int | None = None,
                     task_digest: str | None = None) -> dict[str, Any]:
    """A TrainingRequest (schemas/avro/training_request.v2.avsc): train on these curated-topic ranges."""
    return {
        "request_id": request_id,
        "tenant": tenant,
        "task": task,
        "created_at": created_at if created_at is not None else now_ms(),
        "trigger": trigger,
        "examples": [dict(r) for r in examples],
        "train_count": int(train_count),
        "holdout_count": int(holdout_count),
        "code_version": code_version,
        "task_digest": task_digest,
    }


def release_decision(newest: Mapping[str, Any], state: ReleaseState | str, *, reason: str, decided_by: str,
                     evidence: Mapping[str, Any]) -> dict[str, Any]:
    """A new AdapterRelease for ``newest``'s version: everything as it was, plus this decision.

    ``created_at`` stays the adapter's: serving orders servable versions by it, and a decision must not
    make an older adapter look newer; the decision's own time belongs in the evidence.
    """
    return dict(newest) | {"state": ReleaseState(state).value, "reason": reason, "decided_by": decided_by,
                           "evidence_json": json.dumps(evidence, sort_keys=True, default=str)}
