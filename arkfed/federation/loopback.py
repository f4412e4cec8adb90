"""``arkfed train --federated``: the whole federation on one machine, with real processes on 127.0.0.1.

One SuperLink behind its Fleet-only gateway (:class:`~arkfed.federation.coordinator.launcher.Coordinator`)
and one SuperNode per site (:class:`~arkfed.federation.site.node.SiteNode`) connecting through the
gateway, with signed runs and gated site tasks, exactly as in a deployment; used for trying
federation out, for the tests and for the benchmark. Its throwaway site keys are made at the
coordinator (``certs init --sites``), which is acceptable on one machine only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from arkfed.errors import ArkfedError
from arkfed.federation.certs import init_certificates
from arkfed.federation.coordinator.launcher import Coordinator, prepare_run
from arkfed.federation.processes import stop_all
from arkfed.federation.protocol import FederationSettings
from arkfed.federation.site.node import SiteNode
from arkfed.federation.superexec import remove_secret
from arkfed.ports import free_port


class LoopbackFederation:
    """``arkfed train --federated``: one SuperLink and one SuperNode per site on 127.0.0.1.

    Secure by default: a throwaway CA, coordinator certificate and site keys are created in
    ``RUN/flower/certs`` so the run uses TLS and SuperNode authentication like a real deployment.
    """

    def __init__(self, config, out: Path, site_configs: Sequence[Path], fed: FederationSettings | None = None,
                 secure: bool = True, resume: bool = False, plugins_dirs: Iterable[str | Path] = ()):
        self.out = Path(out).resolve()
        self.config, self.fed = prepare_run(self.out, config, fed or FederationSettings(), resume)
        if not resume:  # so that `arkfed train --resume RUN --federated` finds the sites again
            from arkfed.run.folder import RunFolder

            RunFolder(self.out).write_site_configs([str(Path(p).resolve()) for p in site_configs])
        self.secure = secure
        self.plugins_dirs = list(plugins_dirs)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        certs = None
        if secure:
            certs = init_certificates(self.out / "flower" / "certs", ["127.0.0.1"], self.config.sites)
        self.certs = certs
        self.coordinator = Coordinator(self.out, self.address, certs, self.config.sites)
        self.sites = {}
        for path in site_configs:
            node = SiteNode(Path(path), self.address, certs.ca_cert if certs else None, None, self.plugins_dirs, check_data=False)
            if certs is not None:
                node.key = certs.site_key(node.name)
            self.sites[node.name] = node
        missing = [s for s in self.config.sites if s not in self.sites]
        if missing:
            raise ArkfedError(f"no site config for {missing} (configs given: {[str(p) for p in site_configs]})")

    def start(self) -> None:
        self.coordinator.start()
        for name in self.config.sites:
            self.sites[name].start()
        self.coordinator.submit()
        for name in self.config.sites:
            self.sites[name].wait_connected()

    def resume(self) -> None:
        """Submit this folder's run again with ``resume`` (after its ServerApp was killed)."""
        if self.coordinator.runner is not None:
            self.coordinator.runner.stop()
        self.config, self.fed = prepare_run(self.out, None, None, resume=True)
        self.coordinator.submit(self.out)

    def wait(self, timeout: float | None = None, on_status=None) -> dict:
        """Until the run ends; returns its summary (a site that dies is the coordinator's to handle)."""
        status = self.coordinator.wait(timeout, on_status)
        if status.phase == "failed":
            raise ArkfedError(f"federated run failed: {status.error}")
        return status.summary or {}

    def submit(self, config, out: Path, fed: FederationSettings | None = None) -> None:
        """Start another run on the same SuperLink and SuperNodes (after the previous one ended)."""
        prepare_run(Path(out), config, fed or FederationSettings(), resume=False)
        self.coordinator.submit(Path(out))

    def stop(self) -> None:
        """Sites first (they leave the SuperLink cleanly), then the coordinator."""
        stop_all([proc for node in self.sites.values() for proc in (node.executor, node.process)])
        for node in self.sites.values():
            remove_secret(node.secret)
        self.coordinator.stop()

    def __enter__(self) -> "LoopbackFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_loopback(config, out: Path, site_configs: Sequence[str | Path] = (), fed: FederationSettings | None = None,
                 secure: bool = True, resume: bool = False, view=None, timeout: float | None = None,
                 plugins_dirs: Iterable[str | Path] = ()) -> dict:
    """``arkfed train --federated``: the whole federation on 127.0.0.1 with real processes."""
    from arkfed.run.folder import RunFolder

    if resume:
        config = RunFolder(out).read_config()
        site_configs = site_configs or RunFolder(out).read_site_configs()
    if not site_configs:
        raise ArkfedError("--federated needs the site configs (--sites with YAML names or paths)")
    with LoopbackFederation(config, out, [Path(p) for p in site_configs], fed, secure, resume, plugins_dirs) as federation:
        federation.start()
        return federation.wait(timeout, view.update if view is not None else None)


def train_federated(config, out: Path, site_configs: Sequence[str | Path] = (), resume: bool = False, quiet: bool = False,
                    secure: bool = True, log: str = "", max_update_norm: float | None = None) -> dict:
    """``arkfed train --federated``: :func:`run_loopback` with the live view; returns the summary."""
    from rich.console import Console

    from arkfed.federation.coordinator.live import FederationView

    console = Console(highlight=False, soft_wrap=True)
    mode = "TLS + site authentication (throwaway certificates in RUN/flower/certs)" if secure else "INSECURE"
    console.print(f"federated on this machine: one SuperLink and one SuperNode per site on 127.0.0.1, {mode}")
    from arkfed.run.trackers import parse_log_option

    fed = FederationSettings(log=parse_log_option(log), max_update_norm=max_update_norm or None)
    with FederationView(console, quiet=quiet, title="arkfed train --federated") as view:
        return run_loopback(config, Path(out), site_configs, fed, secure=secure, resume=resume, view=view)
