"""The contract between stages, beside the ``.avsc`` files it completes: the symbols records carry and
the helpers every producer stamps records with.

    ReleaseState, SERVABLE, WITHDRAWN    an adapter's state (adapter_release's ``ReleaseState``)
    code_version()                       which code built a record ("adaptloop==0.1.0")
    now_ms()                             the clock records carry (milliseconds since the epoch)
"""

from __future__ import annotations

import functools
import time
from enum import StrEnum

__all__ = ["SERVABLE", "WITHDRAWN", "ReleaseState", "code_version", "now_ms"]


class ReleaseState(StrEnum):
    """The symbols of adapter_release's ``ReleaseState`` enum."""

    RELEASED = "RELEASED"
    REJECTED = "REJECTED"
    PROMOTED = "PROMOTED"
    ROLLED_BACK = "ROLLED_BACK"
    RETIRED = "RETIRED"


#: States in which an adapter may serve traffic (or is about to, as a canary); plain strings, as records hold them.
SERVABLE = frozenset({ReleaseState.RELEASED.value, ReleaseState.PROMOTED.value})
#: States that take a loaded adapter out of service.
WITHDRAWN = frozenset(s.value for s in ReleaseState) - SERVABLE


@functools.cache
def code_version() -> str:
    """Which code built a record, as every record's lineage names it: ``adaptloop==<version>``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"adaptloop=={version('adaptloop')}"
    except PackageNotFoundError:
        return "adaptloop (not installed)"


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch: the time unit of every record's ``*_at``/``event_time``."""
    return int(time.time() * 1000)
