"""adaptloop's exceptions: one root, one subclass per area.

    AdaptloopError
    ├── ConfigError            settings that cannot work together
    ├── SchemaError            a schema file is missing, unparsable or incompatible
    ├── SerdeError             a record could not be encoded or decoded
    │   ├── SerializationError
    │   └── DeserializationError   (names topic, partition and offset)
    ├── ContractError          a decoded record breaks the contract (impossible values)
    ├── BrokerError            the Kafka-protocol broker refused, failed or did not answer in time
    │   └── DeliveryError      a produced record was not acknowledged
    ├── StackError             a local process could not be started, or did not become ready in time
    ├── TrainingError          a training request could not be turned into an adapter
    │   └── ReleaseCheckError  an adapter (or the plan for one) breaks a rule of vLLM's LoRA loading
    ├── ArtifactError          an adapter artifact is missing or its digest does not match
    └── ServingError           vLLM refused an adapter, or no replica can serve an alias
        ├── AuthError          a gateway request without a valid API key, or for another tenant
        └── FeedbackError      the gateway did not take a feedback (its status and message)
"""

from __future__ import annotations


class AdaptloopError(Exception):
    """Root of every error adaptloop raises on purpose."""


class ConfigError(AdaptloopError):
    """Settings that cannot work together."""


class SchemaError(AdaptloopError):
    """A schema file is missing, unparsable or incompatible with its predecessor."""


class SerdeError(AdaptloopError):
    """A record could not be encoded or decoded."""


class SerializationError(SerdeError):
    """A record does not fit its schema."""


class DeserializationError(SerdeError):
    """Bytes from a topic are not a record of the expected schema."""

    def __init__(self, message: str, *, topic: str | None = None,
                 partition: int | None = None, offset: int | None = None) -> None:
        where = f" (topic={topic} partition={partition} offset={offset})" if topic else ""
        super().__init__(message + where)
        self.reason = message
        self.topic = topic
        self.partition = partition
        self.offset = offset


class ContractError(AdaptloopError):
    """A decoded record breaks the contract: an impossible value, an unknown tenant."""


class BrokerError(AdaptloopError):
    """The Kafka-protocol broker refused, failed or did not answer in time."""


class DeliveryError(BrokerError):
    """A produced record was not acknowledged by the broker."""


class StackError(AdaptloopError):
    """A local process could not be started or did not become ready in time."""


class TrainingError(AdaptloopError):
    """A training request could not be turned into an adapter."""


class ReleaseCheckError(TrainingError):
    """An adapter (or the plan for one) breaks a rule of vLLM's LoRA loading (rank, modules_to_save, DoRA, targets)."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("adapter breaks vLLM's rules: " + "; ".join(violations))
        self.violations = list(violations)


class ArtifactError(AdaptloopError):
    """An adapter artifact is missing or its digest does not match."""


class ServingError(AdaptloopError):
    """vLLM refused an adapter, or no replica can serve an alias."""


class AuthError(ServingError):
    """A gateway request without a valid API key, or for an alias of another tenant."""


class FeedbackError(ServingError):
    """The gateway did not take a feedback: ``status`` and ``message`` say why (nothing was recorded)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"feedback refused ({status}): {message}")
        self.status = status
        self.message = message
