"""What the registry sidecar reports: ``/adapters`` (a long poll), ``/health``, and the status topic.

Gateways watch ``/adapters`` with a long poll instead of asking every few hundred milliseconds:
each answer carries an ``ETag``; a request with ``If-None-Match: <that tag>`` and ``?wait=S`` is
held until the report changes (an adapter loaded, refused or unloaded, vLLM down or back) and
answered 200 with the new report at once, or 304 after S seconds (at most ``MAX_WATCH_S``). So a
gateway hears of a change as it happens, and an idle replica costs one request per S seconds
rather than a new connection every poll (HTTP/1.1 keep-alive).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlparse

from adaptloop.errors import AdaptloopError, StackError
from adaptloop.kafka import DeliveryTracker
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.schemas.contract import now_ms
from adaptloop.serving.registry import ReleaseReader
from adaptloop.settings import ServeSettings

if TYPE_CHECKING:
    from adaptloop.serving.server import Sidecar

log = logging.getLogger("adaptloop.serve")

#: The longest a watcher's ``/adapters?wait=S`` is held (a client asking for more gets this).
MAX_WATCH_S = 60.0
#: An idle keep-alive connection to the sidecar is closed after this long (it holds a thread).
IDLE_CONNECTION_S = 120.0


class ReportVersion:
    """The version of the sidecar's report, as an ETag: bumped on every change, waited on by watchers.

    The tag names this process (a restarted sidecar's tags never match an old one), so a watcher that
    kept a tag across a restart gets the new report at once.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._process = uuid.uuid4().hex[:12]
        self._number = 0

    @property
    def tag(self) -> str:
        return f'"{self._process}-{self._number}"'

    def bump(self) -> None:
        with self._changed:
            self._number += 1
            self._changed.notify_all()

    def wait_past(self, tag: str, timeout_s: float) -> bool:
        """Until the report is no longer ``tag`` (True) or ``timeout_s`` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.tag != tag, timeout_s)


class StatusPublisher:
    """Sends the sidecar's report to the status topic on every change and every ``interval_s``.

    Advisory: a report that is not acknowledged is logged and the next one replaces it (the
    ``/adapters`` endpoint stays authoritative for this replica).
    """

    def __init__(self, settings: ServeSettings, sidecar: Sidecar, base_digest: str, ready: Callable[[], bool]) -> None:
        self.topic = settings.topics.name("serving_status")
        self.replica_id = settings.replica_id or f"{settings.host}:{settings.port}"
        self.settings = settings
        self.sidecar = sidecar
        self.base_digest = base_digest
        self.ready = ready
        self.interval_s = settings.status_interval_s
        self._serialize = serde_for("serving_status", settings.kafka.schema_registry_url).serialize
        self._producer = DeliveryTracker(settings.kafka, **{"linger.ms": 0})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-publisher", daemon=True)
        self.sent = 0

    def report(self) -> dict[str, Any]:
        status = self.sidecar.status()
        return {
            "replica_id": self.replica_id, "vllm_url": f"http://{self.settings.host}:{self.settings.port}",
            "sidecar_url": f"http://{self.settings.host}:{self.settings.sidecar_port}",
            "base_model": self.settings.model.name, "base_model_digest": self.base_digest, "ready": self.ready(),
            "loaded": [{"version": v, "tenant": i["tenant"], "task": i["task"], "digest": i["digest"] or "",
                        "state": i["state"], "load_ms": float(i["load_ms"])} for v, i in sorted(status["loaded"].items())],
            "refused": status["refused"], "reported_at": now_ms(),
        }

    def changed(self) -> None:
        self._wake.set()

    def start(self) -> "StatusPublisher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                record = self.report()
                self._producer.send(self.topic, self._serialize(record, SerdeContext(self.topic)), key=self.replica_id)
                self._producer.flush(10)
                self.sent += 1
            except AdaptloopError as exc:  # DeliveryError, SerializationError
                log.warning("status report not sent (the next one replaces it): %s", exc)


def status_server(host: str, port: int, sidecar: Sidecar, reader: ReleaseReader, healthy: threading.Event,
                  version: ReportVersion, vllm_pid: Callable[[], int | None] = lambda: None) -> ThreadingHTTPServer:
    """``GET /adapters`` (a long poll when asked: see this module's docstring) and ``GET /health`` on a
    small threaded HTTP server."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a watching gateway reuses one connection
        timeout = IDLE_CONNECTION_S

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            if url.path == "/adapters":
                self._adapters(parse_qs(url.query).get("wait", ["0"])[0])
            elif url.path == "/health":
                ready = healthy.is_set() and reader.caught_up.is_set()
                self._send(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                           {"status": "ok" if ready else "starting", "vllm": healthy.is_set(),
                            "vllm_pid": vllm_pid(), "registry_caught_up": reader.caught_up.is_set()})
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

        def _adapters(self, wait: str) -> None:
            try:
                wait_s = min(max(float(wait), 0.0), MAX_WATCH_S)
            except ValueError:
                self._send(HTTPStatus.BAD_REQUEST, {"error": f"wait must be seconds, not {wait!r}"})
                return
            known = self.headers.get("if-none-match")
            if known == version.tag and wait_s > 0:
                version.wait_past(known, wait_s)
            tag = version.tag  # read before the report: a change made meanwhile gives a newer tag later
            if known == tag:
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self.send_header("etag", tag)
                self.end_headers()
                return
            body = sidecar.status() | {"undecodable": dict(reader.undecodable), "base_model_digest": sidecar.base_digest,
                                       "vllm": healthy.is_set(), "restores": sidecar.restores}
            self._send(HTTPStatus.OK, body, etag=tag)

        def _send(self, status: HTTPStatus, body: dict[str, Any], etag: str | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            if etag is not None:
                self.send_header("etag", etag)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            log.debug("sidecar http: " + format, *args)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise StackError(f"the sidecar cannot listen on {host}:{port}: {exc}") from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sidecar-http", daemon=True).start()
    return server
