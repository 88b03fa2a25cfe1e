"""The gateway's outbox: a local append-only log of interactions not yet acknowledged by the broker.

In ``record_mode=outbox`` a call is answered once its interaction is written here (one ``write``
to an open file, tens of microseconds) instead of once the broker acknowledged it (a round trip
that, on a busy host, is the larger part of the gateway's own time); the broker's acknowledgement
comes later and frees the record. A record the broker refuses is retried until it is taken; after a
crash or a kill of the gateway, the next gateway on the same outbox sends whatever is still in it.
So an answered call's interaction reaches the log unless the host's disk is lost. The fsync policy:
records are not fsynced one by one (that costs milliseconds), a segment is fsynced once, when it is
sealed (every ``SEGMENT_BYTES``); so a power cut may lose what the current segment got since the
last flush the kernel made on its own (seconds), while a killed process loses nothing, its writes
being in the page cache. A write that fails or comes up short is cut back to the last whole frame
before the error reaches the caller (a torn frame would end its segment's replay, and the records
after it with it); a new segment that cannot be opened leaves the current one growing.

    outbox = Outbox(Path("~/.cache/adaptloop/gateway-outbox/18080"), max_bytes=256 << 20)
    for segment, (topic, key, value) in outbox.leftovers():   # at start: sent again
        ...
    segment = outbox.append(topic, key, value)                # before the answer; OutboxFull if full
    outbox.acknowledged(segment)                              # in the delivery callback's loop turn

Files: ``segment-<n>.log``, frames of ``crc32 | topic length | key length | value length`` (4 bytes
each, big-endian) then the three. A frame cut short by a crash, or one whose checksum fails, ends
its segment's replay (logged). A segment is deleted once every record in it is acknowledged; the
current one is truncated to 0 bytes instead (and deleted by ``close``). So a restart resends only records
whose segment still held an unacknowledged one: at least once, and consumers de-duplicate by interaction
id, as everywhere.

What this means for erasure (``adaptloop forget``): an acknowledged record stays on this disk only while
its segment (at most about ``SEGMENT_BYTES``) still holds an unacknowledged one; an unacknowledged
record stays until the broker takes it, and curation then drops it if an erasure matches it. Nothing
rewrites a live outbox. Deleting and truncating free the blocks; the file system does not overwrite them.

Not thread-safe: one event loop owns it (delivery callbacks hop onto that loop first).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from adaptloop.errors import AdaptloopError

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">IIII")
#: A segment grows to about this size before the next one starts (older ones go once acknowledged).
SEGMENT_BYTES = 4 << 20


class OutboxError(AdaptloopError):
    """The outbox cannot be used (another gateway holds it, or the disk refuses a write)."""


class OutboxFull(OutboxError):
    """More unacknowledged bytes than ``max_bytes``: the broker has been away too long."""


@dataclass
class _Segment:
    number: int
    path: Path
    size: int = 0
    outstanding: int = 0


class Outbox:
    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory.expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = os.open(self.directory / "outbox.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise OutboxError(f"{self.directory} is in use by another gateway; give each its own "
                              f"ADAPTLOOP_GATEWAY_OUTBOX_DIR") from None
        self._segments: dict[int, _Segment] = {}
        for path in sorted(self.directory.glob("segment-*.log")):
            number = int(path.stem.split("-", 1)[1])
            self._segments[number] = _Segment(number, path, size=path.stat().st_size)
        self._current = self._open(max(self._segments, default=0) + 1)

    def _open(self, number: int) -> _Segment:
        segment = _Segment(number, self.directory / f"segment-{number:012d}.log")
        fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fd = fd
        self._segments[number] = segment
        return segment

    @property
    def unacknowledged_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())  # the current one is emptied once all acknowledged

    def leftovers(self) -> Iterator[tuple[int, tuple[str, bytes, bytes]]]:
        """Every record a previous gateway left (segment, (topic, key, value)); each counts as
        outstanding until ``acknowledged``. Call once, at start, before ``append``."""
        for segment in sorted(self._segments.values(), key=lambda s: s.number):
            if segment is self._current:
                continue
            records = 0
            for record in _read(segment.path):
                segment.outstanding += 1
                records += 1
                yield segment.number, record
            log.info("outbox %s: %d records left by the previous gateway, sent again", segment.path.name, records)
            self._retire_if_done(segment)

    def append(self, topic: str, key: bytes, value: bytes) -> int:
        """Write one record; return its segment (for ``acknowledged``). ``OutboxFull`` past ``max_bytes``."""
        encoded = topic.encode()
        frame = _HEADER.pack(zlib.crc32(value, zlib.crc32(key, zlib.crc32(encoded))), len(encoded), len(key),
                             len(value)) + encoded + key + value
        if self.unacknowledged_bytes + len(frame) > self.max_bytes:
            raise OutboxFull(f"{self.unacknowledged_bytes} bytes of interactions wait for the broker "
                             f"(limit {self.max_bytes}): not taking more")
        if self._current.size >= self.segment_bytes:
            self._rotate()
        try:
            written = os.write(self._fd, frame)
        except OSError as exc:
            self._cut_back(f"outbox write failed: {exc}")
            raise OutboxError(f"outbox write failed: {exc}") from exc
        if written != len(frame):
            self._cut_back(f"outbox write was short ({written} of {len(frame)} bytes)")
            raise OutboxError(f"outbox write was short ({written} of {len(frame)} bytes)")
        self._current.size += written
        self._current.outstanding += 1
        return self._current.number

    def _cut_back(self, why: str) -> None:
        """Truncate the segment back to its last whole frame: a torn frame left in place would end the replay of
        the segment there, and every record appended after it would be lost with it."""
        try:
            os.ftruncate(self._fd, self._current.size)
        except OSError as exc:  # the segment cannot take another frame safely: the next ones go to a new one
            log.error("%s, and truncating %s back failed (%s): starting a new segment", why, self._current.path.name, exc)
            self._current.size = self.segment_bytes

    def _rotate(self) -> None:
        """Seal the current segment (fsynced: it will not be written again) and start the next. The new file is
        opened before the old one is let go: a failed open keeps appending to the current segment."""
        sealed, fd = self._current, self._fd
        try:
            self._current = self._open(sealed.number + 1)
        except OSError as exc:
            self._current, self._fd = sealed, fd
            log.error("outbox: cannot start segment %d (%s); %s grows past its size", sealed.number + 1, exc,
                      sealed.path.name)
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("outbox: fsync of %s failed (%s)", sealed.path.name, exc)
        os.close(fd)
        self._retire_if_done(sealed)

    def acknowledged(self, number: int) -> None:
        segment = self._segments.get(number)
        if segment is None:
            return
        segment.outstanding -= 1
        self._retire_if_done(segment)

    def _retire_if_done(self, segment: _Segment) -> None:
        if segment.outstanding > 0:
            return
        if segment is self._current:
            if segment.size:
                os.ftruncate(self._fd, 0)
                segment.size = 0
        else:
            segment.path.unlink(missing_ok=True)
            del self._segments[segment.number]

    def close(self) -> None:
        """Release the files; what is unacknowledged stays for the next gateway."""
        os.close(self._fd)
        if not self._current.size:
            self._current.path.unlink(missing_ok=True)
        os.close(self._lock)


def _read(path: Path) -> Iterator[tuple[str, bytes, bytes]]:
    data = path.read_bytes()
    position = 0
    while position < len(data):
        if len(data) - position < _HEADER.size:
            log.warning("outbox %s: a frame cut short at byte %d (a crash mid-write), ignored", path.name, position)
            return
        crc, topic_len, key_len, value_len = _HEADER.unpack_from(data, position)
        start = position + _HEADER.size
        end = start + topic_len + key_len + value_len
        if end > len(data):
            log.warning("outbox %s: a frame cut short at byte %d (a crash mid-write), ignored", path.name, position)
            return
        topic, key, value = (data[start:start + topic_len], data[start + topic_len:start + topic_len + key_len],
                             data[start + topic_len + key_len:end])
        if zlib.crc32(value, zlib.crc32(key, zlib.crc32(topic))) != crc:
            log.warning("outbox %s: a frame with a bad checksum at byte %d; the rest of the segment is ignored",
                        path.name, position)
            return
        yield topic.decode(), key, value
        position = end
