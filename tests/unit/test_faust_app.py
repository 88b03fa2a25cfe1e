"""On Tansu, changelog records go one per producer batch (table recovery reads them whole); other topics batch."""

from __future__ import annotations

import json
import subprocess
import textwrap

from adaptloop.processes import streams_python

BATCHES = textwrap.dedent("""
    import asyncio, json
    from aiokafka.structs import TopicPartition
    from adaptloop.streams.faust_app import App

    async def main():
        app = App("t-app", broker="kafka://127.0.0.1:1", one_record_changelog_batches=True, store="memory://")
        app.Table("seen", partitions=1)
        producer = app.producer._new_producer()  # builds aiokafka's client and accumulator, connects to nothing
        accumulator = producer._message_accumulator
        changelog, scored = TopicPartition("t-app-seen-changelog", 0), TopicPartition("t-scored", 0)
        for n in range(3):
            await accumulator.add_message(scored, b"k", b"v%d" % n, timeout=1)
        await accumulator.add_message(changelog, b"k", b"v", timeout=1)
        try:  # a second changelog record waits for a batch of its own (the first one is full)
            await accumulator.add_message(changelog, b"k", b"w", timeout=0.2)
            second = "appended"
        except Exception as exc:
            second = type(exc).__name__
        print(json.dumps({"scored": [b.record_count for b in accumulator._batches[scored]],
                          "changelog": [b.record_count for b in accumulator._batches[changelog]],
                          "second_changelog_record": second}))
        await producer.client.close()

    asyncio.run(main())
""")


def test_changelog_records_get_one_batch_each_and_other_topics_batch():
    done = subprocess.run([streams_python(), "-c", BATCHES], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"scored": [3], "changelog": [1], "second_changelog_record": "KafkaTimeoutError"}
