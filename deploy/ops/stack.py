"""The embedded local stack: Tansu on loopback, every topic created, then the adaptloop processes.

    adaptloop up        # starts everything, returns when all are ready
    adaptloop topics    # topics with message counts
    adaptloop down      # stops what `up` started

With ``ADAPTLOOP_KAFKA_BOOTSTRAP_SERVERS`` naming another cluster no broker is started.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from adaptloop.errors import AdaptloopError, StackError
from adaptloop.kafka import count_messages, ensure_topics, wait_for_broker, admin
from adaptloop.model import ensure_base_model
from adaptloop.processes import (READY_FILE_ENV, ManagedProcess, adaptloop_command, stop_from_state,
                                 streams_python, tansu_binary, write_state)
from adaptloop.serving.keys import dev_keys, plain_setting
from adaptloop.settings import ADMIN_KEY_FILE, DEFAULT_HOME, SUBJECT_SECRET_FILE, KafkaSettings, ModelSettings, Topics
from adaptloop.tasks import FILE_ENV as TASKS_FILE_ENV

STATE_FILE = "stack.json"
DEFAULT_READY_TIMEOUT_S = 120.0
SERVICES = ("streams", "trainer", "serve", "gateway", "canary")
#: Tenants that get a generated gateway key in a local stack (``LocalStack.dev_keys``, ``dev-keys.json``).
DEV_TENANTS = ("acme", "default")
DEV_KEYS_FILE = "dev-keys.json"


def start_broker(kafka: KafkaSettings, home: Path, *, timeout_s: float = 30.0) -> ManagedProcess:
    """Tansu with memory storage on the loopback address of ``kafka.bootstrap_servers``."""
    host, port = kafka.bootstrap_servers.rsplit(":", 1)
    url = f"tcp://{host}:{port}"
    broker = ManagedProcess(
        "broker",
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        home / "logs" / "broker.log",
        env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    ).start()
    try:
        broker.wait_ready(lambda: _broker_answers(kafka), timeout_s)
    except StackError:
        broker.stop()
        raise
    return broker


def _broker_answers(kafka: KafkaSettings) -> bool:
    try:
        wait_for_broker(kafka, timeout_s=1)
        return True
    except AdaptloopError:
        return False


@dataclass(frozen=True)
class StackPorts:
    """Loopback ports of one local stack; ``free()`` picks unused ones (tests, a second stack)."""

    vllm: int = 18000
    sidecar: int = 18001
    gateway: int = 18080
    streams_web: int = 6066

    @classmethod
    def free(cls) -> "StackPorts":
        return cls(*(free_port() for _ in range(4)))

    def env(self) -> dict[str, str]:
        return {
            "ADAPTLOOP_SERVE_PORT": str(self.vllm),
            "ADAPTLOOP_SERVE_SIDECAR_PORT": str(self.sidecar),
            "ADAPTLOOP_GATEWAY_PORT": str(self.gateway),
            "ADAPTLOOP_GATEWAY_VLLM_URL": f"http://127.0.0.1:{self.vllm}",
            "ADAPTLOOP_GATEWAY_SIDECAR_URL": f"http://127.0.0.1:{self.sidecar}",
            "ADAPTLOOP_STREAMS_WEB_PORT": str(self.streams_web),
        }

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(kafka: KafkaSettings, topics: Topics, home: Path) -> dict[str, str]:
    """What every adaptloop process of this stack reads from its environment."""
    env = {
        "ADAPTLOOP_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "ADAPTLOOP_KAFKA_EMBEDDED": str(kafka.embedded).lower(),
        "ADAPTLOOP_TOPICS_PREFIX": topics.prefix,
        "ADAPTLOOP_TRAINER_HOME": str(home),
        "ADAPTLOOP_TRAINER_ARTIFACT_DIR": str(home / "artifacts"),
        "ADAPTLOOP_SERVE_HOME": str(home),
        "ADAPTLOOP_STREAMS_DATA_DIR": str(home / "faust"),
        "ADAPTLOOP_GATEWAY_OUTBOX_DIR": str(home / "gateway-outbox"),
        "ADAPTLOOP_GATEWAY_ID_SECRET_FILE": str(home / "gateway-id-secret"),
        # One admin credential for the gateways' /stats and /health detail: the canary controller and status read it.
        "ADAPTLOOP_GATEWAY_ADMIN_KEY_FILE": str(home / ADMIN_KEY_FILE),
        "ADAPTLOOP_CANARY_GATEWAY_ADMIN_KEY_FILE": str(home / ADMIN_KEY_FILE),
        # One subject-key secret: curation keys the subjects it redacts with it, forget computes the same keys.
        "ADAPTLOOP_ERASURE_SUBJECT_SECRET_FILE": str(home / SUBJECT_SECRET_FILE),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if os.environ.get(TASKS_FILE_ENV):  # every process reads the same catalogue, whatever its working directory
        env[TASKS_FILE_ENV] = str(Path(os.environ[TASKS_FILE_ENV]).resolve())
    return env


def start_service(name: str, home: Path, env: dict[str, str], *, timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                  extra_args: tuple[str, ...] = (), wait_ready: bool = True) -> ManagedProcess:
    """Start ``adaptloop NAME`` and wait until it touches its ready file (unless ``wait_ready`` is false:
    a crash drill may die on purpose before it gets there)."""
    ready = home / "run" / f"{name}.ready"
    ready.unlink(missing_ok=True)
    python = streams_python() if name == "streams" else None
    process = ManagedProcess(name, adaptloop_command(name, *extra_args, python=python),
                             home / "logs" / f"{name}.log", env=env | {READY_FILE_ENV: str(ready)}).start()
    if not wait_ready:
        return process
    try:
        process.wait_ready(ready.exists, timeout_s)
    except StackError:
        process.stop()
        raise
    return process


@dataclass
class LocalStack:
    """Everything the loop needs on this machine; a context manager that always stops what it started."""

    home: Path = DEFAULT_HOME / "stack"
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: Topics = field(default_factory=Topics)
    services: tuple[str, ...] = SERVICES
    ports: StackPorts = field(default_factory=StackPorts)
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    dev_tenants: tuple[str, ...] = DEV_TENANTS
    #: tenant -> gateway API key, generated per start (the gateway keeps only their hashes).
    dev_keys: dict[str, str] = field(default_factory=dict)

    def start(self, progress=print) -> "LocalStack":
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            if self.kafka.embedded:
                progress(f"starting Tansu broker on {self.kafka.bootstrap_servers}")
                self.processes.append(start_broker(self.kafka, self.home))
            else:
                wait_for_broker(self.kafka, timeout_s=30)
            ensure_topics(self.kafka, self.topics)
            # Convert (once, cached under ADAPTLOOP_HOME) here, so that every service of any stack
            # home trains on and serves the same folder.
            model = ensure_base_model(DEFAULT_HOME, ModelSettings().path)
            self.dev_keys = dev_keys(self.dev_tenants)
            keys_file = self.home / DEV_KEYS_FILE
            keys_file.write_text(json.dumps(self.dev_keys, indent=2))
            keys_file.chmod(0o600)
            env = (service_env(self.kafka, self.topics, self.home) | self.ports.env()
                   | {"ADAPTLOOP_MODEL_PATH": str(model), "ADAPTLOOP_GATEWAY_API_KEYS": plain_setting(self.dev_keys),
                      "ADAPTLOOP_CANARY_GATEWAY_URLS": json.dumps([self.ports.gateway_url])} | self.extra_env)
            if "ADAPTLOOP_SERVE_VLLM_API_KEY" in env:  # the trainer loads its shadow adapters with vLLM's key
                env.setdefault("ADAPTLOOP_TRAINER_VLLM_API_KEY", env["ADAPTLOOP_SERVE_VLLM_API_KEY"])
            for name in self.services:
                started = time.monotonic()
                progress(f"starting {name}")
                timeout = 600.0 if name == "serve" else DEFAULT_READY_TIMEOUT_S
                self.processes.append(start_service(name, self.home, env, timeout_s=timeout))
                progress(f"{name} ready in {time.monotonic() - started:.0f}s")
                write_state(self.home / STATE_FILE, self.processes)
        except BaseException:
            self.stop()
            raise
        write_state(self.home / STATE_FILE, self.processes)
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        (self.home / STATE_FILE).unlink(missing_ok=True)

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def __enter__(self) -> "LocalStack":
        return self if self.processes else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _home_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME / "stack", help="state, logs and artifacts")


def up_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop up", description="Start the embedded stack and keep it running.")
    _home_arg(parser)
    args = parser.parse_args(argv)
    stack = LocalStack(home=args.home).start()
    print(f"stack up; logs in {args.home / 'logs'}; gateway keys in {args.home / DEV_KEYS_FILE}; "
          "`adaptloop down` stops it")
    # Detach: the processes live in their own sessions and `down` stops them from the state file.
    stack.processes.clear()
    return 0


def down_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop down", description="Stop what `adaptloop up` started.")
    _home_arg(parser)
    args = parser.parse_args(argv)
    stopped = stop_from_state(args.home / STATE_FILE)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def topics_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop topics", description="Topics with message counts (counted by reading).")
    parser.parse_args(argv)
    kafka = KafkaSettings()
    names = sorted(t for t in admin(kafka).list_topics(timeout=10).topics if not t.startswith("__"))
    for name in names:
        print(f"{name:40s} {count_messages(kafka, name, idle_s=1.0):>10d}")
    return 0


if __name__ == "__main__":
    sys.exit(up_main())
