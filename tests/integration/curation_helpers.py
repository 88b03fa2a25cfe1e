"""Helpers shared by the curation integration tests: worker environments, reading topics, datasets."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from adaptloop.kafka import DeliveryTracker, Range
from adaptloop.ops.stack import free_port, service_env
from adaptloop.records import read_decoded
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import KafkaSettings, Topics
from adaptloop.tasks import EXAMPLE_CATALOGUE, example_catalogue

TASK = "order-extract"
SYSTEM = {"role": "system", "content": example_catalogue().get(TASK).system_prompt}
READY_TIMEOUT_S = 90.0
RESULT_TIMEOUT_S = 60.0


def worker_env(kafka: KafkaSettings, topics: Topics, home: Path, app_id: str | None = None, *,
               extra_tasks: str = "", **settings: object) -> dict[str, str]:
    """A curation worker's environment on ``topics``; ``settings`` are ADAPTLOOP_STREAMS_* overrides (lower case).
    ``extra_tasks``: catalogue entries (YAML, indented under ``tasks:``) beside the example catalogue's,
    written to a catalogue file the worker reads as a user's would (``ADAPTLOOP_TASKS_FILE``)."""
    home.mkdir(parents=True, exist_ok=True)
    catalogue = home / "tasks.yaml"
    catalogue.write_text(EXAMPLE_CATALOGUE.read_text() + extra_tasks)
    env = service_env(kafka, topics, home) | {
        "ADAPTLOOP_TASKS_FILE": str(catalogue),
        "ADAPTLOOP_STREAMS_WEB_PORT": str(free_port()),
        "ADAPTLOOP_STREAMS_APP_ID": app_id or f"curation-{uuid.uuid4().hex[:8]}",
        "ADAPTLOOP_STREAMS_DATA_DIR": str(home / "faust"),
        "ADAPTLOOP_STREAMS_OUTCOME_GRACE_S": "1",
        "ADAPTLOOP_STREAMS_TICK_S": "0.5",
    }
    for key, value in settings.items():
        env[f"ADAPTLOOP_STREAMS_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def produce(kafka: KafkaSettings, topic: str, stem: str, records: list[dict], key: Callable[[dict], str],
            timeout_s: float = 30.0) -> None:
    """``records`` as Avro of ``stem`` on ``topic``, each keyed by ``key(record)``, acknowledged."""
    serde = serde_for(stem)
    producer = DeliveryTracker(kafka)
    for record in records:
        producer.send(topic, serde.serialize(record, SerdeContext(topic)), key=key(record))
    producer.flush(timeout_s)


def read_all(kafka: KafkaSettings, topic: str, stem: str, idle_s: float = 1.5) -> list[tuple[int, int, dict]]:
    """(partition, offset, record) of everything on ``topic`` now."""
    return [(p.partition, p.offset, p.record) for p in read_decoded(kafka, topic, stem, idle_s=idle_s, timeout_s=60)]


def wait_until(kafka: KafkaSettings, topic: str, stem: str, done: Callable[[list], bool],
               timeout_s: float = RESULT_TIMEOUT_S) -> list[tuple[int, int, dict]]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_all(kafka, topic, stem)
        if done(records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic}: condition not met after {timeout_s}s; have {len(records)} records")
        time.sleep(0.5)


def dataset_of(kafka: KafkaSettings, request: dict) -> dict[str, dict]:
    """What a trainer makes of a request: the named ranges, this tenant/task, admitted, one record per example id."""
    examples: dict[str, dict] = {}
    for span in request["examples"]:
        for positioned in read_decoded(kafka, span["topic"], "curated_example",
                                       [Range(span["partition"], span["start_offset"], span["end_offset"])], timeout_s=60):
            record = positioned.record
            if record["tenant"] == request["tenant"] and record["task"] == request["task"] and record["admitted"]:
                examples.setdefault(record["example_id"], record)
    return examples


def get_json(port: str | int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def get_text(port: str | int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def messages(user: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": user}]
