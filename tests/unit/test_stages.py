"""The curation stages without Faust or a broker: decode/contract, scoring, split, window."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from adaptloop.errors import ContractError, DeserializationError
from adaptloop.schemas import SerdeContext, contract, serde_for
from adaptloop.schemas.contract import code_version
from adaptloop.sdk import build_interaction, build_outcome, episode_key
from adaptloop.streams import stages, windows
from adaptloop.streams.stages import Contract, Decoder, SourceRef
from adaptloop.demo_tasks import OrderGenerator
from adaptloop.tasks import example_catalogue

TASK = "order-extract"
SPEC = example_catalogue().get(TASK)
CASE = OrderGenerator(seed=3).case()
IREF = SourceRef("agent.interactions", 2, 41)
OREF = SourceRef("agent.outcomes", 2, 17)


def interaction(**overrides):
    fields = dict(interaction_id="i-1", tenant="acme", agent="bot", task=TASK, session_id="s-1",
                  messages=[{"role": "system", "content": SPEC.system_prompt}, {"role": "user", "content": CASE.sentence}],
                  response=CASE.answer, base_model="m", latency_ms=5.0)
    return build_interaction(**(fields | overrides))


def outcome(**overrides):
    fields = dict(tenant="acme", source="VALIDATOR")
    return build_outcome(overrides.pop("interaction_id", "i-1"), **(fields | overrides))


def encode(stem, record):
    return serde_for(stem).serialize(record, SerdeContext("t"))


def scored(i, o, holdout_percent=0):
    return stages.score(i, o, interaction_ref=IREF, outcome_ref=OREF, spec=SPEC, holdout_percent=holdout_percent,
                        curated_at=1)


# ---------------------------------------------------------------- decode + contract

def test_decoder_returns_a_json_safe_record():
    record = Decoder("interaction")(b"i-1", encode("interaction", interaction(event_time=1_700_000_000_123)), IREF)
    assert record["event_time"] == 1_700_000_000_123  # an int again, not fastavro's datetime
    json.dumps(record)


@pytest.mark.parametrize("record, reason", [
    (interaction(task="nope"), "unknown task 'nope'"),
    (interaction(latency_ms=-1.0), "negative latency_ms"),
    (interaction(prompt_tokens=-3), "negative token count"),
    (interaction(messages=[]), "no request messages"),
    (interaction(tenant=""), "empty tenant"),
])
def test_interaction_contract_violations(record, reason):
    with pytest.raises(ContractError, match=reason):
        Decoder("interaction")(b"i-1", encode("interaction", record), IREF)


def test_outcome_without_a_verdict_is_a_contract_violation():
    with pytest.raises(ContractError, match="no verdict"):
        Decoder("outcome")(b"i-1", encode("outcome", outcome()), OREF)


def test_key_must_be_the_key_of_what_the_record_is_about():
    value = encode("interaction", interaction())
    with pytest.raises(ContractError, match="is not 'i-1'"):
        Decoder("interaction")(b"other", value, IREF)
    with pytest.raises(ContractError, match="is not 'i-1'"):
        Decoder("interaction")(None, value, IREF)
    # A call of a named episode is keyed by its episode, and so is an outcome on the whole episode.
    key = episode_key("acme", "run-7")
    in_episode = interaction() | {"interaction_id": f"{key}.{'0' * 32}", "episode_id": "run-7"}
    assert Decoder("interaction")(key.encode(), encode("interaction", in_episode), IREF)["episode_id"] == "run-7"
    with pytest.raises(ContractError, match="names another episode"):
        Decoder("interaction")(key.encode(), encode("interaction", in_episode | {"episode_id": "run-8"}), IREF)
    on_episode = outcome(success=True) | {"interaction_id": "", "episode_id": "run-7"}
    assert Decoder("outcome")(key.encode(), encode("outcome", on_episode), OREF)["episode_id"] == "run-7"
    with pytest.raises(ContractError, match="not both"):
        Decoder("outcome")(key.encode(), encode("outcome", on_episode | {"interaction_id": "i-1"}), OREF)


def test_oversized_record_is_refused_before_decoding():
    value = encode("interaction", interaction())
    with pytest.raises(ContractError, match="exceeds max_record_bytes=10"):
        Decoder("interaction", contract=Contract(max_record_bytes=10))(b"i-1", value, IREF)


@pytest.mark.parametrize("value, reason", [
    (b"plain text", "not Avro single-object encoding"),
    (None, "tombstone"),
    (b"\xc3\x01" + b"\x00" * 8 + b"body", "unknown schema fingerprint"),
])
def test_undecodable_bytes(value, reason):
    with pytest.raises(DeserializationError, match=reason) as info:
        Decoder("interaction")(b"k", value, IREF)
    assert (info.value.topic, info.value.partition, info.value.offset) == (IREF.topic, IREF.partition, IREF.offset)


def test_wrong_record_type_and_truncation():
    value = encode("interaction", interaction())
    with pytest.raises(DeserializationError, match="wrong record type"):
        Decoder("outcome")(b"i-1", value, OREF)
    with pytest.raises(DeserializationError, match="corrupt"):
        Decoder("interaction")(b"i-1", value[:20], IREF)


def test_dead_letter_keeps_bytes_reason_and_source_and_fits_its_schema():
    value = b"garbage"
    with pytest.raises(DeserializationError) as info:
        Decoder("interaction")(b"k", value, IREF)
    letter = contract.dead_letter(IREF, b"k", value, stage=stages.STAGE_DECODE, error=info.value, failed_at=5)
    assert letter == {
        "source_topic": IREF.topic, "source_partition": 2, "source_offset": 41, "key": b"k", "value": value,
        "stage": "decode", "error_type": "DeserializationError",
        "reason": "not Avro single-object encoding (bad magic or truncated header)", "failed_at": 5,
    }
    round_trip = serde_for("dead_letter").deserialize(encode("dead_letter", letter))
    assert round_trip["value"] == value and round_trip["reason"] == letter["reason"]


def test_contract_dead_letter_reason():
    with pytest.raises(ContractError) as info:
        Decoder("interaction")(b"i-1", encode("interaction", interaction(latency_ms=-2.0)), IREF)
    letter = contract.dead_letter(IREF, b"i-1", b"x", stage="decode", error=info.value)
    assert letter["error_type"] == "ContractError" and "negative latency_ms -2.0" in letter["reason"]


# ---------------------------------------------------------------- score

def test_success_when_the_outcome_says_so_and_the_validator_accepts():
    example = scored(interaction(), outcome(success=True))
    assert (example["kind"], example["admitted"], example["reject_reason"]) == ("SUCCESS", True, None)
    assert example["completion"] == CASE.answer and example["rejected"] is None
    assert example["prompt_messages"][1] == {"role": "user", "content": CASE.sentence, "tool_calls": [], "tool_call_id": None,
                                             "name": None}
    assert example["scorer"] == SPEC.scorer and example["score"] == 1.0
    assert example["lineage"] == {"interaction": IREF.as_dict(), "outcomes": [OREF.as_dict()],
                                  "outcome_ids": [example["lineage"]["outcome_ids"][0]],
                                  "code_version": code_version(),
                                  "winning_outcome_id": example["lineage"]["outcome_ids"][0]}
    assert example["served_by"] is None and example["outcome_source"] == "VALIDATOR"
    assert example["event_time"] > 0
    encode("curated_example", example)  # fits the contract


def test_correction_replaces_a_bad_response():
    example = scored(interaction(response="It's a lamp."), outcome(success=False, correction=CASE.answer))
    assert (example["kind"], example["admitted"]) == ("CORRECTION", True)
    assert example["completion"] == CASE.answer and example["rejected"] == "It's a lamp."
    encode("curated_example", example)


def test_correction_wins_when_success_is_claimed_for_an_invalid_response():
    example = scored(interaction(response="not json"), outcome(success=True, correction=CASE.answer))
    assert example["kind"] == "CORRECTION"


@pytest.mark.parametrize("i, o, code, reason", [
    (interaction(response="no idea"), outcome(success=False), "NOT_A_SUCCESS", "not a success and carries no correction"),
    (interaction(response="no idea"), outcome(success=True), "RESPONSE_INVALID", "rejects the response: not JSON"),
    (interaction(response=None), outcome(success=True), "RESPONSE_INVALID", "no response text"),
    (interaction(response="no idea"), outcome(success=False, correction="{\"bad\": 1}"), "CORRECTION_INVALID",
     "correction rejected"),
    (interaction(), outcome(success=True, tenant="evil"), "FOREIGN_TENANT", "outcome tenant 'evil'"),
])
def test_failures_are_kept_but_not_admitted(i, o, code, reason):
    example = scored(i, o)
    assert (example["kind"], example["admitted"], example["reject_code"]) == ("FAILURE", False, code)
    assert reason in example["reject_reason"]
    encode("curated_example", example)


# ---------------------------------------------------------------- split

def test_split_is_stable_per_session_and_near_the_requested_share():
    first = [stages.split("acme", TASK, f"s{n}", 20) for n in range(2000)]
    assert first == [stages.split("acme", TASK, f"s{n}", 20) for n in range(2000)]
    holdout = Counter(first)["HOLDOUT"] / len(first)
    assert 0.16 < holdout < 0.24
    assert {stages.split("acme", TASK, "s1", 0), stages.split("acme", TASK, "s1", 99)} <= {"TRAIN", "HOLDOUT"}
    assert all(stages.split("acme", TASK, f"s{n}", 0) == "TRAIN" for n in range(100))


def test_every_turn_of_a_session_lands_on_the_same_side():
    splits = {scored(interaction(interaction_id=f"i-{n}", session_id="s-42"), outcome(interaction_id=f"i-{n}", success=True),
                     holdout_percent=50)["split"] for n in range(20)}
    assert len(splits) == 1


# ---------------------------------------------------------------- window

def example(admitted=True, split="TRAIN"):
    return {"admitted": admitted, "split": split}


def test_window_fires_at_each_multiple_of_admitted_train_examples():
    state, fired = None, []
    stream = [example(), example(split="HOLDOUT"), example(admitted=False), example(), example(), example()]
    for offset, item in enumerate(stream):
        state, fire = windows.window_update(state, item, partition=1, offset=offset, window_size=2, now=100 + offset)
        if fire:
            state = windows.window_fired(state, {"request_id": f"r{offset}"})
        fired.append(fire)
    assert fired == [False, False, False, True, False, True]
    assert state == {"train_count": 4, "holdout_count": 1, "newest": {"1": 5}, "since_fire": 0, "opened_at": None,
                     "fired": 2, "pending": {"request_id": "r5"}}


def test_window_ignores_replayed_offsets():
    state, fire = windows.window_update(None, example(), partition=0, offset=7, window_size=1)
    assert fire and state["train_count"] == 1
    state = windows.window_fired(state, {"request_id": "r"})
    for offset in (7, 3):  # a replay after a crash: the table already counted these
        again, fire = windows.window_update(state, example(), partition=0, offset=offset, window_size=1)
        assert (again, fire) == (state, False)
    other, fire = windows.window_update(state, example(), partition=1, offset=0, window_size=1)
    assert fire and other["train_count"] == 2 and other["newest"] == {"0": 7, "1": 0}


def test_training_request_names_the_cumulative_range_with_a_deterministic_id():
    state = windows.new_window_state() | {"train_count": 4, "holdout_count": 1, "newest": {"1": 5}}
    request = windows.training_request("acme", TASK, state, curated_topic="examples.curated", created_at=9)
    assert request["examples"] == [{"topic": "examples.curated", "partition": 1, "start_offset": 0, "end_offset": 6}]
    assert (request["train_count"], request["holdout_count"], request["trigger"]) == (4, 1, "count>=4")
    again = windows.training_request("acme", TASK, dict(state), curated_topic="examples.curated", created_at=10)
    assert again["request_id"] == request["request_id"]
    other = windows.training_request("acme", TASK, state | {"newest": {"1": 6}}, curated_topic="examples.curated")
    assert other["request_id"] != request["request_id"]
    encode("training_request", request)


def test_window_fires_by_age_only_with_enough_examples():
    state = None
    for offset in range(2):
        state, fire = windows.window_update(state, example(), partition=0, offset=offset, window_size=10, now=1_000)
        assert not fire
    assert not windows.window_due_by_age(state, now=1_500, max_age_ms=1_000, min_examples=2)  # too young
    assert not windows.window_due_by_age(state, now=5_000, max_age_ms=1_000, min_examples=3)  # too few
    assert windows.window_due_by_age(state, now=5_000, max_age_ms=1_000, min_examples=2)
    request = windows.training_request("acme", TASK, state, curated_topic="c", trigger="age>=1s")
    fired = windows.window_fired(state, request)
    assert not windows.window_due_by_age(fired, now=99_000, max_age_ms=1_000, min_examples=1)
    assert fired["pending"]["request_id"] == request["request_id"] and request["trigger"] == "age>=1s"


# ---------------------------------------------------------------- contract: time, tenants, numbers

def test_event_time_far_in_the_future_and_unknown_tenant_are_refused():
    future = interaction(event_time=stages.now_ms() + 3_600_000)
    with pytest.raises(ContractError, match="in the future"):
        Decoder("interaction")(b"i-1", encode("interaction", future), IREF)
    strict = Contract(tenants=frozenset({"globex"}))
    with pytest.raises(ContractError, match="unknown tenant 'acme'"):
        Decoder("interaction", contract=strict)(b"i-1", encode("interaction", interaction()), IREF)
    with pytest.raises(ContractError, match="not a finite number"):
        Decoder("interaction")(b"i-1", encode("interaction", interaction(latency_ms=float("nan"))), IREF)
    with pytest.raises(ContractError, match="not UTF-8"):
        Decoder("interaction")(b"\xff\xfe", encode("interaction", interaction()), IREF)


# ---------------------------------------------------------------- precedence + horizon

def _o(source, event_time=None, **fields):
    record = outcome(source=source, **fields)
    if event_time is not None:
        record["event_time"] = event_time
    return record


def test_precedence_human_correction_beats_verdicts_and_losers_stay_in_lineage():
    i = interaction(response="no idea", event_time=1_000)
    outcomes = [(_o("HEURISTIC", 2_000, success=True), SourceRef("o", 0, 1)),
                (_o("VALIDATOR", 2_000, success=False), SourceRef("o", 0, 2)),
                (_o("HUMAN", 3_000, success=False, correction=CASE.answer), SourceRef("o", 0, 3)),
                (_o("HUMAN", 2_500, success=False), SourceRef("o", 0, 4))]
    ex = stages.curate(i, outcomes, interaction_ref=IREF, spec=SPEC, holdout_percent=0, horizon_ms=10_000,
                       redactions={"email": 2}, subjects=["subj:b", "subj:a"])
    assert ex["kind"] == "CORRECTION" and ex["rejected"] == "no idea" and ex["outcome_source"] == "HUMAN"
    ids = [o["outcome_id"] for o, _ in outcomes]
    assert ex["lineage"]["outcome_ids"] == [ids[2], ids[3], ids[1], ids[0]]
    assert ex["lineage"]["winning_outcome_id"] == ids[2]
    assert [r["offset"] for r in ex["lineage"]["outcomes"]] == [3, 4, 2, 1]
    assert ex["redactions"] == [{"rule": "email", "count": 2}] and ex["subjects"] == ["subj:a", "subj:b"]
    assert stages.is_final(outcomes[2][0]) and not stages.is_final(outcomes[3][0])
    encode("curated_example", ex)


def test_human_verdict_beats_validator_and_heuristic():
    i = interaction(event_time=1_000)
    outcomes = [(_o("VALIDATOR", 2_000, success=True), OREF), (_o("HUMAN", 2_000, success=False), OREF),
                (_o("BUSINESS", 1_500, success=True), OREF)]
    ex = stages.curate(i, outcomes, interaction_ref=IREF, spec=SPEC, holdout_percent=0, horizon_ms=10_000)
    assert (ex["kind"], ex["admitted"], ex["outcome_source"]) == ("FAILURE", False, "HUMAN")


def test_outcome_after_the_horizon_is_rejected_with_reason_but_an_eligible_one_still_wins():
    day = 24 * 3_600_000
    i = interaction(event_time=1_000)
    late = (_o("HUMAN", 1_000 + day + 3_600_000, success=False, correction=CASE.answer), SourceRef("o", 1, 9))
    ex = stages.curate(i, [late], interaction_ref=IREF, spec=SPEC, holdout_percent=0, horizon_ms=day)
    assert (ex["kind"], ex["admitted"]) == ("FAILURE", False)
    assert ex["reject_code"] == "AFTER_HORIZON"
    assert "25.0 h after the interaction" in ex["reject_reason"] and "24 h horizon" in ex["reject_reason"]
    ok = (_o("VALIDATOR", 5_000, success=True), SourceRef("o", 1, 3))
    ex = stages.curate(i, [late, ok], interaction_ref=IREF, spec=SPEC, holdout_percent=0, horizon_ms=day)
    assert (ex["kind"], ex["admitted"], ex["outcome_source"]) == ("SUCCESS", True, "VALIDATOR")
    assert ex["lineage"]["outcome_ids"] == [ok[0]["outcome_id"], late[0]["outcome_id"]]
    # An outcome that arrives before its interaction, with an earlier event time, is eligible.
    early = (_o("VALIDATOR", 500, success=True), OREF)
    assert stages.curate(i, [early], interaction_ref=IREF, spec=SPEC, holdout_percent=0, horizon_ms=day)["admitted"]
