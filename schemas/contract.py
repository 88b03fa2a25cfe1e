"""The contract between stages, beside the ``.avsc`` files it completes: the symbols records carry and
the helpers every producer stamps records with.

    ReleaseState, SERVABLE, WITHDRAWN    an adapter's state (adapter_release's ``ReleaseState``)
    RejectCode, reject_code_of(example)  why curation did not admit an example (curated_example.v4)
    code_version()                       which code built a record ("adaptloop==0.1.0")
    now_ms()                             the clock records carry (milliseconds since the epoch)
    training_request(...)                a TrainingRequest (curation's window, forget's retraining)
    release_decision(newest, state, ...) an AdapterRelease deciding anew about a version (canary, forget)
    SourceRef, dead_letter(...)          where a record was read; a DeadLetter for one that could not be used

Stages decide by these symbols, never by the prose that travels beside them: ``reject_reason`` is
a detail for people, ``reject_code`` what the trainer, curation's metrics and the reports act on.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Mapping

from adaptloop.errors import DeserializationError

__all__ = ["DEAD_LETTER_MAX_BYTES", "DEAD_LETTER_MAX_REASON", "SERVABLE", "VERDICT_CODES", "WITHDRAWN", "RejectCode",
           "ReleaseState", "SourceRef", "code_version", "dead_letter", "now_ms", "reject_code_of", "release_decision",
           "training_request"]


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


@dataclass(frozen=True)
class SourceRef:
    """Where a record was read: topic, partition, offset (the unit of lineage)."""

    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> "SourceRef":
        return cls(str(value["topic"]), int(value["partition"]), int(value["offset"]))


#: A dead letter keeps the original key and value while they, with the key counted twice (dead letters were once
#: produced under it; they are keyed by their source now, and the budget stayed), take at most this many bytes;
#: its reason at most ``DEAD_LETTER_MAX_REASON`` characters. It
#: must fit where the record did not always fit: the Faust producer refuses a request over 1 MB, and a record over
#: ``max_record_bytes`` (1 MB by default) whose dead letter carried it whole ended the worker, and its restart on
#: the same record, for every partition it owned. What is left out is named in the reason, and the record stays
#: in its source topic at ``source_offset``.
DEAD_LETTER_MAX_BYTES = 900_000
DEAD_LETTER_MAX_REASON = 2_000


def dead_letter(ref: SourceRef, key: bytes | None, value: bytes | None, *, stage: str,
                error: BaseException, failed_at: int | None = None,
                max_bytes: int = DEAD_LETTER_MAX_BYTES) -> dict[str, Any]:
    """A DeadLetter record (schemas/avro/dead_letter.v1.avsc): the original bytes (within ``max_bytes``), why, and
    where from."""
    reason = error.reason if isinstance(error, DeserializationError) else str(error)
    if len(reason) > DEAD_LETTER_MAX_REASON:  # a reason may quote the record (a key's repr): its ends say why
        half = DEAD_LETTER_MAX_REASON // 2
        reason = f"{reason[:half]}... ({len(reason) - 2 * half} characters left out) ...{reason[-half:]}"
    key_size, value_size = len(key or b""), len(value or b"")
    left_out = []
    if value is not None and 2 * key_size + value_size > max_bytes:
        value, left_out = None, [f"its value of {value_size} bytes"]
    if key is not None and 2 * key_size > max_bytes:
        key, left_out = None, left_out + [f"its key of {key_size} bytes"]
    if left_out:
        reason += (f" [{' and '.join(left_out)} left out of this dead letter (over {max_bytes} bytes): the record "
                   f"stays at {ref.topic}/{ref.partition}@{ref.offset}]")
    return {
        "source_topic": ref.topic,
        "source_partition": ref.partition,
        "source_offset": ref.offset,
        "key": key,
        "value": value,
        "stage": stage,
        "error_type": type(error).__name__,
        "reason": reason,
        "failed_at": failed_at if failed_at is not None else now_ms(),
    }
