"""``adaptloop streams``: one Faust curation worker. Run more of them to scale out by partitions.

    adaptloop streams                          # settings from ADAPTLOOP_STREAMS_* / ADAPTLOOP_KAFKA_* / ADAPTLOOP_TOPICS_*
    ADAPTLOOP_STREAMS_WINDOW_SIZE=8 adaptloop streams --loglevel debug

Needs faust-streaming: it runs from its own venv (see ``adaptloop.processes.streams_python``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from adaptloop.errors import ConfigError
from adaptloop.settings import StreamsSettings
from adaptloop.tasks import load_catalogue


def run_worker(app: Any, settings: StreamsSettings, loglevel: str) -> int:
    """Run a Faust app's worker until it stops; its exit code."""
    import faust

    worker = faust.Worker(app, loglevel=loglevel, workdir=str(settings.data_dir), redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    return 0


def use_uvloop() -> None:
    """Before anything makes an event loop: Faust's agents, aiokafka and the table callbacks then run on
    uvloop, as the gateway does, rather than asyncio's own loop (the loop itself was ~10% of a busy
    worker's CPU under py-spy, and the workers are CPU-bound)."""
    import mode.loop

    mode.loop.use("uvloop")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop streams", description="Run a Faust curation worker.")
    parser.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)

    use_uvloop()  # here, not at import: `adaptloop --help` must work without faust

    from adaptloop.streams.app import create_app
    from adaptloop.streams.erasures import ErasureFeed
    from adaptloop.streams.internal_topics import ensure_internal_topics

    settings = StreamsSettings()
    try:
        catalogue = load_catalogue()
    except ConfigError as exc:
        print(f"adaptloop streams: {exc}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_internal_topics(settings)
    # Every erasure so far is known before the first record is curated; the app's timer follows new ones.
    erasures = ErasureFeed(settings.kafka, settings.topics)
    erasures.catch_up()
    try:
        return run_worker(create_app(settings, erasures=erasures, catalogue=catalogue), settings, args.loglevel)
    finally:
        erasures.close()


if __name__ == "__main__":
    sys.exit(main())
