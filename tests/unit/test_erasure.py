"""Erasure tombstones: keys, records that fit the schema, and matching by scope within a tenant."""

from __future__ import annotations

import pytest

from adaptloop.erasure import ErasureSet, build_erasure, subject_key
from adaptloop.schemas import SerdeContext, serde_for


def test_subject_key_is_stable_normalized_and_tenant_salted():
    assert subject_key("acme", "Alice@Example.com ") == subject_key("acme", "alice@example.com")
    assert subject_key("acme", "alice@example.com") != subject_key("globex", "alice@example.com")
    assert subject_key("acme", "alice@example.com").startswith("subj:")
    assert "alice" not in subject_key("acme", "alice@example.com")


def test_erasure_record_round_trips_and_bad_scope_is_refused():
    record = build_erasure(tenant="acme", scope="SESSION", key="s-1", requested_by="dpo", reason="art. 17")
    serde = serde_for("erasure")
    assert serde.deserialize(serde.serialize(record, SerdeContext("agent.erasures"))) == record
    with pytest.raises(ValueError):
        build_erasure(tenant="acme", scope="EVERYTHING", key="x")
    with pytest.raises(ValueError):
        build_erasure(tenant="", scope="SESSION", key="x")


def test_match_by_interaction_session_and_subject_only_within_the_tenant():
    alice = subject_key("acme", "alice@example.com")
    erasures = ErasureSet.of([
        build_erasure(tenant="acme", scope="INTERACTION", key="i-1"),
        build_erasure(tenant="acme", scope="SESSION", key="s-9"),
        build_erasure(tenant="acme", scope="SUBJECT", key=alice),
    ])
    assert len(erasures) == 3
    example = {"tenant": "acme", "example_id": "i-2", "session_id": "s-1", "subjects": []}
    assert erasures.match(example) is None
    assert erasures.match(example | {"example_id": "i-1"})["scope"] == "INTERACTION"
    assert erasures.match({"tenant": "acme", "interaction_id": "i-1"})["key"] == "i-1"
    assert erasures.match(example | {"session_id": "s-9"})["scope"] == "SESSION"
    assert erasures.match(example | {"subjects": ["subj:other", alice]})["scope"] == "SUBJECT"
    assert erasures.match(example | {"tenant": "globex", "example_id": "i-1", "session_id": "s-9",
                                     "subjects": [alice]}) is None
