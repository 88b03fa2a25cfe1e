"""Configured task validators: JSON schema, regex, normalized exact match, registered callables."""

from __future__ import annotations

import pytest

from adaptloop.errors import ConfigError
from adaptloop.streams.validators import task_specs

SPECS = task_specs({
    "ticket": {"validator": "json_schema", "schema": {"type": "object", "required": ["id"],
                                                       "properties": {"id": {"type": "integer"}}}},
    "intent": {"validator": "regex", "pattern": "(refund|cancel|other)"},
    "capital": {"validator": "exact", "expected": ["Paris", "Rome"]},
    "orders": {"validator": "order_json"},
})


@pytest.mark.parametrize("task, response, ok", [
    ("ticket", '{"id": 3}', True), ("ticket", '{"id": "3"}', False), ("ticket", "{}", False), ("ticket", "no", False),
    ("intent", "refund", True), ("intent", " cancel ", True), ("intent", "refund please", False),
    ("capital", '"paris."', True), ("capital", "Lyon", False),
    ("orders", "{}", False),
])
def test_verdicts(task, response, ok):
    assert SPECS[task].judge(response).ok is ok, SPECS[task].judge(response)


def test_references_and_scorer_names():
    assert SPECS["capital"].judge("Rome", reference="rome").ok and not SPECS["capital"].judge("Rome", reference="Paris").ok
    assert SPECS["ticket"].scorer == "json_schema:ticket@1" and "order-extract" in SPECS
    assert "schema: 'id' is a required property" == SPECS["ticket"].judge("{}").reason


@pytest.mark.parametrize("config, message", [
    ({"x": {"validator": "nope"}}, "no validator 'nope'"),
    ({"x": {"validator": "regex", "pattern": "("}}, "not a regex"),
    ({"x": {"validator": "json_schema", "schema": {"type": 5}}}, "not a JSON schema"),
    ({"x": {}}, "validator must be one of"),
])
def test_bad_configuration_is_refused_at_start(config, message):
    with pytest.raises(ConfigError, match=message):
        task_specs(config)
