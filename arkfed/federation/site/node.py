"""A site's processes: its Flower SuperNode and arkfed's warm task executor (``arkfed site``).

The SuperNode runs with ``--isolation process``: its tasks are started by
:mod:`arkfed.federation.site.executor`, which forks them from a process that imported torch and
timm once, and which runs arkfed's own ClientApp only, for runs signed by the coordinator whose CA
the site was given (``--root-certificates``). The node config names the site and its YAML, which
the ClientApp reads. Every start makes a fresh SuperExec secret that the SuperNode and that executor
share, so no other local account can claim the site's tasks through the SuperNode's runtime API on
127.0.0.1 (:mod:`arkfed.federation.superexec`); the SuperNode logs each request it refused. Layout at a
site (``<local_state_dir>`` is made private to the site's account, 0700):
``<local_state_dir>/flower`` (FLWR_HOME, and ``superexec.secret`` while the site runs),
``<local_state_dir>/logs/supernode.log`` and ``executor.log`` (the ClientApp's output), plus what
:mod:`arkfed.federation.site.heads` keeps.

:func:`supervise` is the site's supervisor (``arkfed site``): it keeps the SuperNode connected,
restarting it when it exits. That is what brings a site back after the coordinator restarts:
measured with Flower 1.42 under TLS and site authentication, a SuperNode does NOT reconnect by
itself after the coordinator's process is SIGKILLed and started again with ``--resume`` (the
SuperNode side of adap/flower issue 4844). While the coordinator is down the SuperNode retries its
requests ("Connection attempt failed, retrying in ...", waits growing to Flower's 20 s); once the
new SuperLink is up, that SuperLink (its state is in memory) no longer knows the node's ID, answers
its next pull with HTTP 401, and the SuperNode exits with status 0 ("SuperNode terminated
gracefully") about 4 s later. The supervisor sees the exit within a second and starts a new
SuperNode, which the restarted coordinator admits under the site's registered key
(tests/federation/test_living_federation.py, the chaos test, checks it end to end).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from arkfed.errors import ArkfedError
from arkfed.federation.certs import site_public_key_from_private
from arkfed.federation.processes import ManagedProcess, flower_env, flower_executable, stop_all
from arkfed.federation.superexec import (
    SECRET_OPTION,
    check_listener,
    new_secret,
    private_folder,
    refused_requests,
    remove_secret,
)
from arkfed.ports import free_port

CONNECT_TIMEOUT = 60.0


class SiteNotAdmitted(ArkfedError):
    """The coordinator will not admit this site as configured (key or TLS); restarting cannot help."""


def explain_supernode_exit(log: str, coordinator: str, key: Path | None, root_certificates: Path | None) -> str:
    """A one-line reason why a SuperNode could not stay connected, from its log."""
    if "Failed to activate SuperNode" in log or "[code: 2004]" in log:
        if key is None:
            return (f"the coordinator at {coordinator} requires site authentication; start the site with "
                    "--key SITE.key (made here with `arkfed certs site-key SITE --out DIR`)")
        fingerprint = public_key_fingerprint_text(site_public_key_from_private(key).decode().split()[1])
        return (f"the coordinator at {coordinator} refused this site's key {key} ({fingerprint}): it is not registered "
                "there. Send the matching .pub file to the coordinator, who registers it with `arkfed certs add-site` "
                "and restarts with --sites including this site")
    lowered = log.lower()
    if "certificate verify failed" in lowered or "sslerror" in lowered or "ssl:" in lowered:
        return (f"TLS handshake with {coordinator} failed: check --root-certificates ({root_certificates}) is the "
                "federation's ca.crt and that the coordinator's certificate names this host (arkfed certs init --coordinator-host)")
    if "SuperNode ID:" in log and "terminated gracefully" in log:
        return (f"the SuperNode left: the coordinator at {coordinator} no longer knows its node (it restarted, or removed "
                "this node); Flower's SuperNode does not reconnect by itself")
    if "Exit Code:" in log:
        start = log.rfind("Exit Code:")
        return "SuperNode stopped: " + " ".join(log[start:].split("\n")[1:3]).strip()
    return f"SuperNode stopped unexpectedly; last log lines: {' | '.join(log.strip().splitlines()[-3:])}"


def public_key_fingerprint_text(b64: str) -> str:
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(b64)).digest()).decode().rstrip("=")


class SiteNode:
    """One site's SuperNode, serving the site named in its YAML."""

    def __init__(self, site_config: Path, coordinator: str, root_certificates: Path | None = None,
                 key: Path | None = None, plugins_dirs: Iterable[str | Path] = (), check_data: bool = True):
        from arkfed.site.config import load_site_config
        from arkfed.site.load import load_site

        self.config_path = Path(site_config).resolve()
        self.config = load_site_config(self.config_path)
        self.plugins_dirs = [str(Path(p).resolve()) for p in plugins_dirs]
        if check_data:
            load_site(self.config, self.plugins_dirs)  # bad data fails here, before joining anything
        self.coordinator = coordinator
        self.root_certificates = Path(root_certificates).resolve() if root_certificates else None
        self.key = Path(key).resolve() if key else None
        if self.key is not None:
            site_public_key_from_private(self.key)  # readable and of a kind Flower accepts
        if self.key is not None and self.root_certificates is None:
            raise ArkfedError("--key needs --root-certificates: site authentication only works over TLS")
        self.state_dir = self.config.local_state_dir
        self.process: ManagedProcess | None = None
        self.executor: ManagedProcess | None = None
        self.log_start = 0
        self.secret: Path | None = None  # this start's SuperExec secret (0600), shared with the executor only
        self.refused_seen = 0  # how far refused_since_last() has read the SuperNode's log

    @property
    def name(self) -> str:
        return self.config.name

    def _node_config(self) -> str:
        items = {"site": self.name, "site-config": str(self.config_path)}
        if self.plugins_dirs:
            items["plugins-dir"] = os.pathsep.join(self.plugins_dirs)
        return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())

    def start(self) -> None:
        """Start the SuperNode (process isolation); :meth:`wait_connected` adds arkfed's warm SuperExec."""
        port = free_port()
        argv = [flower_executable("flower-supernode"), "--superlink", self.coordinator, "--port", str(port),
                "--isolation", "process", "--node-config", self._node_config()]
        if self.root_certificates is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.root_certificates)]
        if self.key is not None:
            argv += ["--auth-supernode-private-key", str(self.key)]
        private_folder(self.state_dir)  # heads, logs, outbox and the secret: this account only
        self.secret = new_secret(self.state_dir / "flower")  # fresh at every start; its path only on command lines
        argv += [SECRET_OPTION, str(self.secret)]
        self.env = flower_env(self.state_dir / "flower")
        self.runtime_port = port
        self.executor = None
        log = self.state_dir / "logs" / "supernode.log"
        self.log_start = log.stat().st_size if log.is_file() else 0  # a restart appends to the same log
        self.refused_seen = self.log_start
        self.process = ManagedProcess.start(f"SuperNode of site {self.name!r}", argv, self.env, log)

    def _start_executor(self) -> None:
        """Once connected (a refused site never loads torch): the warm task executor."""
        import sys

        argv = [sys.executable, "-m", "arkfed.federation.site.executor", "--runtime-api-address",
                f"127.0.0.1:{self.runtime_port}", "--insecure", "--parent-pid", str(self.process.pid),
                SECRET_OPTION, str(self.secret)]
        if self.root_certificates is not None:  # runs must be signed by a coordinator this CA certified
            argv += ["--federation-ca", str(self.root_certificates)]
        self.executor = ManagedProcess.start(f"task executor of site {self.name!r}", argv, self.env,
                                             self.state_dir / "logs" / "executor.log")

    def connected(self) -> bool:
        """True once the SuperNode got its node ID (its task executor is then started)."""
        if self.process is None or not self.process.alive() or "SuperNode ID:" not in self.process.log_text(self.log_start):
            return False
        if self.executor is None:
            check_listener(self.runtime_port, f"the runtime API of site {self.name!r}'s SuperNode")
            self._start_executor()
        return True

    def check(self) -> None:
        """Raise a clear ArkfedError if the SuperNode or its task executor has exited."""
        if self.process is not None and not self.process.alive():
            reason = explain_supernode_exit(self.process.log_text(self.log_start), self.coordinator, self.key, self.root_certificates)
            not_admitted = reason.startswith(("the coordinator at", "TLS handshake"))
            raise (SiteNotAdmitted if not_admitted else ArkfedError)(reason, site=self.name)
        if self.executor is not None and not self.executor.alive():
            raise ArkfedError(f"the task executor stopped (status {self.executor.returncode}); {self.executor.log_path} ends: "
                              f"{' | '.join(self.executor.log_tail(3).splitlines())}", site=self.name)

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.connected():
            self.check()
            if time.monotonic() > deadline:
                raise ArkfedError(f"could not connect to the coordinator at {self.coordinator} within {timeout:.0f} s "
                                  f"(log: {self.process.log_path})", site=self.name)
            time.sleep(0.2)

    def refused_since_last(self) -> list[str]:
        """The SuperNode's log lines for runtime requests it refused (a caller without this start's
        secret or a valid task token: another local account) since the last call."""
        if self.process is None:
            return []
        try:
            with self.process.log_path.open("rb") as f:
                f.seek(self.refused_seen)
                data = f.read()
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self.refused_seen += len(complete)
        return refused_requests(complete.decode(errors="replace"))

    def kill(self, sig: int | None = None) -> None:
        """Kill the site (SIGKILL unless ``sig``): its SuperNode, its executor and any running task."""
        import signal

        for proc in (self.executor, self.process):
            if proc is not None:
                proc.kill(signal.SIGKILL if sig is None else sig)

    def stop(self) -> None:
        stop_all([self.executor, self.process])
        remove_secret(self.secret)


def supervise(node: SiteNode, connect_timeout: float, say: Callable[[str, bool], None],
              tick: Callable[[], None] = lambda: None) -> None:
    """Keep ``node`` connected until interrupted (``arkfed site``): start its SuperNode and, whenever
    it exits or loses the coordinator, start it again (after 1 s, doubling up to 30 s while it
    fails; see the module docstring for why this is needed after a coordinator restart). A refusal
    of the site's key is retried for ``connect_timeout`` from the start of the outage (a restarted
    coordinator registers the keys moments after its port opens), then raised as
    :class:`SiteNotAdmitted`. ``say(text, problem)`` reports; ``tick`` runs every second while connected."""
    backoff, outage = 1.0, time.monotonic()
    while True:
        node.start()
        try:
            node.wait_connected(connect_timeout)
            say(f"site {node.name!r}: connected; waiting for work (Ctrl-C to leave)", False)
            backoff, outage = 1.0, None
            while True:
                node.check()
                tick()
                time.sleep(1.0)
        except SiteNotAdmitted as exc:
            outage = outage or time.monotonic()
            if time.monotonic() - outage > connect_timeout:
                raise
            say(f"{exc}; retrying in {backoff:.0f} s (the coordinator may still be starting)", True)
        except ArkfedError as exc:
            outage = outage or time.monotonic()
            say(f"site {node.name!r}: {exc}; starting the SuperNode again in {backoff:.0f} s", True)
        node.stop()
        time.sleep(backoff)
        backoff = min(backoff * 2, 30.0)
