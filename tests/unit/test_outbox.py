"""The gateway's outbox on a real folder: what a killed gateway leaves is sent again, once acknowledged it is gone."""

import os

import pytest

from adaptloop.serving.outbox import Outbox, OutboxError, OutboxFull


def kill(outbox: Outbox) -> None:
    """What a SIGKILL leaves: the files as written, no close(); the kernel drops the lock with the process."""
    os.close(outbox._fd)
    os.close(outbox._lock)


def test_acknowledged_records_leave_nothing_behind(tmp_path):
    outbox = Outbox(tmp_path, max_bytes=1 << 20)
    segments = [outbox.append("t", f"k{n}".encode(), b"v" * 100) for n in range(3)]
    assert outbox.unacknowledged_bytes > 300
    for segment in segments:
        outbox.acknowledged(segment)
    assert outbox.unacknowledged_bytes == 0
    outbox.close()
    assert list(Outbox(tmp_path, max_bytes=1 << 20).leftovers()) == []


def test_what_a_killed_gateway_left_is_read_back_in_order_and_freed_once_acknowledged(tmp_path):
    first = Outbox(tmp_path, max_bytes=1 << 20, segment_bytes=256)
    written = [("agent.interactions", f"k{n}".encode(), bytes([n]) * 90) for n in range(8)]
    segments = [first.append(*record) for record in written]
    first.acknowledged(segments[0])  # the broker took the first one only
    kill(first)

    second = Outbox(tmp_path, max_bytes=1 << 20, segment_bytes=256)
    leftovers = list(second.leftovers())
    records = [record for _, record in leftovers]
    # At least once: the acknowledged one comes back too while its segment holds unacknowledged ones.
    assert records[-7:] == written[1:] and set(records) <= set(written)
    for segment, _ in leftovers:
        second.acknowledged(segment)
    assert second.unacknowledged_bytes == 0
    assert [p.name for p in tmp_path.glob("segment-*.log")] in ([], [f"segment-{second._current.number:012d}.log"])


def test_a_frame_cut_short_or_corrupted_ends_its_segment_and_the_rest_is_kept(tmp_path):
    first = Outbox(tmp_path, max_bytes=1 << 20)
    first.append("t", b"a", b"1" * 50)
    first.append("t", b"b", b"2" * 50)
    path = first._current.path
    kill(first)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the second write was cut by the crash
    assert [key for _, (_, key, _) in Outbox(tmp_path, max_bytes=1 << 20).leftovers()] == [b"a"]


def test_a_corrupted_frame_is_not_sent(tmp_path):
    first = Outbox(tmp_path, max_bytes=1 << 20)
    first.append("t", b"a", b"1" * 50)
    path = first._current.path
    kill(first)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert list(Outbox(tmp_path, max_bytes=1 << 20).leftovers()) == []


def test_full_outbox_refuses_and_one_folder_has_one_owner(tmp_path):
    outbox = Outbox(tmp_path, max_bytes=500)
    segment = outbox.append("t", b"k", b"v" * 300)
    with pytest.raises(OutboxFull):
        outbox.append("t", b"k", b"v" * 300)
    with pytest.raises(OutboxError, match="in use by another gateway"):
        Outbox(tmp_path, max_bytes=500)
    outbox.acknowledged(segment)
    outbox.append("t", b"k", b"v" * 300)  # room again


def test_a_torn_write_loses_no_record_appended_after_it(tmp_path, monkeypatch):
    """A write that comes up short (a full disk, a signal) is cut back to the last whole frame before the caller
    hears of it: the records appended afterwards replay whole after a crash, in order."""
    from adaptloop.serving import outbox as module

    outbox = Outbox(tmp_path, max_bytes=1 << 20)
    outbox.append("t", b"k0", b"v" * 50)
    real_write = os.write
    monkeypatch.setattr(module.os, "write", lambda fd, data: real_write(fd, data[:7]))
    with pytest.raises(OutboxError, match="short"):
        outbox.append("t", b"k1", b"v" * 50)
    monkeypatch.setattr(module.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OutboxError, match="failed"):
        outbox.append("t", b"k2", b"v" * 50)
    monkeypatch.setattr(module.os, "write", real_write)
    outbox.append("t", b"k3", b"v" * 50)
    kill(outbox)
    assert [key for _, (_, key, _) in Outbox(tmp_path, max_bytes=1 << 20).leftovers()] == [b"k0", b"k3"]


def test_a_segment_that_cannot_be_opened_keeps_the_current_one(tmp_path, monkeypatch):
    from adaptloop.serving import outbox as module

    outbox = Outbox(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    outbox.append("t", b"k0", b"v" * 120)
    real_open = os.open
    monkeypatch.setattr(module.os, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(24, "Too many open files")))
    outbox.append("t", b"k1", b"v" * 10)  # rotation failed: still written, to the current segment
    monkeypatch.setattr(module.os, "open", real_open)
    outbox.append("t", b"k2", b"v" * 10)  # rotates now
    kill(outbox)
    assert [key for _, (_, key, _) in Outbox(tmp_path, max_bytes=1 << 20).leftovers()] == [b"k0", b"k1", b"k2"]
