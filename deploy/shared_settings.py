"""The settings every process shares: where its files live, the Kafka-protocol cluster, the topic names, the base
model. Each process's own settings (``adaptloop.settings``) hold these as fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adaptloop.errors import ConfigError

DEFAULT_HOME = Path(os.environ.get("ADAPTLOOP_HOME") or Path.home() / ".cache" / "adaptloop")
DEFAULT_BOOTSTRAP = "127.0.0.1:19092"


def settings_config(prefix: str) -> SettingsConfigDict:
    """Every settings class's: read from the environment under ``prefix``, unknown keys refused, frozen."""
    return SettingsConfigDict(env_prefix=prefix, extra="forbid", frozen=True)


class Topics(BaseSettings):
    """Topic names; ``prefix`` isolates one deployment (or one test) from another on a shared broker."""

    model_config = settings_config("ADAPTLOOP_TOPICS_")

    prefix: str = ""
    interactions: str = "agent.interactions"
    outcomes: str = "agent.outcomes"
    dead_letters: str = "agent.dlq"
    curated: str = "examples.curated"
    training_requests: str = "training.requests"
    releases: str = "adapters.releases"
    erasures: str = "agent.erasures"
    serving_status: str = "serving.status"
    partitions: int = Field(4, description="Partitions of the keyed event topics.")
    raw_retention_ms: int = Field(
        30 * 24 * 3_600_000, ge=-1,
        description="How long the raw inputs (interactions, outcomes, dead letters) stay on their topics; -1 forever. "
                    "Erasure cannot rewrite these immutable logs: erased content stays there until it expires.")

    def name(self, which: str) -> str:
        return self.prefix + getattr(self, which)

    def layout(self) -> dict[str, tuple[int, dict[str, str]]]:
        """Every topic with its partition count and config; created explicitly (brokers' defaults differ: Kafka
        deletes after 7 days, Tansu keeps everything)."""
        raw = {"retention.ms": str(self.raw_retention_ms)}
        forever = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
        return {
            self.name("interactions"): (self.partitions, raw),
            self.name("outcomes"): (self.partitions, raw),
            self.name("dead_letters"): (1, raw),
            self.name("curated"): (self.partitions, {}),
            # One partition: requests and releases are few and their order matters. Every request and every
            # release decision is lineage (compaction would keep only a version's last state): kept forever.
            self.name("training_requests"): (1, forever),
            self.name("releases"): (1, forever),
            # Erasures are few, read whole by every consumer, and must outlive everything they erase.
            self.name("erasures"): (1, forever),
            # One record per sidecar change/heartbeat, keyed by replica; read whole, newest per key wins.
            self.name("serving_status"): (1, {"cleanup.policy": "compact"}),
        }


class KafkaSettings(BaseSettings):
    """How to reach the Kafka-protocol cluster. Unset ``bootstrap_servers`` means the embedded Tansu."""

    model_config = settings_config("ADAPTLOOP_KAFKA_")

    bootstrap_servers: str = DEFAULT_BOOTSTRAP
    embedded: bool = Field(True, description="Start Tansu on loopback; false when bootstrap_servers is a real cluster.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    schema_registry_url: str | None = Field(None, description="Confluent wire format through this registry; else single-object encoding.")
    idempotent_producer: bool | None = Field(
        None, description="Default: off on the embedded Tansu (it loses acked records on a crash with idempotence), on for real Kafka.")
    request_timeout_s: float = 30.0
    delivery_timeout_s: float = Field(30.0, description="A produced record not acknowledged by then is an error for the caller.")
    replication_factor: int = Field(1, ge=1, description="Replicas of every topic adaptloop creates (3 on a production cluster).")
    min_insync_replicas: int | None = Field(
        None, ge=1, description="Replicas that must have a record before it is acknowledged (2 with 3 replicas); unset: the broker's.")

    @model_validator(mode="before")
    @classmethod
    def _external_cluster(cls, values: dict) -> dict:
        # Naming any other cluster means "use it, start no broker", unless embedded is set explicitly.
        if "embedded" not in values:
            values["embedded"] = values.get("bootstrap_servers", DEFAULT_BOOTSTRAP) == DEFAULT_BOOTSTRAP
        return values

    @model_validator(mode="after")
    def _sasl_complete(self) -> "KafkaSettings":
        if self.security_protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ConfigError("SASL needs sasl_mechanism, sasl_username and sasl_password")
        return self

    @property
    def idempotence(self) -> bool:
        return (not self.embedded) if self.idempotent_producer is None else self.idempotent_producer

    def client_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka settings shared by producers, consumers and the admin client."""
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username or ""
            config["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else ""
        if self.ssl_ca_location:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        return config


class ModelSettings(BaseSettings):
    """The base model every adapter is trained on and served with."""

    model_config = settings_config("ADAPTLOOP_MODEL_")

    path: Path | None = Field(None, description="Any HF model folder; unset means the bundled SmolLM2-135M-Instruct.")
    name: str = Field("smollm2-135m-instruct", description="The name vLLM serves the base under.")
