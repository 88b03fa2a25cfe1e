"""Offsets are committed only up to the first record no agent acknowledged; a record the stream skipped
is read again from the committed offset (``adaptloop.streams.faust_app``)."""

from __future__ import annotations

import json
import subprocess
import textwrap

from adaptloop.processes import streams_python

COMMITS = textwrap.dedent("""
    import asyncio, json
    from faust.types import TP
    from adaptloop.streams import faust_app

    async def main():
        app = faust_app.App("t-app", broker="kafka://127.0.0.1:1", store="memory://")
        consumer = app.consumer  # built, never started: nothing connects
        sought = []
        async def seek_wait(partitions):
            sought.append({f"{tp.topic}[{tp.partition}]": offset for tp, offset in partitions.items()})
        consumer.seek_wait = seek_wait
        tp, fresh = TP("t-scored", 2), TP("t-scored", 3)
        result = {}

        # Faust counted a forward jump as a gap, i.e. as processed; here it is not.
        consumer._committed_offset[tp] = 21
        await consumer._add_gap(tp, 22, 22)
        consumer._acked[tp].extend([21, 23, 24])
        consumer._acked_index[tp].update([21, 23, 24])
        result["with_a_hole_after_21"] = consumer._new_offset(tp)

        # A hole right at the committed offset: Faust's `min(acked) - committed > 1` let 24 through.
        consumer._committed_offset[tp] = 22
        result["hole_at_the_committed_offset"] = consumer._new_offset(tp)

        # 22 was handed to the stream and is neither acknowledged nor being processed.
        app.flow_control.resume()  # as in a running worker outside a rebalance
        consumer.assignment = lambda: {tp}
        consumer._position = lambda tp: 22  # sought to 22, nothing fetched since: nothing skipped
        consumer.read_skipped_records_again(now=0.0)
        consumer.read_skipped_records_again(now=faust_app.SKIPPED_RECORD_GRACE_S + 1)
        await asyncio.sleep(0)
        result["sought_when_idle"] = list(sought)
        consumer._position = lambda tp: 25  # aiokafka handed 22..24 to Faust's fetch loop
        consumer.read_skipped_records_again(now=100.0)
        consumer.read_skipped_records_again(now=100.0 + faust_app.SKIPPED_RECORD_GRACE_S / 2)
        await asyncio.sleep(0)
        result["sought_within_grace"] = list(sought)
        consumer.read_skipped_records_again(now=100.0 + faust_app.SKIPPED_RECORD_GRACE_S)
        await asyncio.sleep(0)  # the seek runs as a task
        result["sought_after_grace"] = list(sought)

        consumer._acked[tp].append(22)
        consumer._acked_index[tp].add(22)
        result["hole_filled"] = consumer._new_offset(tp)

        # Never committed: the first offset it was rewound to is where processing must start.
        consumer._first_offsets[fresh] = 0
        consumer._acked[fresh].extend([1, 2])
        consumer._acked_index[fresh].update([1, 2])
        result["never_committed_missing_0"] = consumer._new_offset(fresh)
        print(json.dumps(result))

    asyncio.run(main())
""")


def test_commits_stop_at_the_first_unacknowledged_offset_and_a_lasting_hole_is_read_again():
    done = subprocess.run([streams_python(), "-c", COMMITS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "with_a_hole_after_21": 22,  # 21 acknowledged; 22 is not, and 23, 24 wait behind it
        "hole_at_the_committed_offset": None,
        "sought_when_idle": [],
        "sought_within_grace": [],
        "sought_after_grace": [{"t-scored[2]": 22}],
        "hole_filled": 25,
        "never_committed_missing_0": None,
    }, result
