"""The public face: ``from adaptloop import ...`` gives what an agent needs, cheaply; the one topic reader decodes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import adaptloop
from adaptloop.errors import DeserializationError
from adaptloop.records import Positioned, decode_all
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.sdk import build_outcome


def test_every_public_name_imports():
    from adaptloop import AdaptloopError, KafkaSettings, Recorder, Task, Topics, Verdict, validator  # noqa: F401

    assert all(getattr(adaptloop, name) is not None for name in adaptloop.__all__)
    assert set(adaptloop.__all__) <= set(dir(adaptloop))
    with pytest.raises(AttributeError):
        adaptloop.NoSuchName  # noqa: B018


def test_importing_adaptloop_imports_no_heavy_library():
    heavy = ("torch", "transformers", "faust", "vllm", "ray", "confluent_kafka", "httpx", "pydantic", "fastavro")
    code = f"import sys, adaptloop; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_validator_turns_what_a_function_returns_into_a_verdict():
    from adaptloop import Verdict, validator

    @validator
    def is_refund(response, reference=None):
        if response == "boom":
            raise ValueError("no")
        return response.strip() == "refund"

    assert is_refund("refund") == Verdict(True, 1.0, "accepted")
    assert is_refund("cancel").ok is False
    failed = is_refund("boom")
    assert not failed.ok and "ValueError: no" in failed.reason
    assert is_refund.__name__ == "is_refund"  # the catalogue names it by module:function


class Message:
    """What the reader needs of a confluent-kafka message."""

    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset = value, offset

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "agent.outcomes"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def test_decode_all_keeps_positions_and_lists_or_raises_what_does_not_decode():
    record = build_outcome("i1", tenant="acme", source="HUMAN", success=True, outcome_id="o1", event_time=1)
    good = serde_for("outcome").serialize(record, SerdeContext("agent.outcomes"))
    messages = [Message(good, 0), Message(b"not avro", 1)]
    undecodable: list[str] = []
    assert decode_all(messages, "outcome", undecodable=undecodable) == [Positioned("agent.outcomes", 0, 0, record)]
    assert len(undecodable) == 1 and "offset=1" in undecodable[0]
    with pytest.raises(DeserializationError):
        decode_all(messages, "outcome")
