"""A data subject as curation keys it: what ``adaptloop forget SUBJECT`` turns the identifier it is given into,
so that its key is the one the curated examples of a text holding that identifier carry."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import phonenumbers
from stdnum import iban as _iban

from adaptloop.erasure import legacy_subject_key, subject_key
from adaptloop.streams.pii import PLACEHOLDER, Redactor

RAW = "raw"


@dataclass(frozen=True)
class Subject:
    """An identifier as curation keys it: the PII rule that recognises it (or ``raw``), and its value as that
    rule normalises it (e-mail lowercased, phone in E.164, card digits, IBAN compact, IP as ``ipaddress`` writes it)."""

    kind: str
    value: str
    normalized_by: str  # "the redactor", "<library>, then the redactor" or "--raw"

    def key(self, tenant: str, secret: str | None) -> str:
        """Its key under the deployment's subject-key secret; ``None``: the legacy key (tenant-salted only)."""
        return subject_key(tenant, self.value, secret) if secret is not None else legacy_subject_key(tenant, self.value)


def _whole(redactor: Redactor, text: str) -> tuple[str, str] | None:
    """(rule, value) when the redactor finds one identifier of a person in ``text`` and it is all of it."""
    found = redactor.redact(text)
    if len(found.subjects) > 1:
        raise ValueError(f"the subject holds {len(found.subjects)} identifiers ({', '.join(sorted(found.counts))}): "
                         "forget each on its own")
    if len(found.subjects) != 1 or sum(found.counts.values()) != 1:
        return None
    (rule,) = found.counts
    if found.text.strip() != PLACEHOLDER.get(rule, f"[{rule.upper()}]"):  # the redactor's placeholder for the rule
        return None
    return rule, next(iter(found.subjects))


def _written_forms(value: str, region: str) -> Iterator[tuple[str, str]]:
    """(library, canonical form) of ``value`` by each kind's own normaliser, in the redactor's rule order: forms
    a person writes that the redactor, which looks for identifiers inside text, does not take whole."""
    bare = value.strip()
    if _iban.is_valid(bare):  # lowercase, or grouped with dashes or dots
        yield "stdnum.iban", _iban.compact(bare)
    digits = re.sub(r"[\s-]", "", bare)
    if digits.isdigit():  # a card number: the redactor keys its bare digits
        yield "digits", digits
    try:
        yield "ipaddress", str(ipaddress.ip_address(bare.removeprefix("[").removesuffix("]")))
    except ValueError:
        pass
    try:
        number = phonenumbers.parse(bare, region)
    except phonenumbers.NumberParseException:
        pass
    else:  # a bare digit run, which the redactor keys only after a cue such as "call"
        if phonenumbers.is_valid_number(number):
            yield "phonenumbers", phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if "@" in bare:
        yield "lowercase", re.sub(r"(?i)^mailto:", "", bare).removeprefix("<").removesuffix(">").lower()


def normalize_subject(value: str, *, phone_region: str = "US", pii_patterns: Mapping[str, str] | None = None,
                      raw: bool = False) -> Subject:
    """``value`` as curation keys it, so that ``normalize_subject(v).key(tenant)`` is the key the curated examples
    of a text holding ``v`` (in any written form) carry; ``phone_region`` and ``pii_patterns`` must be curation's
    (``StreamsSettings``): they are what its redactor is built with.

    First the redactor itself, on ``value`` alone: one identifier of a person covering all of it is keyed as
    the redactor normalised it. Else each kind's own normaliser (``stdnum.iban``, digits, ``ipaddress``,
    ``phonenumbers`` with ``phone_region``, lowercase) proposes a canonical form, and the first one the
    redactor recognises whole is keyed. ``raw`` keys ``value`` as written (``subject_key`` still folds case
    and whitespace). Raises ``ValueError`` for anything else: no curated example can carry its key.
    """
    if raw:
        if not value.strip():
            raise ValueError("the subject is empty")
        return Subject(RAW, value, "--raw")
    redactor = Redactor(custom=pii_patterns, phone_region=phone_region)
    found = _whole(redactor, value)
    if found is not None:
        return Subject(found[0], found[1], "the redactor")
    for library, form in _written_forms(value, phone_region):
        found = _whole(redactor, form)
        if found is not None:
            return Subject(found[0], found[1], f"{library}, then the redactor")
    raise ValueError(
        "the subject is not one identifier curation keys: not an e-mail address, a phone number (numbers without "
        f"a country code are read in region {phone_region}), a payment card number, an IBAN, an IP address "
        "(loopback and unspecified ones are never keyed) nor a match of a PII pattern "
        "(ADAPTLOOP_STREAMS_PII_PATTERNS), so no curated example can carry its key and nothing was written; "
        "pass --raw to key it exactly as written")
