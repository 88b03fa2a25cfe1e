"""Curation stages as pure functions: no Faust, no broker, unit-testable in any venv.

    decode (bytes -> record, or a contract violation)  ->  contract.dead_letter(...) when it fails
    score(interaction, outcome, ...)                     ->  a CuratedExample dict
    split(tenant, task, session_id, holdout_percent)     ->  "TRAIN" | "HOLDOUT" (stable per session)

The window and its training request are in ``adaptloop.streams.windows``. The Faust agents in
``adaptloop.streams.app`` are thin wrappers around these.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from adaptloop.chat import assistant_text
from adaptloop.errors import ContractError
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import RejectCode, SourceRef, code_version as current_code_version, now_ms
from adaptloop.sdk import episode_key, outcome_key, partition_key
from adaptloop.tasks import TaskSpec, example_catalogue

#: Stage names as they appear in dead letters.
STAGE_DECODE = "decode"
STAGE_JOIN = "join"
STAGE_DEDUPE = "dedupe"
STAGE_WINDOW = "window"

#: Split and kind symbols of schemas/avro/curated_example.v1.avsc.
TRAIN, HOLDOUT = "TRAIN", "HOLDOUT"
SUCCESS, CORRECTION, FAILURE = "SUCCESS", "CORRECTION", "FAILURE"

#: The words a person reads for each reject code (``reject_reason``); every stage decides by the code.
REJECT_WORDING = {
    RejectCode.FOREIGN_TENANT: "outcome tenant {outcome_tenant!r} is not the interaction's {tenant!r}",
    RejectCode.CORRECTION_INVALID: "correction rejected by {scorer}: {why}",
    RejectCode.RESPONSE_INVALID: "outcome says success but {scorer} rejects the response: {why}",
    RejectCode.NOT_A_SUCCESS: "outcome is not a success and carries no correction",
    RejectCode.AFTER_HORIZON: "outcome {outcome_id} came {delay_h:.1f} h after the interaction (event time), "
                              "past the {horizon_h:g} h horizon",
    RejectCode.EXACT_DUPLICATE: "exact duplicate of {of}",
    RejectCode.NEAR_DUPLICATE: "near duplicate of {of}",
}


def rejection(code: RejectCode, **detail: Any) -> dict[str, str]:
    """The ``reject_code`` and ``reject_reason`` fields of an example curation does not admit."""
    return {"reject_code": code.value, "reject_reason": REJECT_WORDING[code].format(**detail)}


# --------------------------------------------------------------------------------------------
# decode + contract


@dataclass(frozen=True)
class Contract:
    """What a decoded record must satisfy beyond its schema."""

    tasks: Mapping[str, TaskSpec] = field(default_factory=lambda: dict(example_catalogue().tasks))
    max_record_bytes: int = 1_000_000
    #: Tenants allowed on the input topics; empty means any tenant.
    tenants: frozenset[str] = frozenset()
    #: An event time further ahead of the worker's clock than this is impossible (clock skew allowance).
    max_future_ms: int = 5 * 60 * 1000


def _check_common(record: Mapping[str, Any], contract: Contract, now: int) -> None:
    if not record["interaction_id"] and not record.get("episode_id"):
        raise ContractError("empty interaction_id (and no episode_id)")
    if not record["tenant"]:
        raise ContractError("empty tenant")
    if contract.tenants and record["tenant"] not in contract.tenants:
        raise ContractError(f"unknown tenant {record['tenant']!r}")
    if record["event_time"] <= 0:
        raise ContractError(f"event_time {record['event_time']} is not after 1970")
    if record["event_time"] > now + contract.max_future_ms:
        raise ContractError(f"event_time {record['event_time']} is {(record['event_time'] - now) / 1000:.0f}s in the "
                            f"future (more than {contract.max_future_ms / 1000:.0f}s)")


def check_interaction(record: Mapping[str, Any], contract: Contract, now: int | None = None) -> None:
    """Raise ``ContractError`` when an Interaction is impossible or unusable."""
    _check_common(record, contract, now if now is not None else now_ms())
    if record["task"] not in contract.tasks:
        raise ContractError(f"unknown task {record['task']!r}; known: {sorted(contract.tasks)}")
    if not math.isfinite(record["latency_ms"]):
        raise ContractError(f"latency_ms {record['latency_ms']} is not a finite number")
    if record["latency_ms"] < 0:
        raise ContractError(f"negative latency_ms {record['latency_ms']}")
    if record["prompt_tokens"] < 0 or record["completion_tokens"] < 0:
        raise ContractError(f"negative token count ({record['prompt_tokens']}, {record['completion_tokens']})")
    if not record["request_messages"]:
        raise ContractError("no request messages")
    if record.get("episode_id") and partition_key(record["interaction_id"]) != record["interaction_id"] and \
            partition_key(record["interaction_id"]) != episode_key(record["tenant"], record["episode_id"]):
        raise ContractError(f"interaction_id {record['interaction_id']!r} names another episode than {record['episode_id']!r}")


def check_outcome(record: Mapping[str, Any], contract: Contract, now: int | None = None) -> None:
    """Raise ``ContractError`` when an Outcome is impossible or unusable."""
    _check_common(record, contract, now if now is not None else now_ms())
    if not record["outcome_id"]:
        raise ContractError("empty outcome_id")
    if record["score"] is not None and not math.isfinite(record["score"]):
        raise ContractError(f"score {record['score']} is not a finite number")
    if record["success"] is None and record["score"] is None and record["correction"] is None \
            and not record.get("correction_tool_calls"):
        raise ContractError("outcome carries no verdict: no success, score or correction")
    if record["interaction_id"] and record.get("episode_id"):
        raise ContractError("an outcome judges one call (interaction_id) or one episode (episode_id), not both")


_CHECKS = {"interaction": check_interaction, "outcome": check_outcome}


def _plain(value: Any) -> Any:
    """fastavro's logical types back to wire values (datetimes -> epoch millis), so records are JSON-safe."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Decoder:
    """``decoder(key, value, ref) -> record``: size limit, Avro decode, key and contract checks.

    Raises ``DeserializationError`` (not a record of ``stem``) or ``ContractError`` (a record that
    breaks the contract); the caller turns either into a dead letter with ``dead_letter``.
    """

    def __init__(self, stem: str, *, registry_url: str | None = None, contract: Contract | None = None) -> None:
        if stem not in _CHECKS:
            raise ValueError(f"no contract for {stem!r}; known: {sorted(_CHECKS)}")
        self.stem = stem
        self.contract = contract or Contract()
        self._deserialize = serde_for(stem, registry_url).deserialize
        self._check = _CHECKS[stem]

    def __call__(self, key: bytes | None, value: bytes | None, ref: SourceRef) -> dict[str, Any]:
        if value is not None and len(value) > self.contract.max_record_bytes:
            raise ContractError(f"record of {len(value)} bytes exceeds max_record_bytes={self.contract.max_record_bytes}")
        record = _plain(self._deserialize(value, SerdeContext(ref.topic, ref.partition, ref.offset)))
        self._check(record, self.contract)
        # An episode's calls and outcomes meet on one partition only if each is keyed by its episode.
        try:
            text_key = key.decode("utf-8") if key is not None else None
        except UnicodeDecodeError:
            raise ContractError(f"key {key!r} is not UTF-8") from None
        expected = outcome_key(record) if self.stem == "outcome" else partition_key(record["interaction_id"])
        if text_key != expected:
            raise ContractError(f"key {key!r} is not {expected!r}, the key of what the record is about")
        return record


# --------------------------------------------------------------------------------------------
# join + score + split


def split(tenant: str, task: str, session_id: str, holdout_percent: int) -> str:
    """TRAIN or HOLDOUT, stable per session: all turns of one session land on the same side."""
    bucket = int(hashlib.sha256(f"{tenant}/{task}/{session_id}".encode()).hexdigest(), 16) % 100
    return HOLDOUT if bucket < holdout_percent else TRAIN


def score(interaction: Mapping[str, Any], outcome: Mapping[str, Any], *, interaction_ref: SourceRef,
          outcome_ref: SourceRef, spec: TaskSpec, holdout_percent: int,
          code_version: str | None = None, curated_at: int | None = None) -> dict[str, Any]:
    """Join one interaction with its outcome into a CuratedExample (schemas/avro/curated_example.v4.avsc).

    SUCCESS     the outcome says success and the task's validator accepts the response;
    CORRECTION  the outcome carries a correction the validator accepts (it becomes the completion,
                the original response becomes ``rejected``);
    FAILURE     anything else: kept for the record, ``admitted=False`` with the reason.

    A turn that calls tools is judged as the model wrote it (``adaptloop.chat.assistant_text``: its text and
    its ``<tool_call>`` blocks), and so is a correction that names the tool calls it should have made. The
    prompt keeps the whole history the turn was asked with (earlier turns' tool calls, tools' results) and
    the tool definitions, so that training renders what serving rendered.
    """
    response, response_calls = interaction["response"], list(interaction.get("tool_calls") or [])
    correction, correction_calls = outcome["correction"], list(outcome.get("correction_tool_calls") or [])
    kind, completion, calls, rejected, rejected_calls = FAILURE, response or "", response_calls, None, []
    refused: dict[str, str | None] = {"reject_code": None, "reject_reason": None}
    value: float = outcome["score"] if outcome["score"] is not None else 0.0
    if outcome["tenant"] != interaction["tenant"]:
        refused = rejection(RejectCode.FOREIGN_TENANT, outcome_tenant=outcome["tenant"], tenant=interaction["tenant"])
    else:
        answered = response is not None or bool(response_calls)
        response_verdict = spec.judge(assistant_text(response, response_calls)) if answered else None
        if outcome["success"] is True and response_verdict is not None and response_verdict.ok:
            kind, completion = SUCCESS, response or ""
            value = outcome["score"] if outcome["score"] is not None else response_verdict.score
        elif correction is not None or correction_calls:
            verdict = spec.judge(assistant_text(correction, correction_calls))
            if verdict.ok:
                kind, value = CORRECTION, verdict.score
                completion, calls, rejected, rejected_calls = correction or "", correction_calls, response, response_calls
            else:
                refused = rejection(RejectCode.CORRECTION_INVALID, scorer=spec.scorer, why=verdict.reason)
        elif outcome["success"] is True:
            why = "no response text" if response_verdict is None else response_verdict.reason
            refused = rejection(RejectCode.RESPONSE_INVALID, scorer=spec.scorer, why=why)
        else:
            refused = rejection(RejectCode.NOT_A_SUCCESS)
    return {
        "example_id": interaction["interaction_id"],
        "tenant": interaction["tenant"],
        "task": interaction["task"],
        "session_id": interaction["session_id"],
        "split": split(interaction["tenant"], interaction["task"], interaction["session_id"], holdout_percent),
        "kind": kind,
        "admitted": kind != FAILURE,
        **refused,
        "episode_id": interaction.get("episode_id") or "",
        "turn": int(interaction.get("turn") or 0),
        "scope": "CALL",
        "prompt_messages": [example_message(m) for m in interaction["request_messages"]],
        "tools_json": interaction.get("tools_json"),
        "completion": completion,
        "completion_tool_calls": [_call(c) for c in calls],
        "rejected": rejected,
        "rejected_tool_calls": [_call(c) for c in rejected_calls],
        "score": float(value),
        "scorer": spec.scorer,
        "curated_at": curated_at if curated_at is not None else now_ms(),
        "served_by": (interaction.get("adapter") or {}).get("version"),
        "event_time": int(interaction["event_time"]),
        "outcome_source": outcome["source"],
        "lineage": {
            "interaction": interaction_ref.as_dict(),
            "outcomes": [outcome_ref.as_dict()],
            "outcome_ids": [outcome["outcome_id"]],
            "code_version": code_version or current_code_version(),
            "winning_outcome_id": outcome["outcome_id"],
        },
    }


def _call(call: Mapping[str, Any]) -> dict[str, str]:
    return {"id": call["id"], "name": call["name"], "arguments": call["arguments"]}


def example_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A request message as a curated example keeps it (the contract's shape, v1 records included)."""
    return {"role": message["role"], "content": message["content"],
            "tool_calls": [_call(c) for c in message.get("tool_calls") or ()],
            "tool_call_id": message.get("tool_call_id"), "name": message.get("name")}


#: Outcome precedence, strongest first: a human's correction, a human's verdict, a validator, a heuristic,
#: a business signal (late, indirect, the weakest evidence about *this* answer).
PRECEDENCE = ("HUMAN_CORRECTION", "HUMAN", "VALIDATOR", "HEURISTIC", "BUSINESS")


def outcome_rank(outcome: Mapping[str, Any]) -> int:
    """Lower is stronger; see ``PRECEDENCE``."""
    source = outcome["source"]
    if source == "HUMAN" and outcome.get("correction") is not None:
        return 0
    return PRECEDENCE.index(source) if source in PRECEDENCE else len(PRECEDENCE)


def is_final(outcome: Mapping[str, Any]) -> bool:
    """Nothing can outrank it: the example may be curated at once, without waiting for the grace period."""
    return outcome_rank(outcome) == 0


def after_horizon(interaction: Mapping[str, Any], outcome: Mapping[str, Any], horizon_ms: int) -> bool:
    """An outcome whose event time is more than ``horizon_ms`` after its interaction's (event time, not arrival)."""
    return outcome["event_time"] - interaction["event_time"] > horizon_ms


def resolve(interaction: Mapping[str, Any], outcomes: list[tuple[Mapping[str, Any], SourceRef]],
            horizon_ms: int) -> tuple[list[tuple[Mapping[str, Any], SourceRef]], list[tuple[Mapping[str, Any], SourceRef]]]:
    """(eligible outcomes strongest first, outcomes after the horizon). Ties: earlier event time, then id."""
    def order(item: tuple[Mapping[str, Any], SourceRef]) -> tuple:
        return (outcome_rank(item[0]), item[0]["event_time"], item[0]["outcome_id"])

    eligible = sorted((o for o in outcomes if not after_horizon(interaction, o[0], horizon_ms)), key=order)
    late = sorted((o for o in outcomes if after_horizon(interaction, o[0], horizon_ms)), key=order)
    return eligible, late


def curate(interaction: Mapping[str, Any], outcomes: list[tuple[Mapping[str, Any], SourceRef]], *,
           interaction_ref: SourceRef, spec: TaskSpec, holdout_percent: int, horizon_ms: int,
           redactions: Mapping[str, int] | None = None, subjects: Iterable[str] = (),
           code_version: str | None = None, curated_at: int | None = None) -> dict[str, Any]:
    """One interaction with every outcome it got: the strongest eligible outcome decides (``score``);
    the others stay in the lineage after it (``outcome_ids``/``outcomes``, winner first, late ones last).

    If every outcome came after the horizon the example is a FAILURE, not admitted, with the reason.
    """
    if not outcomes:
        raise ValueError("curate needs at least one outcome")
    eligible, late = resolve(interaction, outcomes, horizon_ms)
    winner, winner_ref = (eligible or late)[0]
    example = score(interaction, winner, interaction_ref=interaction_ref, outcome_ref=winner_ref, spec=spec,
                    holdout_percent=holdout_percent, code_version=code_version, curated_at=curated_at)
    ordered = eligible + late
    example["lineage"]["outcomes"] = [ref.as_dict() for _, ref in ordered]
    example["lineage"]["outcome_ids"] = [o["outcome_id"] for o, _ in ordered]
    if not eligible:
        delay_h = (winner["event_time"] - interaction["event_time"]) / 3_600_000
        example.update(kind=FAILURE, admitted=False, completion=interaction["response"] or "", rejected=None,
                       **rejection(RejectCode.AFTER_HORIZON, outcome_id=winner["outcome_id"], delay_h=delay_h,
                                   horizon_h=horizon_ms / 3_600_000))
    example["redactions"] = [{"rule": rule, "count": int(n)} for rule, n in sorted((redactions or {}).items())]
    example["subjects"] = sorted(set(subjects))
    return example


def curated_key(tenant: str, task: str) -> str:
    """The curated topic's key: all examples of one (tenant, task) share a partition."""
    return f"{tenant}/{task}"

