"""Session fixtures: a real Tansu broker on a free loopback port, unique topics per test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from adaptloop.kafka import ensure_topics
from adaptloop.settings import KafkaSettings, Topics
from adaptloop.stack import free_port

REPO = Path(__file__).resolve().parent.parent

#: The test command runs two pytest workers (``-n 2 --dist loadgroup``). A module's tests share its
#: fixtures (one Faust worker, one vLLM, one Ray), so a module stays on one worker; the modules that
#: start Ray jobs share a worker, and so do the two that start vLLM, so the heaviest of each kind never
#: run at once. Everything else goes to whichever worker is free. On 2 cores one pytest alone left the
#: CPUs idle while tests waited on group joins, grace periods and process starts.
XDIST_GROUPS = {
    "test_trainer.py": "ray", "test_lineage_forget_stack.py": "ray",
    "test_loop.py": "vllm", "test_serving.py": "vllm",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.path.name
        if item.path.parent.name == "unit":
            continue
        item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS.get(module, module)))


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def kafka(stack_home) -> KafkaSettings:
    """A real Tansu broker for the whole session (memory storage), stopped at the end."""
    from adaptloop.stack import start_broker

    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", embedded=True)
    broker = start_broker(settings, stack_home)
    yield settings
    broker.stop()


def fresh_topics(kafka: KafkaSettings) -> Topics:
    """Every adaptloop topic under a prefix of its own, created now."""
    names = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, names)
    return names


@pytest.fixture
def topics(kafka) -> Topics:
    """Topics of this test alone."""
    return fresh_topics(kafka)


@pytest.fixture(scope="module")
def module_topics(kafka) -> Topics:
    """Topics shared by the tests of one module (one worker or one trainer serves them all)."""
    return fresh_topics(kafka)
