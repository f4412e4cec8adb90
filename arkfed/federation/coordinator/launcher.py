"""The coordinator's processes: its Flower SuperLink and the submitted run (``arkfed coordinator``).

:class:`Coordinator` starts Flower's SuperLink on 127.0.0.1 only (TLS + SuperNode authentication
with a certificate folder, or ``--insecure``), behind a check that answers the coordinator's own
account only (:mod:`arkfed.federation.coordinator.superlink`), and, on the public ``--address``,
the Fleet-only gateway (:mod:`arkfed.federation.coordinator.gateway`): Flower's Control and
ServerApp APIs share the SuperLink's port and are unauthenticated in open-source Flower, so they
must never face the network nor another local account. The SuperLink runs with ``--isolation
process`` and a fresh SuperExec secret per start, shared with arkfed's ServerApp launcher only
(:mod:`arkfed.federation.superexec`), which runs arkfed's own ServerApp for the run this
coordinator submitted and nothing else (:mod:`arkfed.federation.coordinator.serverapp_task`). The
coordinator's key stays in this process, in its signing service
(:mod:`arkfed.federation.coordinator.signer`), which signs each submission's claim and every
request of its ServerApp. It registers each site's public key under the site's name through the
loopback Control API, submits the generated Flower app (signed, :mod:`arkfed.federation.signing`)
with ``flwr run --stream`` and follows the ServerApp through the status file it writes. Layout at
the coordinator (``RUN`` is made private to the coordinator's account, 0700)::

    RUN/flower/            FLWR_HOME of the SuperLink and the flwr CLI (config.toml, installed app),
                           superexec.secret and signer.sock (0600) while the coordinator runs,
                           tmp/ (the ServerApp's TMPDIR)
    RUN/flower/app/        the generated Flower app (pyproject.toml only)
    RUN/logs/              superlink.log, gateway.log (every request from outside, refused ones too; rotated),
                           superexec.log (the ServerApp launcher), serverapp.log (the ServerApp's output),
                           inbox.jsonl (what every site message carried), registered-sites.log

Sites are started by :mod:`arkfed.federation.site.node`; both together on one machine by
:mod:`arkfed.federation.loopback`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from arkfed.errors import ArkfedError
from arkfed.federation.certs import CertificateFolder, public_key_fingerprint
from arkfed.federation.coordinator.gateway import run_push_object_limit
from arkfed.federation.coordinator.signer import SigningService
from arkfed.federation.coordinator.status import STATUS_FILE, FederationStatus, read_status
from arkfed.federation.flower_app import CONNECTION, split_address, write_connection, write_flower_app
from arkfed.federation.processes import (
    LOOPBACK,
    ManagedProcess,
    flower_env,
    flower_executable,
    run_flower_cli,
    stop_all,
    wait_for_port,
)
from arkfed.federation.protocol import FederationSettings
from arkfed.federation.superexec import SECRET_OPTION, check_listener, new_secret, private_folder, remove_secret
from arkfed.ports import free_port

START_TIMEOUT = 60.0


def prepare_run(out: Path, config, fed: FederationSettings, resume: bool):
    """Write (or, on resume, check) the run folder the ServerApp will read."""
    from arkfed.run.folder import RunFolder

    run = RunFolder(out)
    if resume:
        if not run.has_run():
            raise ArkfedError(f"{run.path}: nothing to resume (no config.yaml)")
        return run.read_config(), FederationSettings.read(run.path)
    if run.has_run():
        raise ArkfedError(f"{run.path} already holds a run; pass --resume {run.path} or choose another --out")
    private_folder(run.path)  # the coordinator's account only (0700)
    run.write_config(config)
    fed.write(run.path)
    return config, fed


def print_insecure_warning(echo: Callable[[str], None]) -> None:
    echo("WARNING: --insecure: traffic between coordinator and sites is NOT encrypted and sites are NOT "
         "authenticated; anyone who can reach the port can join. Use only on a trusted network or for trials.")


class Coordinator:
    """The coordinator's SuperLink plus the submitted run (``flwr run`` streaming its logs)."""

    def __init__(self, run_dir: Path, address: str, certs: CertificateFolder | None, sites: Sequence[str],
                 superlink_port: int | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.host, self.port = split_address(address)  # the public address: the Fleet gateway
        self.superlink_port = superlink_port or free_port(LOOPBACK)  # the SuperLink: loopback only
        if self.superlink_port == self.port and self.host in (LOOPBACK, "0.0.0.0", "", "::"):
            raise ArkfedError(f"--superlink-port {self.superlink_port} is the public address's port; choose another")
        self.certs, self.sites = certs, list(sites)
        self.home = self.run_dir / "flower"
        self.logs = self.run_dir / "logs"
        self.superlink: ManagedProcess | None = None
        self.gateway: ManagedProcess | None = None
        self.launcher: ManagedProcess | None = None  # arkfed's SuperExec: launches the ServerApp tasks
        self.runner: ManagedProcess | None = None
        self.secret: Path | None = None  # this start's SuperExec secret (0600), shared with the launcher only
        self.push_object_limit = 0  # the gateway's push-object body limit, from the run's model at start
        self.signer: SigningService | None = None  # holds coordinator.key; the ServerApp asks it for signatures
        if certs is not None:
            certs.check_coordinator()
            missing = [s for s in self.sites if s not in certs.registered_sites()]
            if missing:
                raise ArkfedError(
                    f"no public key for site(s) {missing} in {certs.sites_dir}; each site makes its key with "
                    f"`arkfed certs site-key SITE --out DIR` and sends SITE.pub, which you register with "
                    f"`arkfed certs add-site SITE SITE.pub --certs {certs.root}`"
                )

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    @property
    def address(self) -> str:
        """Where sites connect (the gateway)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        """Start the SuperLink on loopback with arkfed's ServerApp launcher, the Fleet gateway on the
        public address and, with authentication, register each site's public key by name (through
        the loopback Control API)."""
        private_folder(self.run_dir)  # the run's model, logs and the secret: this account only
        self.push_object_limit = run_push_object_limit(self.run_dir)
        self.secret = new_secret(self.home)  # fresh at every start; its path only on command lines
        self.signer = SigningService(self.home, self.certs).start()  # the key stays in this process
        argv = [sys.executable, "-m", "arkfed.federation.coordinator.superlink", "--host", LOOPBACK, "--port", str(self.superlink_port),
                "--disable-runtime-dependency-installation", "--isolation", "process", SECRET_OPTION, str(self.secret)]
        gateway = [sys.executable, "-m", "arkfed.federation.coordinator.gateway", "--listen", f"{self.host}:{self.port}",
                   "--upstream", f"{LOOPBACK}:{self.superlink_port}", "--log-file", str(self.logs / "gateway.log"),
                   "--max-push-object", str(self.push_object_limit)]  # bodies sized from the run's model
        launcher = [sys.executable, "-m", "arkfed.federation.superexec", "--runtime-api-address",
                    f"{LOOPBACK}:{self.superlink_port}", SECRET_OPTION, str(self.secret), "--signer", str(self.signer.path),
                    "--tmp-dir", str(self.home / "tmp"), *(a for key in self._hidden_keys() for a in ("--hide", str(key)))]
        if self.certs is None:
            argv.append("--insecure")
            gateway.append("--insecure")
            launcher.append("--insecure")
        else:
            argv += ["--ssl-certfile", str(self.certs.coordinator_cert), "--ssl-keyfile", str(self.certs.coordinator_key),
                     "--ssl-ca-certfile", str(self.certs.ca_cert), "--enable-supernode-auth"]
            gateway += ["--certfile", str(self.certs.coordinator_cert), "--keyfile", str(self.certs.coordinator_key),
                        "--upstream-ca", str(self.certs.ca_cert), "--supernode-auth"]
            launcher += ["--root-certificates", str(self.certs.ca_cert)]
        write_connection(self.home, self.superlink_port, self.certs.ca_cert if self.certs else None)
        self.superlink = ManagedProcess.start("SuperLink", argv, self.env, self.logs / "superlink.log")
        self.gateway = ManagedProcess.start("Fleet gateway", gateway, self.env, self.logs / "gateway.log")
        wait_for_port(LOOPBACK, self.superlink_port, self.superlink, START_TIMEOUT)
        check_listener(self.superlink_port, "the SuperLink's loopback port")
        self.launcher = ManagedProcess.start("ServerApp launcher", [*launcher, "--parent-pid", str(self.superlink.pid)],
                                             self.env, self.logs / "superexec.log")
        wait_for_port(self.host, self.port, self.gateway, START_TIMEOUT)
        if self.certs is not None:
            self._register_sites()

    def _register_sites(self) -> None:
        """``flwr supernode register KEY --name SITE`` for every listed site (concurrently)."""
        from concurrent.futures import ThreadPoolExecutor

        keys = self.certs.registered_sites()

        def register(site: str) -> str:
            run_flower_cli(["supernode", "register", str(keys[site]), CONNECTION, "--name", site, "--format", "json"], self.env)
            return f"{site} {public_key_fingerprint(keys[site])}"

        with ThreadPoolExecutor(max_workers=max(len(self.sites), 1)) as pool:
            lines = list(pool.map(register, self.sites))
        (self.logs / "registered-sites.log").write_text("\n".join(lines) + "\n")

    def submit(self, run_dir: Path | None = None) -> None:
        """Submit the generated app for ``run_dir`` (default: the first run folder); ``flwr run
        --stream`` follows the ServerApp until it ends. One run at a time; the SuperLink and the
        connected sites serve any number of runs one after the other."""
        if self.runner is not None and self.runner.alive():
            raise ArkfedError(f"a run is still going on in {self.run_dir}")
        if run_dir is not None:
            if run_push_object_limit(Path(run_dir)) > self.push_object_limit:  # the gateway would refuse its arrays
                raise ArkfedError(f"{run_dir}: its model is larger than the one this coordinator's gateway was "
                                  "started for; start a new coordinator for it")
            self.run_dir = private_folder(Path(run_dir).resolve())
        if self.signer is None:
            raise ArkfedError("start the coordinator before submitting a run")
        lifetime = FederationSettings.read(self.run_dir).claim_lifetime
        (self.run_dir / STATUS_FILE).unlink(missing_ok=True)  # a resumed run's old status (a killed ServerApp's "failed") is stale
        app_dir = write_flower_app(self.run_dir, entries=self.signer.submit(self.run_dir, lifetime))  # signed in this process
        argv = [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        self.runner = ManagedProcess.start("flwr run", argv, self.env, self.run_dir / "logs" / "serverapp.log")

    def status(self) -> FederationStatus | None:
        return read_status(self.run_dir)

    def wait(self, timeout: float | None = None, on_status: Callable[[FederationStatus | None], None] | None = None,
             poll: float = 0.5) -> FederationStatus:
        """Until the ServerApp reports finished/failed; raise if it or the SuperLink dies first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ended_at = None
        while True:
            status = self.status()
            if on_status is not None:
                on_status(status)
            if status is not None and status.finished:
                self._let_runner_end(30.0)
                return status
            for proc in (self.superlink, self.gateway, self.launcher):
                if proc is not None and not proc.alive():
                    raise ArkfedError(f"the {proc.name} stopped (status {proc.returncode}); log {proc.log_path}:\n{proc.log_tail()}")
            if self.runner is not None and not self.runner.alive():
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > 2:  # the status file gets a moment to land
                    raise ArkfedError(f"the ServerApp ended without finishing the run; {self.runner.log_path} ends:\n"
                                      f"{self.runner.log_tail()}")
            if deadline is not None and time.monotonic() > deadline:
                raise ArkfedError(f"the federated run did not finish within {timeout:.0f} s (status: {status.phase if status else 'none'})")
            time.sleep(poll)

    def _let_runner_end(self, timeout: float) -> None:
        """After the ServerApp reported the end, ``flwr run --stream`` exits once Flower marks the
        run finished; give it ``timeout`` seconds, then stop it (it only streams logs)."""
        if self.runner is None:
            return
        deadline = time.monotonic() + timeout
        while self.runner.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.runner.stop()

    def _hidden_keys(self) -> list[Path]:
        """The private keys the ServerApp must not read (:mod:`arkfed.federation.sandbox`): all but
        those inside the run folder, which the ServerApp writes (``arkfed train --federated``'s
        throwaway keys in ``RUN/flower/certs``: said so once)."""
        if self.certs is None:
            return []
        keys = [self.certs.ca_key, self.certs.coordinator_key, *sorted(self.certs.sites_dir.glob("*.key"))]
        inside = [k for k in keys if k.resolve().is_relative_to(self.run_dir)]
        if inside:
            print(f"note: {len(inside)} key file(s) in the run folder {self.run_dir} stay readable by its ServerApp "
                  "(throwaway keys of a one-machine federation)", flush=True)
        return [k for k in keys if k.is_file() and k not in inside]

    def stop(self) -> None:
        stop_all([self.runner, self.launcher, self.gateway, self.superlink])
        remove_secret(self.secret)
        if self.signer is not None:
            self.signer.stop()


def run_coordinator(config, out: Path, fed: FederationSettings, address: str, certs: CertificateFolder | None,
                    resume: bool = False, view=None, timeout: float | None = None, superlink_port: int | None = None) -> dict:
    """``arkfed coordinator``: SuperLink + gateway + ServerApp for sites that join from elsewhere; the summary."""
    config, fed = prepare_run(Path(out), config, fed, resume)
    coordinator = Coordinator(Path(out), address, certs, config.sites, superlink_port)
    try:
        coordinator.start()
        coordinator.submit()
        status = coordinator.wait(timeout, view.update if view is not None else None)
    finally:
        coordinator.stop()
    if status.phase == "failed":
        raise ArkfedError(f"federated run failed: {status.error}")
    return status.summary or {}
