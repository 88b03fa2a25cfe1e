"""The gateway's latency settings reach the kernel: its CPU wake-up latency request
(``ADAPTLOOP_GATEWAY_CPU_WAKE_LATENCY_US``) while held, and ends with its block (a warning where not
permitted); its event loop's scheduler slice (``ADAPTLOOP_GATEWAY_LOOP_SLICE_US``) on that thread alone."""

from __future__ import annotations

import logging
import os
import threading

import pytest
from pydantic import ValidationError

from adaptloop.processes import CPU_LATENCY_DEVICE, cpu_wake_latency, cpu_wake_latency_now, sched_slice_us, set_sched_slice
from adaptloop.settings import GatewaySettings


@pytest.mark.skipif(not os.access(CPU_LATENCY_DEVICE, os.W_OK), reason="needs root: /dev/cpu_dma_latency")
def test_the_request_is_in_force_while_held_and_gone_after():
    before = cpu_wake_latency_now()
    assert before is not None and before > 7
    with cpu_wake_latency(7) as held:
        assert held
        assert cpu_wake_latency_now() == 7
    assert cpu_wake_latency_now() == before


def test_not_permitted_is_a_warning_and_no_request(tmp_path, caplog):
    missing = tmp_path / "no-such-device"
    with caplog.at_level(logging.WARNING), cpu_wake_latency(0, device=missing) as held:
        assert not held
    assert "cannot hold CPU wake-up latency at 0 us" in caplog.text
    with cpu_wake_latency(None, device=missing) as held:
        assert not held
    assert cpu_wake_latency_now(missing) is None


def test_the_setting_refuses_a_negative_latency():
    assert GatewaySettings().cpu_wake_latency_us is None
    assert GatewaySettings(cpu_wake_latency_us=0).cpu_wake_latency_us == 0
    with pytest.raises(ValidationError):
        GatewaySettings(cpu_wake_latency_us=-1)


def test_a_slice_applies_to_the_calling_thread_alone():
    seen: dict[str, float | None] = {}

    def loop_thread() -> None:
        before = sched_slice_us(threading.get_native_id())
        set_sched_slice(250)
        seen.update(before=before, after=sched_slice_us(threading.get_native_id()),
                    process=sched_slice_us(os.getpid()))

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join(10)
    assert seen["after"] == 250
    assert seen["process"] == seen["before"] != 250  # pytest's own thread keeps the kernel's default


def test_the_slice_setting_stays_within_what_the_kernel_takes():
    assert GatewaySettings().loop_slice_us is None
    assert GatewaySettings(loop_slice_us=100).loop_slice_us == 100
    for bad in (99, 100_001):
        with pytest.raises(ValidationError):
            GatewaySettings(loop_slice_us=bad)
