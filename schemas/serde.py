"""Avro serde for adaptloop's topics.

Two wire formats, one interface (a plain callable ``(obj, ctx) -> bytes`` and back):

* Without a schema registry: Avro single-object encoding (``C3 01`` + the writer schema's
  CRC-64-AVRO fingerprint, little endian + the binary body). The reader looks the
  fingerprint up among every schema version kept in ``schemas/avro`` and resolves the
  writer's version against the newest version of the record it expects.
* With a schema registry URL: the Confluent wire format through confluent-kafka's
  schema registry client (``mock://`` works for tests).

Schemas are parsed once, at import.
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Mapping

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from adaptloop.errors import DeserializationError, SchemaError, SerializationError

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
HEADER_SIZE = len(SINGLE_OBJECT_MAGIC) + 8
_FILE_NAME = re.compile(r"^(?P<stem>[a-z_]+)\.v(?P<version>\d+)\.avsc$")

#: Record names by the file stem that holds their versions.
RECORDS = {
    "interaction": "adaptloop.Interaction",
    "outcome": "adaptloop.Outcome",
    "curated_example": "adaptloop.CuratedExample",
    "training_request": "adaptloop.TrainingRequest",
    "adapter_release": "adaptloop.AdapterRelease",
    "dead_letter": "adaptloop.DeadLetter",
    "erasure": "adaptloop.Erasure",
    "serving_status": "adaptloop.ServingStatus",
}


@dataclass(frozen=True)
class SchemaVersion:
    """One parsed ``.avsc`` file."""

    stem: str
    version: int
    raw: dict
    parsed: dict
    canonical: str
    fingerprint: bytes  # 8 bytes, little endian, as single-object encoding writes it

    @property
    def name(self) -> str:
        return self.parsed["name"]


def _load_schema_file(stem: str, version: int, text: str) -> SchemaVersion:
    try:
        raw = json.loads(text)
        # Parsed with fastavro's hint: unhinted, every read and write parses the schema again (twice the cost).
        parsed = parse_schema(raw)
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"schemas/avro/{stem}.v{version}.avsc does not parse: {exc}") from exc
    canonical = to_parsing_canonical_form(parsed)
    digest = int(fingerprint(canonical, "CRC-64-AVRO"), 16)
    return SchemaVersion(stem, version, raw, parsed, canonical, struct.pack("<Q", digest))


class SchemaStore:
    """Every version of every record schema, indexed by stem and by fingerprint."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.versions: dict[str, list[SchemaVersion]] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        for file_name, text in sorted(files.items()):
            match = _FILE_NAME.match(file_name)
            if not match:
                raise SchemaError(f"schema file {file_name!r} is not named STEM.vN.avsc")
            schema = _load_schema_file(match["stem"], int(match["version"]), text)
            self.versions.setdefault(schema.stem, []).append(schema)
            self.by_fingerprint[schema.fingerprint] = schema
        for stem, versions in self.versions.items():
            versions.sort(key=lambda s: s.version)
            names = {s.name for s in versions}
            if len(names) != 1:
                raise SchemaError(f"versions of {stem} name different records: {sorted(names)}")

    @classmethod
    def bundled(cls) -> "SchemaStore":
        folder = resources.files("adaptloop.schemas") / "avro"
        return cls({p.name: p.read_text() for p in folder.iterdir() if p.name.endswith(".avsc")})

    def latest(self, stem: str) -> SchemaVersion:
        try:
            return self.versions[stem][-1]
        except KeyError:
            raise SchemaError(f"no schema named {stem!r}; known: {sorted(self.versions)}") from None


@cache
def bundled_store() -> SchemaStore:
    """The schemas shipped in this package, parsed once."""
    return SchemaStore.bundled()


@dataclass(frozen=True)
class SerdeContext:
    """Where a record goes to or comes from; ``partition`` and ``offset`` only when reading."""

    topic: str
    partition: int | None = None
    offset: int | None = None


class AvroSerializer:
    """``serializer(record, ctx) -> bytes`` in single-object encoding."""

    def __init__(self, stem: str, store: SchemaStore | None = None) -> None:
        self.schema = (store or bundled_store()).latest(stem)

    def __call__(self, record: Mapping[str, Any], ctx: SerdeContext | None = None) -> bytes:
        buffer = io.BytesIO()
        buffer.write(SINGLE_OBJECT_MAGIC)
        buffer.write(self.schema.fingerprint)
        try:
            fastavro.schemaless_writer(buffer, self.schema.parsed, record, strict_allow_default=True)
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:  # an int past a long
            topic = ctx.topic if ctx else "?"
            raise SerializationError(f"{self.schema.name} for topic {topic}: {exc}") from exc
        return buffer.getvalue()


class AvroDeserializer:
    """``deserializer(data, ctx) -> dict``: any kept version of ``stem``, resolved to the newest."""

    def __init__(self, stem: str, store: SchemaStore | None = None) -> None:
        self.store = store or bundled_store()
        self.reader = self.store.latest(stem)

    def __call__(self, data: bytes | None, ctx: SerdeContext | None = None) -> dict:
        ctx = ctx or SerdeContext(topic="?")

        def fail(reason: str, cause: BaseException | None = None) -> DeserializationError:
            error = DeserializationError(reason, topic=ctx.topic, partition=ctx.partition,
                                         offset=ctx.offset)
            error.__cause__ = cause
            return error

        if data is None:
            raise fail("empty value (tombstone) where a record was expected")
        if len(data) < HEADER_SIZE or data[:2] != SINGLE_OBJECT_MAGIC:
            raise fail("not Avro single-object encoding (bad magic or truncated header)")
        writer = self.store.by_fingerprint.get(bytes(data[2:HEADER_SIZE]))
        if writer is None:
            raise fail(f"unknown schema fingerprint {bytes(data[2:HEADER_SIZE]).hex()}")
        if writer.name != self.reader.name:
            raise fail(f"wrong record type: got {writer.name}, expected {self.reader.name}")
        body = io.BytesIO(data[HEADER_SIZE:])
        try:
            record = fastavro.schemaless_reader(body, writer.parsed, self.reader.parsed)
        except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError, struct.error,
                fastavro.read.SchemaResolutionError) as exc:
            raise fail(f"corrupt {writer.name} body: {type(exc).__name__}: {exc}", exc) from exc
        if body.tell() != len(data) - HEADER_SIZE:
            raise fail(f"{len(data) - HEADER_SIZE - body.tell()} trailing bytes after the record")
        return record


class RegistrySerde:
    """The Confluent wire format through confluent-kafka's schema registry client.

    ``auto_register`` is off by default: in production schemas are registered by a
    deliberate step, not by whichever producer starts first.
    """

    def __init__(self, stem: str, registry_url: str, *, auto_register: bool = False,
                 store: SchemaStore | None = None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer as CkDeserializer
        from confluent_kafka.schema_registry.avro import AvroSerializer as CkSerializer

        schema = (store or bundled_store()).latest(stem)
        self.client = SchemaRegistryClient.new_client({"url": registry_url})  # mock:// gives the in-memory registry
        schema_str = json.dumps(schema.raw)
        self._serializer = CkSerializer(self.client, schema_str,
                                        conf={"auto.register.schemas": auto_register,
                                              "use.latest.version": not auto_register})
        self._deserializer = CkDeserializer(self.client, schema_str)
        self.schema = schema

    def serialize(self, record: Mapping[str, Any], ctx: SerdeContext) -> bytes:
        from confluent_kafka.serialization import MessageField, SerializationContext

        try:
            return self._serializer(dict(record), SerializationContext(ctx.topic, MessageField.VALUE))
        except Exception as exc:  # confluent-kafka raises several unrelated types here
            raise SerializationError(f"{self.schema.name} for topic {ctx.topic}: {exc}") from exc

    def deserialize(self, data: bytes | None, ctx: SerdeContext) -> dict:
        from confluent_kafka.serialization import MessageField, SerializationContext

        try:
            record = self._deserializer(data, SerializationContext(ctx.topic, MessageField.VALUE))
        except Exception as exc:  # confluent-kafka raises several unrelated types here
            raise DeserializationError(f"{type(exc).__name__}: {exc}", topic=ctx.topic,
                                       partition=ctx.partition, offset=ctx.offset) from exc
        if record is None:
            raise DeserializationError("empty value (tombstone) where a record was expected",
                                       topic=ctx.topic, partition=ctx.partition, offset=ctx.offset)
        return record


@dataclass(frozen=True)
class Serde:
    """A pair of callables for one record kind: ``serialize(obj, ctx)``, ``deserialize(data, ctx)``."""

    stem: str
    serialize: Any
    deserialize: Any


def serde_for(stem: str, registry_url: str | None = None, *, auto_register: bool = False) -> Serde:
    """The serde for ``stem``: single-object encoding, or the Confluent format with a registry."""
    if registry_url:
        registry = RegistrySerde(stem, registry_url, auto_register=auto_register)
        return Serde(stem, registry.serialize, registry.deserialize)
    return Serde(stem, AvroSerializer(stem), AvroDeserializer(stem))
