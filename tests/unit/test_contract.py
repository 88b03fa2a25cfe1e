"""The contract module: its symbols match the schemas, and stages decide by reject codes, not by their words."""

from __future__ import annotations

import pytest

from adaptloop.demo_tasks import OrderGenerator
from adaptloop.schemas import SerdeContext, bundled_store, serde_for
from adaptloop.schemas.contract import (SERVABLE, VERDICT_CODES, WITHDRAWN, RejectCode, ReleaseState, code_version,
                                        reject_code_of, release_decision, training_request)
from adaptloop.sdk import build_interaction, build_outcome
from adaptloop.streams import dedupe, stages
from adaptloop.streams.stages import SourceRef
from adaptloop.tasks import example_catalogue
from adaptloop.trainers.service import build_dataset
from adaptloop.trainers.snapshot import choose_method

TASK = "order-extract"
SPEC = example_catalogue().get(TASK)
CASE = OrderGenerator(seed=5).case()
HOUR_MS = 3_600_000


def _enum_symbols(stem: str, field: str) -> list[str]:
    schema = bundled_store().latest(stem).raw
    declared = next(f["type"] for f in schema["fields"] if f["name"] == field)
    enum = next(t for t in declared if isinstance(t, dict)) if isinstance(declared, list) else declared
    return enum["symbols"]


def test_the_enums_are_the_schemas_symbols():
    assert [s.value for s in ReleaseState] == _enum_symbols("adapter_release", "state")
    assert [c.value for c in RejectCode] == _enum_symbols("curated_example", "reject_code")
    assert SERVABLE == {"RELEASED", "PROMOTED"} and SERVABLE.isdisjoint(WITHDRAWN)
    assert SERVABLE | WITHDRAWN == {s.value for s in ReleaseState}
    assert VERDICT_CODES <= {c.value for c in RejectCode}


def test_code_version_names_the_installed_package():
    assert code_version().startswith("adaptloop==")


def test_the_code_decides_and_old_records_fall_back_to_their_wording():
    assert reject_code_of({"reject_code": "NEAR_DUPLICATE", "reject_reason": "outcome is not a success"}) == \
        "NEAR_DUPLICATE"
    assert reject_code_of({"reject_code": None, "reject_reason": None}) is None
    legacy = {  # reject_reason as curation worded it before curated_example.v4
        "outcome tenant 'evil' is not the interaction's 'acme'": "FOREIGN_TENANT",
        "correction rejected by order_json@1: not JSON": "CORRECTION_INVALID",
        "outcome says success but order_json@1 rejects the response: no response text": "RESPONSE_INVALID",
        "outcome is not a success and carries no correction": "NOT_A_SUCCESS",
        "outcome o-1 came 25.0 h after the interaction (event time), past the 24 h horizon": "AFTER_HORIZON",
        "exact duplicate of i-1": "EXACT_DUPLICATE",
        "near duplicate of i-2": "NEAR_DUPLICATE",
        "something else entirely": "OTHER",
    }
    for reason, code in legacy.items():
        assert reject_code_of({"reject_reason": reason}) == code, reason


def test_a_release_decision_keeps_the_adapter_and_its_time_and_refuses_an_unknown_state():
    newest = {"version": "v1", "state": "RELEASED", "created_at": 7, "decided_by": "gate", "reason": "passed",
              "evidence_json": "{}"}
    decided = release_decision(newest, ReleaseState.PROMOTED, reason="better", decided_by="canary",
                               evidence={"n": 3, "b": 1})
    assert decided == newest | {"state": "PROMOTED", "reason": "better", "decided_by": "canary",
                                "evidence_json": '{"b": 1, "n": 3}'}
    assert type(decided["state"]) is str  # records hold plain symbols
    with pytest.raises(ValueError):
        release_decision(newest, "PROMOTD", reason="", decided_by="manual", evidence={})


def test_a_training_request_fits_its_schema():
    request = training_request(request_id="r", tenant="acme", task=TASK, trigger="erasure:e",
                               examples=[{"topic": "t", "partition": 0, "start_offset": 0, "end_offset": 3}],
                               train_count=2, holdout_count=1, code_version=code_version(), created_at=5)
    serde = serde_for("training_request")
    ctx = SerdeContext("training.requests")
    assert serde.deserialize(serde.serialize(request, ctx), ctx) == request


# ---------------------------------------------------------------- must show: wording never changes training data

def _curated_topic() -> list[dict]:
    """Curation's output for one interaction per way of (not) being admitted, as the trainer decodes it."""
    def pair(n: int, response: str | None, *, event_time: int = 1_000, tenant: str = "acme", **verdict):
        i = build_interaction(interaction_id=f"i-{n}", tenant="acme", agent="bot", task=TASK, session_id=f"s-{n}",
                              messages=[{"role": "system", "content": SPEC.system_prompt},
                                        {"role": "user", "content": f"{CASE.sentence} ({n})"}],
                              response=response, base_model="m", latency_ms=5.0, event_time=event_time)
        o = build_outcome(f"i-{n}", tenant=tenant, source="VALIDATOR", outcome_id=f"o-{n}",
                          event_time=event_time + 60_000, **verdict)
        return i, o

    def curate(i, o, horizon_ms: int = 24 * HOUR_MS) -> dict:
        return stages.curate(i, [(o, SourceRef("agent.outcomes", 0, int(i["interaction_id"][2:])))],
                             interaction_ref=SourceRef("agent.interactions", 0, int(i["interaction_id"][2:])),
                             spec=SPEC, holdout_percent=0, horizon_ms=horizon_ms, curated_at=1, code_version="c")

    examples = [
        curate(*pair(1, CASE.answer, success=True)),                                  # SUCCESS
        curate(*pair(2, "It's a lamp.", success=False, correction=CASE.answer)),      # CORRECTION (a pair)
        curate(*pair(3, "no idea", success=False)),                                    # NOT_A_SUCCESS
        curate(*pair(4, "not json", success=True)),                                    # RESPONSE_INVALID
        curate(*pair(5, "no idea", success=False, correction='{"bad": 1}')),           # CORRECTION_INVALID
        curate(*pair(6, CASE.answer, success=True, tenant="evil")),                   # FOREIGN_TENANT
        curate(*pair(7, "late", success=False), horizon_ms=1_000),                     # AFTER_HORIZON
    ]
    duplicate = curate(*pair(8, CASE.answer, success=True))
    duplicate |= dedupe.dedupe_decision(duplicate, exact_of=None, near_of=["i-1"])    # NEAR_DUPLICATE
    examples.append(duplicate)
    serde = serde_for("curated_example")
    ctx = SerdeContext("examples.curated")
    return [serde.deserialize(serde.serialize(e, ctx), ctx) for e in examples]


def test_rewording_every_reject_reason_leaves_the_training_data_unchanged(monkeypatch):
    before = _curated_topic()
    monkeypatch.setattr(stages, "REJECT_WORDING", {code: f"the curator declined this one ({len(code)} letters)"
                                                   for code in stages.REJECT_WORDING})
    after = _curated_topic()

    # The words did change, every one of them; the codes did not.
    assert [e["reject_reason"] for e in before if e["reject_reason"]] != [e["reject_reason"] for e in after]
    assert all(e["reject_reason"] is None or e["reject_reason"].startswith("the curator declined") for e in after)
    codes = [e["reject_code"] for e in after]
    assert codes == [e["reject_code"] for e in before] == [
        None, None, "NOT_A_SUCCESS", "RESPONSE_INVALID", "CORRECTION_INVALID", "FOREIGN_TENANT", "AFTER_HORIZON",
        "NEAR_DUPLICATE"]

    old, new = build_dataset(before, "acme", TASK), build_dataset(after, "acme", TASK)
    assert new.train == old.train and new.holdout == old.holdout and new.digest == old.digest
    # Not vacuous: both verdicts on an answer are KTO's undesirable examples, the other rejections no signal.
    assert {r["example_id"]: r["signal"] for r in new.train} == {
        "i-1": "desirable", "i-2": "desirable", "i-3": "undesirable", "i-4": "undesirable"}
    assert choose_method(new.train) == choose_method(old.train)
    assert choose_method(new.train).method == "kto"


@pytest.mark.parametrize("code", sorted(VERDICT_CODES))
def test_a_verdict_code_makes_an_undesirable_example_whatever_its_words(code):
    example = _curated_topic()[2] | {"reject_code": code, "reject_reason": "words nobody parses"}
    assert [r["signal"] for r in build_dataset([example], "acme", TASK).train] == ["undesirable"]
