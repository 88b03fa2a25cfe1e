"""CPU lists (``ADAPTLOOP_GATEWAY_CPUS``, ``ADAPTLOOP_SERVE_CPUS``) are parsed strictly and really bind."""

from __future__ import annotations

import os
import threading

import pytest
from pydantic import ValidationError

from adaptloop.errors import ConfigError
from adaptloop.processes import parse_cpu_list, pin_to_cpus
from adaptloop.settings import GatewaySettings, ServeSettings


def test_cpu_lists_in_the_kernels_format():
    assert parse_cpu_list("1") == {1}
    assert parse_cpu_list("0,2-4") == {0, 2, 3, 4}
    assert parse_cpu_list(" 3 , 1 ") == {1, 3}
    assert parse_cpu_list("") == frozenset()
    for bad in ("a", "1-", "-1", "3-1", "1;2", "1.5"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpu_list(bad)


def test_settings_refuse_a_bad_cpu_list_at_start():
    assert GatewaySettings(cpus="1").cpus == "1"
    assert ServeSettings(cpus="0-1").cpus == "0-1"
    with pytest.raises(ValidationError, match="not a CPU list"):
        GatewaySettings(cpus="one")
    with pytest.raises(ValidationError, match="not a CPU list"):
        ServeSettings(cpus="0-")


def _in_a_thread(function):
    """Run ``function`` in a thread of its own: a binding applies to the calling thread, not to pytest's."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except Exception as exc:  # handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_pinning_binds_this_thread_and_what_it_starts_to_the_listed_cpus():
    cpu = min(os.sched_getaffinity(0))

    def pin_and_look() -> tuple[set[int], set[int]]:
        pin_to_cpus(str(cpu))
        seen_by_child: dict[str, set[int]] = {}
        child = threading.Thread(target=lambda: seen_by_child.update(cpus=os.sched_getaffinity(0)))
        child.start()
        child.join(10)
        return os.sched_getaffinity(0), seen_by_child["cpus"]

    assert _in_a_thread(pin_and_look) == ({cpu}, {cpu})
    assert _in_a_thread(lambda: pin_to_cpus("")) is None


def test_pinning_to_a_cpu_the_machine_lacks_is_a_clear_error():
    missing = (os.cpu_count() or 1) + 64
    with pytest.raises(ConfigError, match=f"cannot run on CPUs '{missing}'"):
        _in_a_thread(lambda: pin_to_cpus(str(missing)))
