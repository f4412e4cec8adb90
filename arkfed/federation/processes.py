"""Starting Flower's executables as child processes that never outlive arkfed.

Each process runs in its own session (so stopping it stops the helpers Flower spawns, such as
``flower-superexec`` and ``flwr-clientapp``) and, on Linux, gets SIGTERM when arkfed dies. Every
wait is bounded; every log goes to a file the error messages can quote.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from arkfed.errors import ArkfedError
from arkfed.io import PRIVATE, open_append

BIN_DIR = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
# set to "1", these make flower-superlink also open legacy gRPC Fleet/Control servers on 0.0.0.0
UNSAFE_FLOWER_VARIABLES = ("FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_INTERNAL_GRPC_CONTROL_API")


def flower_executable(name: str) -> str:
    """A Flower console script from this environment (the one arkfed runs in)."""
    import shutil

    candidate = BIN_DIR / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ArkfedError(f"Flower executable {name!r} not found next to {sys.executable} or on PATH; is flwr installed?")
    return found


def flower_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry or update checks, fast
    task polling, this environment's bin folder first (Flower starts helpers by name), and none of
    the variables that would open extra network listeners (:data:`UNSAFE_FLOWER_VARIABLES`)."""
    env = {k: v for k, v in os.environ.items() if k not in UNSAFE_FLOWER_VARIABLES}
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5",
        "PATH": f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    Path(home).mkdir(parents=True, exist_ok=True)
    return env


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class ManagedProcess:
    """A started Flower process, its log file, and a way to stop it (and its helpers)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> "ManagedProcess":
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open_append(log_path, PRIVATE, binary=True) as log:  # 0600: a log can hold paths and ids
            popen = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        return cls(name, popen, log_path, list(argv))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self, start: int = 0) -> str:
        """The log from byte ``start`` on (a restarted process appends to the same file)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Crash it (SIGKILL by default) together with everything it started; waits for it to end."""
        self.signal_group(sig)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.popen.wait(timeout=5)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group (Flower shuts down cleanly), SIGKILL if it lingers."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)  # helpers left in the group, if any
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass


def wait_for_port(host: str, port: int, process: ManagedProcess, timeout: float) -> None:
    """Until ``host:port`` accepts connections; fail early, quoting its log, if the process dies."""
    deadline = time.monotonic() + timeout
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.monotonic() < deadline:
        if not process.alive():
            raise ArkfedError(f"{process.name} exited with status {process.returncode}; its log ({process.log_path}) ends:\n"
                              f"{process.log_tail()}")
        try:
            with socket.create_connection((connect_host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise ArkfedError(f"{process.name} did not open {host}:{port} within {timeout:.0f} s (log: {process.log_path})")


def run_flower_cli(args: Sequence[str], env: dict[str, str], timeout: float = 60.0) -> str:
    """Run one ``flwr`` CLI command to completion; return its output or raise naming the command."""
    argv = [flower_executable("flwr"), *args]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ArkfedError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        text = (done.stdout + done.stderr).strip().splitlines()
        raise ArkfedError(f"`flwr {' '.join(args)}` failed: {' '.join(text[-6:])}")
    return done.stdout


def stop_all(processes: Sequence["ManagedProcess | None"], timeout: float = 10.0) -> None:
    """Stop several processes at once: SIGTERM to all, one shared grace period, then SIGKILL."""
    running = [p for p in processes if p is not None]
    for proc in running:
        if proc.alive():
            proc.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in running:
        proc.stop(timeout=0)
