"""Avro contracts of adaptloop's topics: the ``.avsc`` files in ``avro/`` and their serde."""

from adaptloop.schemas.serde import (
    RECORDS,
    AvroDeserializer,
    AvroSerializer,
    Serde,
    SerdeContext,
    SchemaStore,
    bundled_store,
    serde_for,
)

__all__ = [
    "RECORDS",
    "AvroDeserializer",
    "AvroSerializer",
    "Serde",
    "SerdeContext",
    "SchemaStore",
    "bundled_store",
    "serde_for",
]
