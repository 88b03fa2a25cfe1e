"""Validators: what judges one answer of a task, and the ``Verdict`` it gives.

A validator is called as ``validator(response, reference=None)``. The catalogue (``adaptloop.tasks``) builds one
per task from its declarative kind (``json_schema``, ``regex``, ``exact``) or imports a ``python`` one, which
``@validator`` makes always return a ``Verdict``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from adaptloop.errors import ConfigError


@dataclass(frozen=True)
class Verdict:
    ok: bool
    score: float
    reason: str


class Validator(Protocol):
    def __call__(self, response: str, reference: str | None = None) -> Verdict: ...


def verdict_of(what: str, function: Callable[..., Any], *args: Any) -> Verdict:
    """``function(*args)`` as a Verdict: a bool becomes one; an exception (a ``RecursionError`` on deep nesting, a
    user function's bug) or another type becomes a failed one naming it."""
    try:
        verdict = function(*args)
    except (RecursionError, MemoryError) as exc:
        return Verdict(False, 0.0, f"{what} failed: {type(exc).__name__}")
    except Exception as exc:  # noqa: BLE001 -- a user's function may raise anything; the answer fails, with why
        return Verdict(False, 0.0, f"{what} failed: {type(exc).__name__}: {str(exc)[:200]}")
    if isinstance(verdict, bool):
        return Verdict(verdict, float(verdict), "accepted" if verdict else "rejected")
    if not isinstance(verdict, Verdict):
        return Verdict(False, 0.0, f"{what} returned {type(verdict).__name__}, not a Verdict or a bool")
    return verdict


def validator(function: Callable[..., Any]) -> Validator:
    """Makes ``function(response, reference=None)`` returning a ``Verdict`` or a bool a task's validator: the
    catalogue names it (``validator: {kind: python, function: "my_agent:name"}``) and every call gives a
    ``Verdict`` (a bool becomes one; an exception a failed one naming it). Registers nothing: the catalogue
    is where a task meets its validator."""

    @functools.wraps(function)
    def judged(response: str, reference: str | None = None) -> Verdict:
        return verdict_of(function.__qualname__, function, response, reference)

    return judged


def turn_by_turn(judge: Callable[[str, str], Verdict], turns: Sequence[str], right_turns: Sequence[str]) -> Verdict:
    """An episode judged by its turns: each right by ``judge`` against the right one, none missing."""
    for k, (turn, right) in enumerate(zip(turns, right_turns), start=1):
        verdict = judge(turn, right)
        if not verdict.ok:
            return Verdict(False, (k - 1) / len(right_turns), f"turn {k}: {verdict.reason}")
    if len(turns) < len(right_turns):
        return Verdict(False, len(turns) / len(right_turns),
                       f"the episode stopped after {len(turns)} of {len(right_turns)} turns")
    return Verdict(True, 1.0, "every turn right")



# -- validators of the declarative kinds ---------------------------------------------------------

def normalize(text: str) -> str:
    text = " ".join(text.split()).casefold().strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()


def json_schema_validator(schema: Mapping[str, Any]) -> Validator:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"not a JSON schema: {exc.message}") from exc
    checker = jsonschema.Draft202012Validator(schema)

    def judge(response: str, reference: str | None = None) -> Verdict:
        try:
            value = json.loads(response)
        except ValueError as exc:
            return Verdict(False, 0.0, f"not JSON: {exc}")
        errors = sorted(checker.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            return Verdict(False, 0.0, f"schema: {errors[0].message}")
        if reference is not None and value != json.loads(reference):
            return Verdict(False, 0.0, "valid, but not the reference")
        return Verdict(True, 1.0, "valid")
    return judge


def regex_validator(pattern: str) -> Validator:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"not a regex: {pattern!r}: {exc}") from exc

    def judge(response: str, reference: str | None = None) -> Verdict:
        if not compiled.fullmatch(response.strip()):
            return Verdict(False, 0.0, f"does not match {pattern!r}")
        if reference is not None and normalize(response) != normalize(reference):
            return Verdict(False, 0.0, "matches, but not the reference")
        return Verdict(True, 1.0, "matches")
    return judge


def exact_validator(expected: list[str]) -> Validator:
    allowed = {normalize(e) for e in expected}

    def judge(response: str, reference: str | None = None) -> Verdict:
        answer = normalize(response)
        if not answer:
            return Verdict(False, 0.0, "empty answer")
        if allowed and answer not in allowed:
            return Verdict(False, 0.0, f"{answer[:80]!r} is none of the expected answers")
        if reference is not None and answer != normalize(reference):
            return Verdict(False, 0.0, "not the reference")
        return Verdict(True, 1.0, "exact match" if reference is not None or allowed else "non-empty")
    return judge
