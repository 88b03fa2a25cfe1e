"""The curation app's own topics beside Faust's changelogs, and their explicit creation."""

from __future__ import annotations

from adaptloop.settings import StreamsSettings


def internal_topics(settings: StreamsSettings) -> dict[str, int]:
    """The app's own topics beside Faust's changelogs: name -> partitions (co-partitioned with the inputs)."""
    return {f"{settings.app_id}-scored": settings.topics.partitions, f"{settings.app_id}-ticks": settings.topics.partitions}


def ensure_internal_topics(settings: StreamsSettings) -> None:
    """Create the internal topics explicitly (Tansu's auto-created topics get a partition count of their own)."""
    from confluent_kafka.admin import NewTopic

    from adaptloop.kafka import admin, replication_config

    client = admin(settings.kafka)
    existing = set(client.list_topics(timeout=30).topics)
    wanted = [NewTopic(name, num_partitions=n, replication_factor=settings.kafka.replication_factor,
                       config=replication_config(settings.kafka))
              for name, n in internal_topics(settings).items() if name not in existing]
    for name, future in (client.create_topics(wanted, request_timeout=30).items() if wanted else []):
        try:
            future.result(timeout=30)
        except Exception as exc:  # confluent-kafka raises KafkaException with an error code inside
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
