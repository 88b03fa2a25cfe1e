"""One record that breaks a stage, whatever it raises, becomes a dead letter and the stream goes on; a broker
failure still ends the worker (``adaptloop.streams.curation.Curation.guarded``)."""

from __future__ import annotations

import json
import subprocess
import textwrap

from adaptloop.processes import streams_python

GUARD = textwrap.dedent("""
    import asyncio, json
    from types import SimpleNamespace
    from adaptloop.streams.app import create_app
    from adaptloop.errors import DeliveryError
    from adaptloop.settings import StreamsSettings

    async def main():
        app = create_app(StreamsSettings())  # built, never started: nothing connects
        curation = app.curation
        lettered = []
        async def send_dead_letter(event, ref, stage, error):
            lettered.append(type(error).__name__)
        curation.send_dead_letter = send_dead_letter
        event = SimpleNamespace(message=SimpleNamespace(topic="t", partition=0, offset=7), key=b"k", value=b"v")

        def raising(error):
            async def body(event):
                raise error
            return body

        def deep(depth=0):
            return deep(depth + 1)

        async def recursing(event):
            deep()

        for body in (recursing, raising(ZeroDivisionError()), raising(AttributeError("x")), raising(IndexError()),
                     raising(AssertionError()), raising(ValueError())):
            await curation.guarded("join", event, body)
        escaped = []
        for error in (DeliveryError("broker down"), asyncio.CancelledError()):
            try:
                await curation.guarded("join", event, raising(error))
            except BaseException as exc:
                escaped.append(type(exc).__name__)
        print(json.dumps({"lettered": lettered, "escaped": escaped}))

    asyncio.run(main())
""")


def test_whatever_a_stage_raises_on_a_record_becomes_a_dead_letter_but_broker_failures_end_the_worker():
    done = subprocess.run([streams_python(), "-c", GUARD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"lettered": ["RecursionError", "ZeroDivisionError", "AttributeError", "IndexError",
                                   "AssertionError", "ValueError"],
                      "escaped": ["DeliveryError", "CancelledError"]}
