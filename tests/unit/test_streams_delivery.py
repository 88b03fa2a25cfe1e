"""A record the broker never acknowledges ends the worker at once, before Faust could commit anything."""

from __future__ import annotations

import subprocess
import textwrap

from adaptloop.processes import streams_python

NEVER_ACKNOWLEDGED = textwrap.dedent("""
    import asyncio
    from adaptloop.streams import delivery

    async def main():
        never = asyncio.get_running_loop().create_future()
        await delivery._acknowledged("t.curated", never, 0.2)
        print("still running")

    asyncio.run(main())
""")


def test_an_unacknowledged_record_exits_the_worker_uncommitted():
    done = subprocess.run([streams_python(), "-c", NEVER_ACKNOWLEDGED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 75, (done.returncode, done.stdout, done.stderr)
    assert "still running" not in done.stdout
    assert "t.curated: not acknowledged within 0.2s" in done.stderr
    assert "exiting without committing offsets" in done.stderr
