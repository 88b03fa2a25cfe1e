"""Task validators configured by the user, beside the Python callables registered by name.

    ADAPTLOOP_STREAMS_TASKS='{"intent": {"validator": "regex", "pattern": "(refund|cancel|other)"},
                              "ticket": {"validator": "json_schema", "schema": {"type": "object", "required": ["id"]}},
                              "capital": {"validator": "exact", "expected": ["Paris", "Rome"]},
                              "orders": {"validator": "order_json"}}'

Kinds: ``json_schema`` (jsonschema, the reference implementation), ``regex`` (the whole answer must
match), ``exact`` (normalized exact match: casefolded, whitespace collapsed, surrounding quotes and a
final period dropped; against ``expected`` and, in evaluation, the reference answer), or the name of
a validator registered with ``adaptloop.tasks.register_validator`` (a Python callable). Each
configured task registers its validator as ``<kind>:<task>`` so a TaskSpec can name it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import jsonschema

from adaptloop.errors import ConfigError
from adaptloop.tasks import BUILTIN_TASKS, TaskSpec, Verdict, register_validator, validator

KINDS = ("json_schema", "regex", "exact")


def normalize(text: str) -> str:
    text = " ".join(text.split()).casefold().strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()


def _json_schema(schema: Mapping[str, Any]):
    try:
        checker = jsonschema.Draft202012Validator(schema)
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"not a JSON schema: {exc.message}") from exc

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


def _regex(pattern: str):
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


def _exact(expected: list[str] | None):
    allowed = {normalize(e) for e in expected or ()}

    def judge(response: str, reference: str | None = None) -> Verdict:
        answer = normalize(response)
        if not answer:
            return Verdict(False, 0.0, "empty answer")
        if allowed and answer not in allowed:
            return Verdict(False, 0.0, f"{answer!r} is none of the expected answers")
        if reference is not None and answer != normalize(reference):
            return Verdict(False, 0.0, "not the reference")
        return Verdict(True, 1.0, "exact match" if reference is not None or allowed else "non-empty")
    return judge


def task_specs(config: Mapping[str, Mapping[str, Any]]) -> dict[str, TaskSpec]:
    """The built-in tasks plus the configured ones (a configured task may replace a built-in one)."""
    specs = dict(BUILTIN_TASKS)
    for name, entry in config.items():
        kind = entry.get("validator")
        prompt = str(entry.get("system_prompt", ""))
        version = str(entry.get("version", "1"))
        if kind == "json_schema":
            register_validator(f"json_schema:{name}")(_json_schema(entry.get("schema") or {}))
        elif kind == "regex":
            register_validator(f"regex:{name}")(_regex(str(entry.get("pattern", ""))))
        elif kind == "exact":
            register_validator(f"exact:{name}")(_exact(entry.get("expected")))
        elif isinstance(kind, str):
            validator(kind)  # a registered Python callable: refuse an unknown name now, not per record
            specs[name] = TaskSpec(name, kind, prompt, version)
            continue
        else:
            raise ConfigError(f"task {name!r}: validator must be one of {KINDS} or a registered name, not {kind!r}")
        specs[name] = TaskSpec(name, f"{kind}:{name}", prompt, version)
    return specs
