"""Avro contracts and serde: every kept schema parses, versions stay compatible, bad bytes fail typed."""

from __future__ import annotations

import json
import struct

import pytest
from fastavro.utils import generate_many

from adaptloop.errors import DeserializationError, SerializationError
from adaptloop.schemas import RECORDS, AvroDeserializer, AvroSerializer, SchemaStore, SerdeContext, bundled_store, serde_for
from adaptloop.schemas.contract import reject_code_of
from adaptloop.sdk import build_interaction, build_outcome

CTX = SerdeContext("agent.interactions", partition=2, offset=41)


def interaction(**overrides):
    return build_interaction(tenant="acme", agent="bot", task="order-extract", session_id="s1",
                             messages=[{"role": "user", "content": "3 x lamp to Oslo"}],
                             response='{"a": 1}', base_model="base") | overrides


def test_every_record_kind_has_schemas_that_parse():
    store = bundled_store()
    assert set(store.versions) == set(RECORDS)
    for stem, versions in store.versions.items():
        assert versions[-1].name == RECORDS[stem]
        assert [v.version for v in versions] == sorted({v.version for v in versions})


def test_consecutive_versions_are_compatible_both_ways():
    store = bundled_store()
    for stem, versions in store.versions.items():
        for old, new in zip(versions, versions[1:]):
            for writer, reader in ((old, new), (new, old)):
                for record in generate_many(writer.parsed, 5):
                    data = AvroSerializer(stem, _store_of(writer))(record)
                    AvroDeserializer(stem, _store_of(writer, reader))(data)


def _store_of(*versions):
    return SchemaStore({f"{v.stem}.v{v.version}.avsc": json.dumps(v.raw) for v in versions})


def test_round_trip_has_single_object_header():
    record = interaction()
    data = AvroSerializer("interaction")(record, CTX)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == bundled_store().latest("interaction").fingerprint
    assert AvroDeserializer("interaction")(data, CTX) == record


def test_new_optional_field_read_by_old_reader_and_reverse():
    v1 = bundled_store().latest("outcome").raw
    v2 = json.loads(json.dumps(v1))
    v2["fields"].append({"name": "confidence", "type": ["null", "double"], "default": None})
    files = {"outcome.v1.avsc": json.dumps(v1), "outcome.v2.avsc": json.dumps(v2)}
    both, old_only = SchemaStore(files), SchemaStore({"outcome.v1.avsc": json.dumps(v1)})
    record = build_outcome("i1", tenant="acme", source="HUMAN", success=False, correction="{}")

    new_bytes = AvroSerializer("outcome", both)(record | {"confidence": 0.9})
    # An old reader that knows the new version's fingerprint resolves it to the fields it knows.
    v1_reader = AvroDeserializer("outcome", both)
    v1_reader.reader = both.versions["outcome"][0]
    assert v1_reader(new_bytes) == record

    old_bytes = AvroSerializer("outcome", old_only)(record)
    assert AvroDeserializer("outcome", both)(old_bytes) == record | {"confidence": None}


def release_record(**overrides) -> dict:
    """An AdapterRelease as adapter_release.v2 knows it."""
    return {"version": "acme--extract--0123abcd", "tenant": "acme", "task": "extract", "state": "RELEASED",
            "reason": "undecided", "base_model": "smollm2", "artifact_uri": "/a", "digest": "sha256:x", "lora_rank": 8,
            "method": "dpo", "evaluation": {"metric": "success_rate", "holdout_count": 2, "candidate_score": 0.0,
                                            "incumbent": "base", "incumbent_score": 0.0, "margin": 0.05, "ci_low": 0.0,
                                            "ci_high": 0.66, "incumbent_ci_low": 0.0, "incumbent_ci_high": 0.66,
                                            "metrics": {}},
            "lineage": {"request_id": "r", "dataset_digest": "d", "examples": [], "train_example_ids": [],
                        "code_version": "c", "config_json": "{}", "dataset_uri": "", "parent_version": None},
            "created_at": 1, "regression": [], "decided_by": "gate", "evidence_json": "{}", "training_json": "{}",
            "base_model_digest": None} | overrides


def test_adapter_release_v3_canary_share_read_by_v2_readers_and_v2_records_by_v3():
    store = bundled_store()
    v2, v3 = store.versions["adapter_release"][1:3]
    assert (v2.version, v3.version) == (2, 3)
    v2_only = _store_of(v2)
    record = release_record()

    new_bytes = AvroSerializer("adapter_release")(record | {"canary_share": 0.01})
    assert AvroDeserializer("adapter_release")(new_bytes)["canary_share"] == 0.01
    # A v2 reader (an older gateway or replica) that knows v3's fingerprint resolves it to the fields it knows.
    old_reader = AvroDeserializer("adapter_release", store)
    old_reader.reader = v2
    assert old_reader(new_bytes) == record

    # Records written before v3 (every release already on the topic) read as "no share of their own".
    old_bytes = AvroSerializer("adapter_release", v2_only)(record)
    assert AvroDeserializer("adapter_release")(old_bytes) == record | {"canary_share": None}
    # A writer that leaves the field out writes its default.
    assert AvroDeserializer("adapter_release")(AvroSerializer("adapter_release")(record))["canary_share"] is None


def curated_record(**overrides) -> dict:
    """A rejected CuratedExample as curated_example.v3 knows it (no reject_code)."""
    return {"example_id": "i1", "tenant": "acme", "task": "extract", "session_id": "s1", "split": "TRAIN",
            "kind": "FAILURE", "admitted": False, "reject_reason": "outcome is not a success and carries no correction",
            "episode_id": "", "turn": 0, "scope": "CALL", "prompt_messages": [], "tools_json": None, "completion": "x",
            "completion_tool_calls": [], "rejected": None, "rejected_tool_calls": [], "score": 0.0, "scorer": "v@1",
            "curated_at": 1, "served_by": None, "event_time": 1, "outcome_source": "VALIDATOR",
            "lineage": {"interaction": {"topic": "t", "partition": 0, "offset": 0}, "outcomes": [], "outcome_ids": [],
                        "code_version": "c", "winning_outcome_id": None},
            "redactions": [], "subjects": [], "near_duplicate_of": None, "content_hash": ""} | overrides


def test_curated_example_v4_reject_code_read_by_v3_readers_and_v3_records_by_v4():
    store = bundled_store()
    v3, v4 = store.versions["curated_example"][2:4]
    assert (v3.version, v4.version) == (3, 4)
    record = curated_record()

    new_bytes = AvroSerializer("curated_example")(record | {"reject_code": "NOT_A_SUCCESS"})
    assert AvroDeserializer("curated_example")(new_bytes)["reject_code"] == "NOT_A_SUCCESS"
    # A v3 reader (a trainer or worker not yet upgraded) that knows v4's fingerprint reads the fields it knows.
    old_reader = AvroDeserializer("curated_example", store)
    old_reader.reader = v3
    assert old_reader(new_bytes) == record

    # Records written before v4 (every example already on the topic) carry no code: the contract's
    # fallback reads the code their wording stood for.
    old_bytes = AvroSerializer("curated_example", _store_of(v3))(record)
    decoded = AvroDeserializer("curated_example")(old_bytes)
    assert decoded == record | {"reject_code": None}
    assert reject_code_of(decoded) == "NOT_A_SUCCESS"


def test_a_reject_code_unknown_to_the_reader_reads_as_other():
    v4 = bundled_store().latest("curated_example")
    v5 = json.loads(json.dumps(v4.raw))
    code_field = next(f for f in v5["fields"] if f["name"] == "reject_code")
    code_field["type"][1]["symbols"].append("SOME_FUTURE_CODE")
    newer = SchemaStore({"curated_example.v4.avsc": json.dumps(v4.raw), "curated_example.v5.avsc": json.dumps(v5)})
    data = AvroSerializer("curated_example", newer)(curated_record(reject_code="SOME_FUTURE_CODE"))
    v4_reader = AvroDeserializer("curated_example", newer)
    v4_reader.reader = newer.versions["curated_example"][0]
    assert v4_reader(data)["reject_code"] == "OTHER"


@pytest.mark.parametrize("data, reason", [
    (b"", "bad magic or truncated header"),
    (b"\x00\x00\x00\x00\x01{}", "bad magic"),
    (b"\xc3\x01\x00\x00", "truncated header"),
    (b"\xc3\x01" + struct.pack("<Q", 42) + b"\x02", "unknown schema fingerprint"),
])
def test_malformed_bytes_fail_with_typed_error_naming_the_source(data, reason):
    with pytest.raises(DeserializationError) as caught:
        AvroDeserializer("interaction")(data, CTX)
    assert reason in str(caught.value)
    assert (caught.value.topic, caught.value.partition, caught.value.offset) == ("agent.interactions", 2, 41)


def test_wrong_record_type_truncated_body_and_trailing_bytes():
    outcome_bytes = AvroSerializer("outcome")(build_outcome("i", tenant="t", source="HUMAN"))
    with pytest.raises(DeserializationError, match="wrong record type"):
        AvroDeserializer("interaction")(outcome_bytes, CTX)
    good = AvroSerializer("interaction")(interaction())
    with pytest.raises(DeserializationError, match="corrupt"):
        AvroDeserializer("interaction")(good[:-7], CTX)
    with pytest.raises(DeserializationError, match="trailing bytes"):
        AvroDeserializer("interaction")(good + b"\x00\x01", CTX)


def test_record_that_does_not_fit_raises_serialization_error():
    with pytest.raises(SerializationError, match="Interaction"):
        AvroSerializer("interaction")(interaction(latency_ms="fast"), CTX)


def test_confluent_wire_format_through_mock_registry():
    serde = serde_for("outcome", "mock://adaptloop-unit", auto_register=True)
    record = build_outcome("i1", tenant="acme", source="VALIDATOR", success=True)
    data = serde.serialize(record, SerdeContext("agent.outcomes"))
    assert data[0] == 0  # Confluent magic byte, then the 4-byte schema id
    assert serde.deserialize(data, SerdeContext("agent.outcomes")) == record
    with pytest.raises(DeserializationError):
        serde.deserialize(b"\xc3\x01garbage", SerdeContext("agent.outcomes", 0, 7))
