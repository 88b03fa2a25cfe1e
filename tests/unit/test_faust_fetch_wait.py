"""The curation worker's consumer waits at most ``FETCH_MAX_WAIT_MS`` per fetch, not Faust's fixed 1.5 s: on
Tansu every hop through an agent waited for it (``adaptloop.streams.faust_app``)."""

from __future__ import annotations

import subprocess
import textwrap

from adaptloop.processes import streams_python

WORKER_CONSUMER = textwrap.dedent("""
    import asyncio
    from adaptloop.settings import KafkaSettings, StreamsSettings
    from adaptloop.streams.app import create_app

    async def main():
        app = create_app(StreamsSettings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1")))  # never started
        consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
        print("fetch wait", consumer._fetch_max_wait_ms)
        await consumer.stop()

    asyncio.run(main())
""")


def test_the_worker_consumer_fetches_with_a_short_wait():
    done = subprocess.run([streams_python(), "-c", WORKER_CONSUMER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fetch wait 100" in done.stdout, (done.stdout, done.stderr)
