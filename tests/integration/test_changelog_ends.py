"""Tansu reports a partition's end as its newest batch's first offset + 1; table recovery reads the real end.

    ~/.cache/adaptloop/venv/bin/python -m pytest tests/integration/test_changelog_ends.py -m integration
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from adaptloop.processes import streams_python
from adaptloop.settings import KafkaSettings

pytestmark = pytest.mark.integration

ENDS = textwrap.dedent("""
    import asyncio, json, sys
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition
    from adaptloop.streams.faust_app import batch_counted_end

    async def main(bootstrap, topic):
        tp = TopicPartition(topic, 0)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            reported = (await consumer.end_offsets([tp]))[tp]
            print(json.dumps({"reported": reported, "real": await batch_counted_end(consumer, tp, reported, timeout_s=10)}))
        finally:
            await consumer.stop()

    asyncio.run(main(*sys.argv[1:]))
""")


def test_the_end_of_a_partition_whose_newest_batch_holds_several_records(kafka: KafkaSettings):
    topic = f"t-{uuid.uuid4().hex[:8]}-seen-changelog"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, 1, 1)], request_timeout=30).values():
        future.result(timeout=30)
    single = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0, "enable.idempotence": False})
    for n in range(3):  # three batches of one record: offsets 0, 1, 2
        single.produce(topic, key=b"k", value=b"single %d" % n)
        assert single.flush(30) == 0
    batched = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 200, "enable.idempotence": False})
    for n in range(5):  # one batch of five: offsets 3..7
        batched.produce(topic, key=b"k", value=b"batched %d" % n)
    assert batched.flush(30) == 0
    done = subprocess.run([streams_python(), "-c", ENDS, kafka.bootstrap_servers, topic],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ends = json.loads(done.stdout.strip().splitlines()[-1])
    assert ends["real"] == 8, ends
    # What the broker says (4 with Tansu 0.6: the newest batch's first offset + 1); never more than the log.
    assert ends["reported"] <= 8, ends


TABLE_WORKER = textwrap.dedent("""
    import asyncio, json, os, sys
    import faust
    from adaptloop.streams.faust_app import App

    broker, app_id, source_topic, counted_ends, datadir = sys.argv[1:]
    app = App(app_id, broker=f"kafka://{broker}", batch_counted_ends=counted_ends == "1", store="memory://",
              processing_guarantee="at_least_once", producer_acks=-1, broker_session_timeout=6,
              topic_partitions=1, topic_replication_factor=1, topic_disable_leader=True, table_standby_replicas=0,
              key_serializer="raw", value_serializer="raw", web_enabled=False, autodiscover=False, datadir=datadir)
    table = app.Table("seen", partitions=1, schema=faust.Schema(key_serializer="json", value_serializer="json"))
    source = app.topic(source_topic, key_serializer="raw", value_serializer="raw", partitions=1)

    def finish(result):
        print(json.dumps(result), flush=True)
        os._exit(0)

    @app.agent(source)
    async def read(stream):  # the table's partition is assigned with its source topic's
        async for event in stream.events():
            pass

    async def recovered(sender, **kwargs):
        finish({"recovered": len(table)})

    app.on_rebalance_complete.connect(recovered)
    faust.Worker(app, loglevel="warning", redirect_stdouts=False).execute_from_commandline()
""")

KEYS = 300


def _worker_command(kafka: KafkaSettings, app_id: str, source: str, counted_ends: bool, datadir) -> list:
    return [streams_python(), "-c", TABLE_WORKER, kafka.bootstrap_servers, app_id, source,
            "1" if counted_ends else "0", str(datadir)]


@pytest.mark.parametrize("counted_ends", [True, False], ids=["ends-read-from-the-log", "ends-as-reported"])
def test_a_table_written_in_batches_recovers_whole_only_when_ends_are_read_from_the_log(
        kafka: KafkaSettings, tmp_path, counted_ends: bool):
    app_id, source = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}.source"
    changelog = f"{app_id}-seen-changelog"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    for future in admin.create_topics([NewTopic(source, 1, 1), NewTopic(changelog, 1, 1)],
                                      request_timeout=30).values():
        future.result(timeout=30)
    # The table's changelog as Faust writes it (JSON keys and values), all of it in one producer batch:
    # Tansu then reports the partition's end as 1.
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "enable.idempotence": False,
                         "linger.ms": 500})
    for n in range(KEYS):
        producer.produce(changelog, key=json.dumps(f"key-{n}").encode(), value=json.dumps(n).encode())
    assert producer.flush(30) == 0

    done = subprocess.run(_worker_command(kafka, app_id, source, counted_ends, tmp_path),
                          capture_output=True, text=True, timeout=120)
    results = [line[line.index("{"):] for line in done.stdout.splitlines() if "{" in line]  # Faust's spinner too
    assert done.returncode == 0 and results, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    recovered = json.loads(results[-1])["recovered"]
    if counted_ends:
        assert recovered == KEYS
    else:  # the broker's own end: recovery stops after the first record of the batch
        assert recovered == 1
