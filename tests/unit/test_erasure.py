"""Erasure tombstones: keys, records that fit the schema, and matching by scope within a tenant."""

from __future__ import annotations

import pytest

from adaptloop.erasure import ErasureSet, build_erasure, legacy_subject_key, subject_key
from adaptloop.ops.forget import main as forget_main
from adaptloop.ops.subjects import normalize_subject
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.streams.pii import INTERACTION_TEXT, Redactor, redact_record

TENANT = "acme"
SECRET = "erasure-test-subject-secret-0123"


def curated_keys(text: str, *, phone_region: str = "US", pii_patterns: dict[str, str] | None = None) -> list[str]:
    """The subject keys curation gives the example of an interaction whose user wrote ``text``
    (streams.curation: redact the record, then ``subject_key`` of every subject the redactor found)."""
    record = {"tenant": TENANT, "request_messages": [{"role": "user", "content": text}], "response": "ok"}
    found = redact_record(record, Redactor(custom=pii_patterns, phone_region=phone_region), INTERACTION_TEXT)
    return sorted({subject_key(TENANT, value, SECRET) for value in found.subjects})


def test_subject_key_is_stable_normalized_tenant_salted_and_keyed_by_the_deployments_secret():
    alice = subject_key("acme", "alice@example.com", SECRET)
    assert subject_key("acme", "Alice@Example.com ", SECRET) == alice
    assert subject_key("globex", "alice@example.com", SECRET) != alice
    assert alice.startswith("subj:") and "alice" not in alice
    # Not computable from public values: another secret, or the tenant's name alone, gives another key.
    assert subject_key("acme", "alice@example.com", "another-deployments-secret-0000") != alice
    assert legacy_subject_key("acme", "alice@example.com") != alice


def test_the_subject_secret_is_created_once_and_read_back_the_same_by_every_process(tmp_path, monkeypatch, capsys):
    secret_file = tmp_path / "subject-key-secret"
    monkeypatch.setenv("ADAPTLOOP_ERASURE_SUBJECT_SECRET_FILE", str(secret_file))
    from adaptloop.settings import ErasureSettings

    secret = ErasureSettings().secret()  # created once, 0600, then read back the same by every process
    assert len(secret) == 64 and secret_file.stat().st_mode & 0o777 == 0o600
    assert ErasureSettings().secret() == secret
    monkeypatch.setenv("ADAPTLOOP_ERASURE_SUBJECT_SECRET", "short")
    with pytest.raises(ValueError, match="too easy to guess"):
        ErasureSettings()


def test_erasure_record_round_trips_and_bad_scope_is_refused():
    record = build_erasure(tenant="acme", scope="SESSION", key="s-1", requested_by="dpo", reason="art. 17")
    serde = serde_for("erasure")
    assert serde.deserialize(serde.serialize(record, SerdeContext("agent.erasures"))) == record
    with pytest.raises(ValueError):
        build_erasure(tenant="acme", scope="EVERYTHING", key="x")
    with pytest.raises(ValueError):
        build_erasure(tenant="", scope="SESSION", key="x")


def test_match_by_interaction_session_and_subject_only_within_the_tenant():
    alice = subject_key("acme", "alice@example.com", SECRET)
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


# (what the record's text said, what the operator types to forget, the kind forget reports)
WRITTEN_FORMS = [
    ("call 415-555-2671 after five", "+1 (415) 555-2671", "phone"),
    ("my number is +1 415 555 2671", "(415) 555-2671", "phone"),
    ("call 4155552671", "4155552671", "phone"),                      # bare digits: no cue on the command line
    ("card 4111 1111 1111 1111 please", "4111-1111-1111-1111", "card"),
    ("write to alice@example.com", "Alice@Example.COM", "email"),
    ("write to alice@example.com", "<Alice@Example.com>", "email"),
    ("write to alice@example.com", "mailto:Alice@Example.com", "email"),
    ("seen from 2001:db8::1 twice", "2001:0db8:0000:0000:0000:0000:0000:0001", "ip"),
    ("seen from 2001:db8::1 twice", "[2001:DB8::1]", "ip"),
    ("pay to DE89370400440532013000 today", "DE89 3704 0044 0532 0130 00", "iban"),
    ("pay to GB82 WEST 1234 5698 7654 32 today", "gb82-west-1234-5698-7654-32", "iban"),
]


@pytest.mark.parametrize(("text", "typed", "kind"), WRITTEN_FORMS)
def test_forget_keys_a_subject_in_any_written_form_as_curation_keyed_it(text, typed, kind):
    (curated,) = curated_keys(text)
    subject = normalize_subject(typed)
    assert subject.kind == kind
    assert subject.key(TENANT, SECRET) == curated


def test_phone_numbers_without_country_code_are_read_in_curations_region():
    (curated,) = curated_keys("ring 020 7946 0958 tomorrow", phone_region="GB")
    assert normalize_subject("020 7946 0958", phone_region="GB").key(TENANT, SECRET) == curated
    assert normalize_subject("+44 20 7946 0958").key(TENANT, SECRET) == curated
    with pytest.raises(ValueError, match="region US"):
        normalize_subject("020 7946 0958")  # not a US number: no record curated in region US carries a key for it


def test_user_pattern_ids_are_recognised_with_curations_patterns_or_forced_raw():
    patterns = {"employee": r"EMP-\d{6}"}
    (curated,) = curated_keys("ask EMP-123456 about it", pii_patterns=patterns)
    subject = normalize_subject("EMP-123456", pii_patterns=patterns)
    assert (subject.kind, subject.key(TENANT, SECRET)) == ("custom:employee", curated)
    with pytest.raises(ValueError, match="--raw"):
        normalize_subject("EMP-123456")  # this environment lacks the pattern
    raw = normalize_subject("EMP-123456", raw=True)
    assert (raw.kind, raw.key(TENANT, SECRET)) == ("raw", curated)


@pytest.mark.parametrize("typed", ["nobody", "order 12345", "127.0.0.1", "::1", "password=hunter2hunter2", "  "])
def test_what_no_record_can_carry_is_refused(typed):
    with pytest.raises(ValueError, match="no curated example can carry its key"):
        normalize_subject(typed)


def test_two_identifiers_at_once_are_refused():
    with pytest.raises(ValueError, match="forget each on its own"):
        normalize_subject("alice@example.com +1 415 555 2671")


def test_forget_refuses_an_unrecognised_subject_before_writing_anything(capsys):
    assert forget_main(["--subject", "nobody", "--tenant", TENANT]) == 2  # returns before reading the broker
    assert "nothing was written" in capsys.readouterr().err
