"""Session fixtures: a real Tansu broker on a free loopback port, unique topics per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from adaptloop.kafka import ensure_topics
from adaptloop.ops.stack import free_port
from adaptloop.settings import KafkaSettings, Topics

REPO = Path(__file__).resolve().parent.parent

#: Two pytest workers share the machine's cores, so a training (2 torch threads) often runs beside another or
#: beside vLLM. OpenMP's threads spin while they wait by default, and oversubscribed they spin on each other's
#: cores: two such trainings at once made 33 tokens/s each, 82 each with idle threads sleeping (alone: 139
#: spinning, 121 sleeping; 2-core AMD EPYC). Set before anything loads torch; every process the tests start
#: inherits it (vLLM gets it from its own setting already).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: The test command runs two pytest workers (``-n 2 --dist loadscope --no-loadscope-reorder``), and
#: ``work_unit`` decides what one worker runs together. A module's tests share its fixtures (one Faust
#: worker, one vLLM, one Ray), so a module is one unit of work; the modules that only train (Ray) are one
#: unit, and the modules that start a vLLM of their own for a few tests another; each unit test is a unit of
#: its own. The heavy units are collected first, longest first, so that the two workers' shares come out
#: about even (measured: Ray's ~32 min, the tool task's ~21, vLLM's ~15, your task's ~12 on 2 cores), and the
#: rest go to whichever worker is free.
#: Not xdist's ``loadgroup`` marks: with pytest 9.2 they group nothing (pytest-dev/pytest-xdist#1386).
SHARED_SCOPES = {
    "test_trainer.py": "ray", "test_lineage_forget_stack.py": "ray",
    "test_loop.py": "vllm", "test_serving.py": "vllm", "test_tools.py": "vllm",
}
#: The heavy units, longest first: the tool task and your task each start a whole stack and train on their own.
FIRST_SCOPES = ("ray", "tests/e2e/test_tool_task.py", "vllm", "tests/integration/test_your_task.py")


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its shared scope, its module, or (a unit test) itself."""
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/unit/"):
        return nodeid
    return SHARED_SCOPES.get(path.rsplit("/", 1)[-1], path)


def pytest_collection_modifyitems(config, items) -> None:
    order = {scope: n for n, scope in enumerate(FIRST_SCOPES)}
    items.sort(key=lambda item: order.get(work_unit(item.nodeid), len(order)))


class SharedScopeScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return work_unit(nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    return SharedScopeScheduling(config, log) if config.getvalue("dist") == "loadscope" else None


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def kafka(stack_home) -> KafkaSettings:
    """A real Tansu broker for the whole session (memory storage), stopped at the end."""
    from adaptloop.ops.stack import start_broker

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
