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
