"""A broker that does not answer a metadata request in time is asked again, then named in a clear error."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from adaptloop.errors import BrokerError
from adaptloop.kafka import partitions_of
from adaptloop.settings import KafkaSettings


def test_a_silent_broker_is_asked_again_then_reported():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except socket.timeout:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(BrokerError, match=r"no metadata for t\.requests from 127\.0\.0\.1:\d+ within 3s"):
            partitions_of(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), "t.requests", timeout_s=3)
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    assert 2.5 < time.monotonic() - started < 15
    assert len(accepted) >= 2  # a fresh client per attempt: the first timeout was not the end
