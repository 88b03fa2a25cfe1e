"""PII redaction, applied to every interaction and outcome before anything is stored downstream.

    redactor = Redactor(custom={"employee": r"EMP-\\d{6}"})
    result = redactor.redact("mail bob@example.com or call +1 415-555-2671")
    result.text        # 'mail [EMAIL] or call [PHONE]'
    result.counts      # {'email': 1, 'phone': 1}
    result.subjects    # {'bob@example.com', '+14155552671'}  (identifiers of people, for erasure keys)

The detectors of each kind are in ``adaptloop.streams.pii_detectors``; here is the policy: which rules run, in
which order, what replaces a match, which values are people's identifiers.

Values of the kinds that identify a person (e-mail, phone, IBAN, card, IP, user patterns) are
returned as ``subjects``; curation stores only their salted hashes (``adaptloop.erasure.subject_key``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping

from adaptloop.streams.pii_detectors import (CARD, EMAIL, IBAN, IP, PHONE, SECRET, Match, find_cards, find_emails,
                                             find_ibans, find_ips, find_secrets, phone_finder)

BUILTIN_RULES = (SECRET, EMAIL, IBAN, CARD, IP, PHONE)  # the order they run in
#: Rules whose values identify a person (their subject keys go into the example).
SUBJECT_RULES = frozenset({EMAIL, PHONE, CARD, IBAN, IP})
PLACEHOLDER = {EMAIL: "[EMAIL]", PHONE: "[PHONE]", CARD: "[CARD]", IBAN: "[IBAN]", IP: "[IP]", SECRET: "[SECRET]"}
#: Texts up to this long are redacted once and then served from a cache: system prompts and tool
#: definitions repeat on every interaction of an agent.
CACHED_TEXT_CHARS = 8192
REDACTION_CACHE_SIZE = 2048


@dataclass
class Redaction:
    """What ``Redactor.redact`` found: the redacted text, counts per rule, identifiers of people."""

    text: str
    counts: Counter = field(default_factory=Counter)
    subjects: set[str] = field(default_factory=set)


class Redactor:
    """Find and replace PII in text; ``custom`` maps a rule name to a regex (a user's own patterns)."""

    def __init__(self, *, custom: Mapping[str, str] | None = None, phone_region: str = "US",
                 rules: tuple[str, ...] = BUILTIN_RULES) -> None:
        unknown = set(rules) - set(BUILTIN_RULES)
        if unknown:
            raise ValueError(f"unknown PII rules {sorted(unknown)}; known: {BUILTIN_RULES}")
        finders: dict[str, Callable[[str], Iterator[Match]]] = {
            SECRET: find_secrets, EMAIL: find_emails, IBAN: find_ibans, CARD: find_cards, IP: find_ips,
            PHONE: phone_finder(phone_region)}
        self._finders = [(rule, finders[rule]) for rule in BUILTIN_RULES if rule in rules]
        self._custom = []
        for name, pattern in (custom or {}).items():
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"PII pattern {name!r} is not a regex: {exc}") from exc
            self._custom.append((f"custom:{name}", compiled))
        self._cached = lru_cache(maxsize=REDACTION_CACHE_SIZE)(self._redact_text)

    def _custom_finder(self, rule: str, pattern: re.Pattern) -> Callable[[str], Iterator[Match]]:
        return lambda text: (Match(rule, m.start(), m.end(), m.group()) for m in pattern.finditer(text) if m.group())

    def redact(self, text: str, into: Redaction | None = None) -> Redaction:
        """Run every rule in order, each on the text the previous ones left (placeholders are inert)."""
        result = into or Redaction(text)
        redacted, counts, subjects = (self._cached if len(text) <= CACHED_TEXT_CHARS else self._redact_text)(text)
        result.counts.update(dict(counts))
        result.subjects.update(subjects)
        result.text = redacted
        return result

    def _redact_text(self, text: str) -> tuple[str, tuple[tuple[str, int], ...], frozenset[str]]:
        counts: dict[str, int] = {}
        subjects: set[str] = set()
        finders = self._finders + [(rule, self._custom_finder(rule, pattern)) for rule, pattern in self._custom]
        for rule, find in finders:
            matches = _non_overlapping(find(text))
            if not matches:
                continue
            placeholder = PLACEHOLDER.get(rule, f"[{rule.upper()}]")
            pieces, position = [], 0
            for match in matches:  # joined once: splicing each match in would copy the text once per match
                pieces += [text[position:match.start], placeholder]
                position = match.end
                if rule in SUBJECT_RULES or rule.startswith("custom:"):
                    subjects.add(match.value)
            text = "".join(pieces) + text[position:]
            counts[rule] = counts.get(rule, 0) + len(matches)
        return text, tuple(counts.items()), frozenset(subjects)


def _non_overlapping(matches: Iterator[Match]) -> list[Match]:
    """Longest first wins where two matches overlap; sorted by position."""
    chosen: list[Match] = []
    for match in sorted(matches, key=lambda m: (m.start, -(m.end - m.start))):
        if chosen and match.start < chosen[-1].end:
            continue
        chosen.append(match)
    return chosen


def redact_record(record: dict[str, Any], redactor: Redactor, paths: tuple[str, ...]) -> Redaction:
    """Redact the text fields of an Interaction or Outcome dict in place; return what fired.

    ``paths`` names top-level string fields; lists of messages / tool calls and string maps are
    walked (``request_messages[].content``, ``tool_calls[].arguments``, ``attributes{}``).
    """
    total = Redaction("")
    for path in paths:
        value = record.get(path)
        if isinstance(value, str):
            record[path] = redactor.redact(value, total).text
        elif isinstance(value, list):
            for item in value:
                for sub in ("content", "arguments"):
                    if isinstance(item, dict) and isinstance(item.get(sub), str):
                        item[sub] = redactor.redact(item[sub], total).text
        elif isinstance(value, dict):
            for k, v in list(value.items()):
                if isinstance(v, str):
                    value[k] = redactor.redact(v, total).text
    return total


INTERACTION_TEXT = ("request_messages", "response", "tool_calls", "tools_json", "attributes")
OUTCOME_TEXT = ("correction", "reason")
