from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from adaptloop.artifacts import adapter_version, artifact_digest, lora_int_id, verify_digest
from adaptloop.errors import ArtifactError, ConfigError
from adaptloop.settings import DEFAULT_BOOTSTRAP, KafkaSettings, StreamsSettings, Topics
from adaptloop.demo_tasks import OrderGenerator
from adaptloop.tasks import example_catalogue


def test_unknown_settings_are_refused():
    with pytest.raises(ValidationError):
        StreamsSettings(window_sise=3)


def test_naming_a_cluster_means_no_embedded_broker(monkeypatch):
    assert KafkaSettings().embedded and KafkaSettings().bootstrap_servers == DEFAULT_BOOTSTRAP
    monkeypatch.setenv("ADAPTLOOP_KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9093")
    settings = KafkaSettings()
    assert not settings.embedded and settings.idempotence


def test_sasl_needs_credentials_and_keeps_the_secret_secret():
    with pytest.raises((ConfigError, ValidationError)):
        KafkaSettings(security_protocol="SASL_SSL")
    settings = KafkaSettings(bootstrap_servers="k:9093", security_protocol="SASL_SSL",
                             sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p4ss")
    assert "p4ss" not in repr(settings)
    assert settings.client_config()["sasl.password"] == "p4ss"


def test_topic_layout_is_explicit_and_prefixed():
    layout = Topics(prefix="x.").layout()
    assert layout["x.serving.status"] == (1, {"cleanup.policy": "compact"})
    assert all(name.startswith("x.") for name in layout)


def test_order_validator_form_and_content():
    spec = example_catalogue().get("order-extract")
    case = OrderGenerator(seed=1).case()
    assert spec.judge(case.answer).ok
    assert spec.judge(case.answer, case.answer).ok
    wrong = json.dumps(case.truth | {"quantity": case.truth["quantity"] + 1})
    verdict = spec.judge(wrong, case.answer)
    assert not verdict.ok and "quantity" in verdict.reason
    assert not spec.judge("Sure! Here is the JSON: {").ok
    assert not spec.judge(json.dumps({"customer": "x"})).ok
    with pytest.raises(ConfigError):
        example_catalogue().get("nope")


def test_generator_is_reproducible():
    assert OrderGenerator(7).cases(5) == OrderGenerator(7).cases(5)
    assert OrderGenerator(7).cases(5) != OrderGenerator(8).cases(5)


def test_digest_names_content_and_ids_are_stable(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "w.bin").write_bytes(b"abc")
    digest = artifact_digest(tmp_path)
    verify_digest(tmp_path, digest)
    (tmp_path / "w.bin").write_bytes(b"abd")
    with pytest.raises(ArtifactError, match="mismatch"):
        verify_digest(tmp_path, digest)
    version = adapter_version("acme", "order-extract", digest)
    assert version.startswith("acme--order-extract--") and lora_int_id(version) == lora_int_id(version) > 0


def test_ticket_validator_form_and_content():
    from adaptloop.demo_tasks import TicketGenerator

    spec = example_catalogue().get("ticket-triage")
    case = TicketGenerator(seed=3).case()
    assert spec.judge(case.answer).ok and spec.judge(case.answer, case.answer).ok
    other = "low" if case.truth["priority"] != "low" else "high"
    verdict = spec.judge(json.dumps(case.truth | {"priority": other}), case.answer)
    assert not verdict.ok and verdict.score == 0.5 and "priority" in verdict.reason
    assert not spec.judge(json.dumps({"category": "sales", "priority": "low"})).ok
    assert not spec.judge(json.dumps(case.truth | {"extra": 1})).ok
    assert not spec.judge("The category is billing and the priority is high.").ok


def test_ticket_generator_is_reproducible_varied_and_covers_every_label():
    from adaptloop.demo_tasks import TICKET_CATEGORIES, TICKET_PRIORITIES, TicketGenerator, case_generator

    cases = TicketGenerator(5).cases(200)
    assert cases[:5] == TicketGenerator(5).cases(5) and cases[:5] != TicketGenerator(6).cases(5)
    assert len({c.sentence for c in cases}) == len(cases)  # varied: no exact repeats for the dedupe to drop
    assert {c.truth["category"] for c in cases} == set(TICKET_CATEGORIES)
    assert {c.truth["priority"] for c in cases} == set(TICKET_PRIORITIES)
    assert case_generator("ticket-triage", 5).cases(3) == cases[:3]
    assert case_generator("order-extract", 5).cases(2) == OrderGenerator(5).cases(2)
    with pytest.raises(ConfigError):
        case_generator("nope", 1)


def test_topic_configs_keep_what_must_be_kept_and_expire_raw_inputs():
    """Erasures and every release decision and training request never expire and are never compacted away (a
    compacted releases topic would keep only each version's last state); raw inputs expire after a configurable
    retention; a cluster's replication settings reach every topic."""
    from adaptloop.kafka import replication_config
    from adaptloop.settings import KafkaSettings, Topics

    layout = Topics().layout()
    for which in ("erasures", "releases", "training_requests"):
        config = layout[Topics().name(which)][1]
        assert config["retention.ms"] == "-1" and config["cleanup.policy"] == "delete", which
    for which in ("interactions", "outcomes", "dead_letters"):
        assert layout[Topics().name(which)][1]["retention.ms"] == str(30 * 24 * 3_600_000)
    assert Topics(raw_retention_ms=3_600_000).layout()["agent.interactions"][1]["retention.ms"] == "3600000"
    cluster = KafkaSettings(bootstrap_servers="kafka:9093", replication_factor=3, min_insync_replicas=2)
    assert replication_config(cluster) == {"min.insync.replicas": "2"} and replication_config(KafkaSettings()) == {}
