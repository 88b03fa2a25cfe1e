"""The sidecar's ``/adapters`` long poll, on a real HTTP server (no vLLM or broker needed: nothing
here loads an adapter or reads the registry)."""

from __future__ import annotations

import http.client
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from adaptloop.ops.stack import free_port
from adaptloop.serving.registry import ReleaseReader
from adaptloop.serving.server import Sidecar
from adaptloop.serving.sidecar_report import ReportVersion, status_server
from adaptloop.settings import KafkaSettings, Topics


@pytest.fixture()
def sidecar_server(tmp_path):
    port = free_port()
    with httpx.Client() as vllm_http:
        sidecar = Sidecar("http://127.0.0.1:9", vllm_http, max_lora_rank=8, pinned_dir=tmp_path / "adapters")
        reader = ReleaseReader(KafkaSettings(bootstrap_servers="127.0.0.1:9"), Topics(prefix="watch."))
        healthy = threading.Event()
        healthy.set()
        version = ReportVersion()
        server = status_server("127.0.0.1", port, sidecar, reader, healthy, version)
        try:
            yield f"http://127.0.0.1:{port}", sidecar, version
        finally:
            server.shutdown()
            server.server_close()


def test_an_unchanged_report_is_held_for_the_wait_then_answered_304(sidecar_server):
    url, _, _ = sidecar_server
    first = httpx.get(url + "/adapters", timeout=5)
    assert first.status_code == 200 and first.json()["loaded"] == {}
    tag = first.headers["etag"]

    started = time.monotonic()
    held = httpx.get(url + "/adapters?wait=0.5", headers={"if-none-match": tag}, timeout=5)
    waited = time.monotonic() - started
    assert held.status_code == 304 and held.headers["etag"] == tag
    assert 0.4 < waited < 3.0

    # Without a wait the same question is answered at once, still 304.
    assert httpx.get(url + "/adapters", headers={"if-none-match": tag}, timeout=5).status_code == 304


def test_a_change_answers_a_waiting_watcher_at_once_with_the_new_report(sidecar_server):
    url, sidecar, version = sidecar_server
    tag = httpx.get(url + "/adapters", timeout=5).headers["etag"]
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        watch = pool.submit(httpx.get, url + "/adapters?wait=30", headers={"if-none-match": tag}, timeout=35)
        time.sleep(0.3)
        assert not watch.done()
        sidecar.refused["t-v1"] = "digest mismatch"
        version.bump()
        answer = watch.result(timeout=5)
    assert time.monotonic() - started < 5
    assert answer.status_code == 200 and answer.headers["etag"] != tag
    assert answer.json()["refused"] == {"t-v1": "digest mismatch"}


def test_a_tag_from_another_sidecar_process_gets_the_report_at_once(sidecar_server):
    url, _, _ = sidecar_server
    stale = ReportVersion().tag  # what a watcher kept across a restart of the sidecar
    started = time.monotonic()
    answer = httpx.get(url + "/adapters?wait=30", headers={"if-none-match": stale}, timeout=35)
    assert answer.status_code == 200 and answer.headers["etag"] != stale
    assert time.monotonic() - started < 5


def test_one_connection_serves_many_questions_and_a_bad_wait_is_a_400(sidecar_server):
    url, _, _ = sidecar_server
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    try:
        for _ in range(3):  # HTTP/1.1 keep-alive: no new connection per question
            connection.request("GET", "/adapters")
            response = connection.getresponse()
            response.read()
            assert response.status == 200 and response.getheader("connection") != "close"
        connection.request("GET", "/adapters?wait=soon")
        response = connection.getresponse()
        assert response.status == 400 and b"wait must be seconds" in response.read()
    finally:
        connection.close()
