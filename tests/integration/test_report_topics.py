"""``adaptloop report`` from real topics: records produced to the session's Tansu broker, read back
over it, shaped and drawn. (The whole loop writing the report is tests/e2e/test_loop.py.)"""

from __future__ import annotations

import json

import pytest

from adaptloop.demo_tasks import case_generator
from adaptloop.kafka import DeliveryTracker
from adaptloop.ops.report import build_report
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.sdk import build_interaction, build_outcome
from adaptloop.streams import stages
from adaptloop.tasks import example_catalogue

pytestmark = pytest.mark.integration

PAIRS = (("acme", "order-extract"), ("globex", "ticket-triage"))


def _send(producer: DeliveryTracker, topics, which: str, stem: str, record: dict, key: str | None = None) -> None:
    topic = topics.name(which)
    producer.send(topic, serde_for(stem).serialize(record, SerdeContext(topic)), key=key)


def test_report_renders_from_real_topics(kafka, topics, tmp_path):
    producer = DeliveryTracker(kafka)
    t0 = 1_800_000_000_000
    for tenant, task in PAIRS:
        spec = example_catalogue().get(task)
        version = f"{tenant}--{task}--0123456789ab"
        for i, case in enumerate(case_generator(task, 1).cases(12)):
            served = version if i >= 6 else None
            answer = case.answer if served else "Sure, here it is."  # the base fails, the adapter answers right
            interaction = build_interaction(tenant=tenant, agent="t", task=task, session_id=f"s{i}",
                                            messages=[{"role": "user", "content": case.sentence}], response=answer,
                                            base_model="smollm2", adapter=(f"{tenant}/{task}", served) if served else None,
                                            event_time=t0 + i * 10_000)
            verdict = spec.judge(answer, case.answer)
            outcome = build_outcome(interaction["interaction_id"], tenant=tenant, source="HUMAN", success=verdict.ok,
                                    correction=None if verdict.ok else case.answer, event_time=t0 + i * 10_000 + 500)
            _send(producer, topics, "interactions", "interaction", interaction, interaction["interaction_id"])
            _send(producer, topics, "outcomes", "outcome", outcome, interaction["interaction_id"])
            ref = stages.SourceRef(topics.name("interactions"), 0, i)
            example = stages.score(interaction, outcome, interaction_ref=ref, outcome_ref=ref, spec=spec,
                                   holdout_percent=25, curated_at=t0 + i * 10_000 + 900)
            _send(producer, topics, "curated", "curated_example", example, stages.curated_key(tenant, task))
        _send(producer, topics, "releases", "adapter_release", {
            "version": version, "tenant": tenant, "task": task, "state": "RELEASED", "reason": "candidate 0.9 >= base 0.0",
            "base_model": "smollm2", "artifact_uri": "/nowhere", "digest": "sha256:00", "lora_rank": 16, "method": "sft",
            "evaluation": {"metric": "success_rate", "holdout_count": 3, "candidate_score": 1.0, "incumbent": "base",
                           "incumbent_score": 0.0, "margin": 0.05},
            "lineage": {"request_id": f"r-{tenant}", "dataset_digest": "sha256:11", "examples": [],
                        "train_example_ids": ["a", "b"], "code_version": "t", "config_json": "{}"},
            "created_at": t0 + 55_000, "training_json": json.dumps({"loss_curve": [[2, 1.4], [4, 0.3]]}),
            "evidence_json": json.dumps({"candidate": "3/3", "incumbent": "0/3"})}, version)
    # A dead letter whose original bytes are not a record at all: unattributed.
    _send(producer, topics, "dead_letters", "dead_letter", {
        "source_topic": topics.name("interactions"), "source_partition": 0, "source_offset": 99, "key": b"k",
        "value": b"not avro", "stage": "decode", "error_type": "DeserializationError", "reason": "bad magic",
        "failed_at": t0})
    producer.flush()

    pages = build_report(kafka, topics, tmp_path, demo={"measurements": [
        {"tenant": "acme", "task": "order-extract", "cycle": 0, "at_ms": t0 + 30_000, "success": 0.0, "count": 6,
         "served_by": ["base"]}]})

    assert sorted(p.name for p in pages) == ["acme--order-extract.html", "globex--ticket-triage.html"]
    page = (tmp_path / "acme--order-extract.html").read_text()
    assert "RELEASED" in page and "&#34;candidate&#34;: &#34;3/3&#34;" in page
    # Six base answers failed, six adapter answers succeeded: the per-version table says so.
    assert "<td>base</td><td>6</td><td>0</td>" in page and "<td>acme--order-extract--0123456789ab</td><td>6</td><td>6</td>" in page
    assert "could not be attributed to a tenant: 1" in (tmp_path / "index.html").read_text()
    for tenant, task in PAIRS:
        for png in ("success", "loss", "funnel"):
            assert (tmp_path / f"{tenant}--{task}-{png}.png").stat().st_size > 5000
