"""Erasure ("forget"): tombstones on the erasures topic that curation and every snapshot honour.

    from adaptloop.erasure import ErasureSet, build_erasure, subject_key
    erasures = ErasureSet.read(kafka, topics)          # every erasure so far, folded
    if erasures.match(curated_example): ...            # -> the Erasure that excludes it, or None

An erasure names a tenant and one scope: an interaction id, a session id, or a subject key.
A subject key is a keyed hash (HMAC-SHA256) of the tenant and an identifier (an e-mail address, a
phone number, a user id) under the deployment's secret (``ErasureSettings``), so the key can be stored
in curated examples and erasure records without the identifier itself, and nobody without the secret
can tell whose it is by hashing likely values: curation puts ``subject_key(tenant, value, secret)`` of
every PII value it redacts into the example's ``subjects``; ``adaptloop forget --subject
alice@example.com`` computes the same key. Examples curated before keys took a secret carry
``legacy_subject_key`` (the tenant's name was the only salt): ``forget --legacy-key`` erases those.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from adaptloop.schemas.contract import now_ms
from adaptloop.settings import KafkaSettings, Topics

INTERACTION, SESSION, SUBJECT = "INTERACTION", "SESSION", "SUBJECT"
SCOPES = (INTERACTION, SESSION, SUBJECT)


def _subject(tenant: str, value: str) -> bytes:
    normalized = "".join(value.split()).casefold()
    return f"{tenant}\0{normalized}".encode()


def subject_key(tenant: str, value: str, secret: str) -> str:
    """A stable key for one data subject of one tenant: no identifier in clear, same key everywhere the
    deployment's ``secret`` is, and not computable without it."""
    return "subj:" + hmac.new(secret.encode(), _subject(tenant, value), hashlib.sha256).hexdigest()[:32]


def legacy_subject_key(tenant: str, value: str) -> str:
    """The key examples curated before subject keys took a secret carry (guessable: salted by the tenant only)."""
    return "subj:" + hashlib.sha256(_subject(tenant, value)).hexdigest()[:32]


def build_erasure(*, tenant: str, scope: str, key: str, requested_by: str | None = None,
                  reason: str | None = None, erasure_id: str | None = None,
                  requested_at: int | None = None) -> dict[str, Any]:
    """An Erasure record (schemas/avro/erasure.v1.avsc) as a dict."""
    if scope not in SCOPES:
        raise ValueError(f"erasure scope must be one of {SCOPES}, not {scope!r}")
    if not tenant or not key:
        raise ValueError("an erasure needs a tenant and a key")
    return {"erasure_id": erasure_id or str(uuid.uuid4()), "tenant": tenant, "scope": scope, "key": key,
            "requested_at": requested_at if requested_at is not None else now_ms(),
            "requested_by": requested_by, "reason": reason}


@dataclass
class ErasureSet:
    """Every erasure folded into lookups by (tenant, key) per scope."""

    by_scope: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = field(
        default_factory=lambda: {scope: {} for scope in SCOPES})

    def add(self, erasure: Mapping[str, Any]) -> None:
        self.by_scope[erasure["scope"]][(erasure["tenant"], erasure["key"])] = erasure

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.by_scope.values())

    def match(self, record: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The erasure that excludes ``record`` (an Interaction, Outcome or CuratedExample dict), or None."""
        tenant = record.get("tenant", "")
        interaction_id = record.get("interaction_id") or record.get("example_id")
        hit = self.by_scope[INTERACTION].get((tenant, interaction_id))
        if hit is None and record.get("session_id"):
            hit = self.by_scope[SESSION].get((tenant, record["session_id"]))
        if hit is None:
            for subject in record.get("subjects") or ():
                hit = self.by_scope[SUBJECT].get((tenant, subject))
                if hit is not None:
                    break
        return hit

    @classmethod
    def of(cls, erasures: Iterable[Mapping[str, Any]]) -> "ErasureSet":
        folded = cls()
        for erasure in erasures:
            folded.add(erasure)
        return folded

    @classmethod
    def read(cls, kafka: KafkaSettings, topics: Topics, *, idle_s: float = 1.0) -> "ErasureSet":
        """Every erasure on the topic now (a missing topic is an empty set: nothing was ever erased)."""
        from adaptloop.errors import BrokerError
        from adaptloop.records import read_decoded

        try:
            erasures = read_decoded(kafka, topics.name("erasures"), "erasure", idle_s=idle_s, timeout_s=120)
        except BrokerError as exc:
            if "does not exist" in str(exc):
                return cls()
            raise
        return cls.of(p.record for p in erasures)
