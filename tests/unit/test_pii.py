"""PII corpus: >= 50 positives (each must be redacted by the named rule) and >= 50 close negatives
(order numbers, dates, version strings, ISO timestamps, prices ... must come through untouched)."""

from __future__ import annotations

import pytest

from adaptloop.erasure import subject_key
from adaptloop.streams.pii import Redaction, Redactor, redact_record

POSITIVES = [  # (text, rule, the substring that must disappear)
    ("Contact me at alice.martin@example.com please", "email", "alice.martin@example.com"),
    ("mail: Bob_Smith+orders@mail.example.co.uk", "email", "Bob_Smith+orders@mail.example.co.uk"),
    ("send it to j.doe@sub.domain.org.", "email", "j.doe@sub.domain.org"),
    ("<priya.sharma@acme-corp.io>", "email", "priya.sharma@acme-corp.io"),
    ("reply to OMAR.HADDAD@EXAMPLE.NET asap", "email", "OMAR.HADDAD@EXAMPLE.NET"),
    ("cc x_y-z@foo-bar.travel", "email", "x_y-z@foo-bar.travel"),
    ("his address is mei.chen123@gmail.com, thanks", "email", "mei.chen123@gmail.com"),
    ("email=lars.berg@firma.no", "email", "lars.berg@firma.no"),
    ("Call me at +1 415-555-2671 tomorrow", "phone", "415-555-2671"),
    ("my number is (415) 555-2671", "phone", "555-2671"),
    ("UK: +44 20 7946 0958", "phone", "7946 0958"),
    ("Ring +33 1 42 68 53 00 for the shop", "phone", "42 68 53 00"),
    ("tel. +49 30 901820", "phone", "901820"),
    ("phone: 415.555.2671", "phone", "415.555.2671"),
    ("call 4155552671 after 5", "phone", "4155552671"),
    ("mobile +81 3-3224-9999", "phone", "3224-9999"),
    ("whatsapp +34 612 345 678", "phone", "612 345 678"),
    ("reach me on 212-555-0147", "phone", "212-555-0147"),
    ("Office +1 (646) 555-0199 ext", "phone", "555-0199"),
    ("+61 2 9374 4000 is the Sydney line", "phone", "9374 4000"),
    ("card 4111 1111 1111 1111 exp 12/29", "card", "4111 1111 1111 1111"),
    ("pay with 5555555555554444", "card", "5555555555554444"),
    ("amex 3782-822463-10005", "card", "3782-822463-10005"),
    ("visa 4012888888881881 please", "card", "4012888888881881"),
    ("my card number: 6011 1111 1111 1117", "card", "6011 1111 1111 1117"),
    ("mastercard 2223 0031 2200 3222", "card", "2223 0031 2200 3222"),
    ("jcb 3530111333300000 ok", "card", "3530111333300000"),
    ("use 4000-0566-5566-5556 for it", "card", "4000-0566-5566-5556"),
    ("IBAN DE89 3704 0044 0532 0130 00", "iban", "DE89 3704 0044 0532 0130 00"),
    ("transfer to GB29NWBK60161331926819", "iban", "GB29NWBK60161331926819"),
    ("FR14 2004 1010 0505 0001 3M02 606 is mine", "iban", "FR14 2004 1010 0505 0001 3M02 606"),
    ("NL91ABNA0417164300", "iban", "NL91ABNA0417164300"),
    ("iban: ES9121000418450200051332", "iban", "ES9121000418450200051332"),
    ("BE68 5390 0754 7034 for refunds", "iban", "BE68 5390 0754 7034"),
    ("server at 192.168.1.23 is down", "ip", "192.168.1.23"),
    ("client ip 203.0.113.7 blocked", "ip", "203.0.113.7"),
    ("from 8.8.8.8, yes", "ip", "8.8.8.8"),
    ("ipv6 2001:db8:85a3::8a2e:370:7334 seen", "ip", "2001:db8:85a3::8a2e:370:7334"),
    ("login from fe80::1ff:fe23:4567:890a", "ip", "fe80::1ff:fe23:4567:890a"),
    ("host 10.0.0.254 responded", "ip", "10.0.0.254"),
    ("aws key AKIAIOSFODNN7EXAMPLE leaked", "secret", "AKIAIOSFODNN7EXAMPLE"),
    ("token ghp_1234567890abcdefghijklmnopqrstuvwxyzAB", "secret", "ghp_1234567890abcdefghijklmnopqrstuvwxyzAB"),
    ("slack xoxb-123456789012-abcdefghijkl", "secret", "xoxb-123456789012-abcdefghijkl"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("key AIzaSyA1234567890abcdefghijklmnopqrstuv", "secret", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("OPENAI_API_KEY sk-proj-abcdefghijklmnopqrstuvwx123456", "secret", "sk-proj-abcdefghijklmnopqrstuvwx123456"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "secret",
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("Authorization: Bearer abcDEF123456ghiJKL789", "secret", "abcDEF123456ghiJKL789"),
    ("password=Hunter2Hunter2!", "secret", "Hunter2Hunter2!"),
    ("api_key: 'q8w7e6r5t4y3u2i1'", "secret", "q8w7e6r5t4y3u2i1"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "secret", "MIIEowIBAAKCAQEA"),
    ("pasted, cut short: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nBG5vbmUAAAAEbm9uZQ", "secret",
     "b3BlbnNzaC1rZXktdjEAAAAA"),
    ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\nlQOYBFxyzAbCdEfGh\n=Xy1z\n-----END PGP PRIVATE KEY BLOCK-----",
     "secret", "lQOYBFxyzAbCdEfGh"),
    ("truncated PGP: -----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBFxyzAbCdEfGhIjKl", "secret", "lQOYBFxyzAbCdEfGhIjKl"),
    ("employee EMP-004211 asked", "custom:employee", "EMP-004211"),
    ("Alice (alice@example.com, +1 415-555-2671) paid with 4111111111111111", "card", "4111111111111111"),
    ("db password: s3cr3tP@ssw0rd", "secret", "s3cr3tP@ssw0rd"),
]

NEGATIVES = [
    "replica http://127.0.0.1:18000 answered",
    "the server listens on 0.0.0.0:8080 and [::1]:8443",
    "Order #4815162342 ships Monday",
    "order number 100045678 is confirmed",
    "invoice INV-2024-000123",
    "tracking 1Z999AA10123456784",
    "PO 20240315-0042 received",
    "reference 987654321012 for your claim",
    "SKU 4006381333931 in stock",
    "on 2024-03-15 we met",
    "deadline 15/03/2024",
    "dated 03.15.2024",
    "at 2024-03-15T12:30:45Z the job ran",
    "timestamp 2024-03-15T12:30:45.123+01:00",
    "between 09:30 and 17:45",
    "time 12:30:45",
    "version 2.14.3 released",
    "upgrade to v1.2.3.4 now",
    "Python 3.11.4 is required",
    "release 10.0.19041.1 of Windows",
    "torch==2.13.0+cpu",
    "price $1,299.99 each",
    "costs EUR 4.500,00 total",
    "quantity 12 x 3.50 = 42.00",
    "temperature 23.5 C",
    "coordinates 48.8566, 2.3522",
    "Alice Martin wants 3 x desk lamp delivered to Lyon by Monday.",
    '{"customer": "Omar Haddad", "product": "USB cable", "quantity": 40, "city": "Oslo", "deadline": "March 3"}',
    "Please ship 17 units of office chair to Porto for Mei Chen, due next week.",
    "room 1203, floor 12",
    "the score was 1-0-2-3",
    "ISBN 978-3-16-148410-0",
    "ratio 1:2:3",
    "see section 4.2.1.3 of the spec",
    "chapter 192.168 of the novel",
    "the year 1999 and 2024",
    "call me maybe",
    "an email about the order",
    "user@ is not complete",
    "at example.com we sell mugs",
    "hash a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sk-short",
    "api_key is missing",
    "password reset requested",
    "DE89 is a prefix",
    "GB29 bank code",
    "account 12345678 sort code 12-34-56",
    "batch 4111-1111 only",
    "serial 1234 5678 9012 3456",
    "mac 00:1B:44:11:3A:B7",
    "weight 2.5 kg and 3.75 kg",
    "phone case x 2 delivered to Denver",
    "1,234,567 units sold",
    "port 8080 and 443",
    "build 20240315.7",
    "order 3 of 12 on 2024-01-02",
]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(custom={"employee": r"\bEMP-\d{6}\b"})


def test_corpus_sizes():
    assert len(POSITIVES) >= 50 and len(NEGATIVES) >= 50


def test_recall_on_positives(redactor):
    missed = []
    for text, rule, secret in POSITIVES:
        result = redactor.redact(text)
        if secret in result.text or result.counts[rule] < 1:
            missed.append((text, rule, result.text, dict(result.counts)))
    recall = 1 - len(missed) / len(POSITIVES)
    print(f"PII recall {recall:.3f} on {len(POSITIVES)} positives; missed: {missed}")
    assert recall >= 0.98, missed


def test_no_redaction_of_close_negatives(redactor):
    touched = [(text, r.text, dict(r.counts)) for text in NEGATIVES if (r := redactor.redact(text)).counts]
    assert touched == []


def test_subjects_are_normalized_identifiers(redactor):
    a = redactor.redact("call +1 415-555-2671 or mail Alice@Example.com")
    b = redactor.redact("my phone is (415) 555-2671; alice@example.com")
    assert a.subjects == b.subjects == {"+14155552671", "alice@example.com"}
    assert {subject_key("acme", s) for s in a.subjects} == {subject_key("acme", s) for s in b.subjects}
    assert redactor.redact("AKIAIOSFODNN7EXAMPLE").subjects == set()  # a key is not a person


def test_redact_record_walks_messages_tool_calls_and_maps(redactor):
    record = {"request_messages": [{"role": "user", "content": "I am bob@example.com"}],
              "response": "noted, bob@example.com", "tool_calls": [{"id": "1", "name": "f", "arguments": '{"ip": "10.1.2.3"}'}],
              "attributes": {"client": "203.0.113.9"}, "tools_json": None}
    found = redact_record(record, redactor, ("request_messages", "response", "tool_calls", "tools_json", "attributes"))
    assert "bob@" not in str(record) and "10.1.2.3" not in str(record) and "203.0.113.9" not in str(record)
    assert found.counts == {"email": 2, "ip": 2}
    assert found.subjects == {"bob@example.com", "10.1.2.3", "203.0.113.9"}


def test_bad_user_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="not a regex"):
        Redactor(custom={"broken": "("})


def test_no_valid_phone_number_is_shorter_than_the_digit_prefilter():
    """The matcher is skipped below MIN_PHONE_DIGITS digits: no region's numbers may be shorter."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    from adaptloop.streams.pii import MIN_PHONE_DIGITS

    shortest = min(length for region in phonenumbers.SUPPORTED_REGIONS
                   for length in PhoneMetadata.metadata_for_region(region).general_desc.possible_length if length > 0)
    assert shortest >= MIN_PHONE_DIGITS


def test_a_cached_redaction_is_the_same_and_still_counted_per_call(redactor):
    text = "You are a helpful agent. Escalations: ops@example.com, +44 20 7946 0958."
    first, second = redactor.redact(text), redactor.redact(text)
    assert first.text == second.text == "You are a helpful agent. Escalations: [EMAIL], [PHONE]."
    assert first.counts == second.counts == {"email": 1, "phone": 1}
    assert first.subjects == second.subjects == {"ops@example.com", "+442079460958"}
    total = Redaction("")
    redactor.redact(text, total)
    redactor.redact(text, total)
    assert total.counts == {"email": 2, "phone": 2}


# One text per secret shape (the corpus above misses some), and what IGNORECASE matches beyond ASCII:
# each secret pattern runs only on texts holding one of its words, so every shape must still be found.
EVERY_SECRET_SHAPE = [
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
    "ASIAY34FZKBOKMUTVV7A", "gho_16C7e42F292c6912E7710c838347Ae178B4a", "ghs_16C7e42F292c6912E7710c838347Ae178B4a",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789",
    "xoxp-2048-4096-8192-abcdef", "pk_test_TYooMQauvdEDq54NiTphI7jx", "rk_live_51H8abcdefghijklmnop",
    "sk-ant-api03-abcdefghijklmnopqrstuvwx", "sk-abcdefghijklmnopqrstuvwx1234",
    "BEARER abcdefghijklmnop1234", "secret_key=abcdefgh12345678", "ACCESS-TOKEN: 'abcdefgh12345678'",
    "auth_token = abcdefgh12345678", "passwd: correcthorse9", "Secret: hunter2hunter2",
    "paſſword=abcdefgh12345678", "apı_key=abcdefgh12345678",  # a long s and a dotless i, as IGNORECASE reads them
]


@pytest.mark.parametrize("text", EVERY_SECRET_SHAPE)
def test_every_secret_shape_is_found_past_the_word_prefilter(redactor, text):
    from adaptloop.streams.pii import _KEY_BEGIN, _SECRET_RES

    assert any(pattern.search(text) for _, pattern in _SECRET_RES) or _KEY_BEGIN.search(text), "not a secret shape"
    assert redactor.redact(text).counts.get("secret") == 1, text


@pytest.mark.parametrize("shape", ["a%", "-----BEGIN RSA PRIVATE KEY-----\n", "x@a.", "password=", "AKIAIOSFODNN7EXAMPLE "])
def test_redaction_time_grows_linearly_on_adversarial_runs(redactor, shape):
    """Ten times the text takes about ten times as long, not a hundred (a regex that rescans the rest of the text
    from each position, or a splice per match, is quadratic: 112 KB of repeated BEGIN lines took 6 s)."""
    import time

    def seconds(chars: int) -> float:
        text = shape * (chars // len(shape)) + "@"
        started = time.perf_counter()
        redactor.redact(text)
        return time.perf_counter() - started

    small, large = min(seconds(20_000) for _ in range(3)), min(seconds(200_000) for _ in range(2))
    assert large < 30 * max(small, 1e-3), (shape, small, large)


def test_a_truncated_key_block_is_redacted_to_where_its_lines_stop(redactor):
    text = "see -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIAbc\nxyz+/=\nThanks for looking, Bob."
    assert redactor.redact(text).text == "see [SECRET]Thanks for looking, Bob."
    public = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----"
    assert redactor.redact(public).text == public
