"""The coordinator's ServerApp task process: arkfed's own ServerApp, whoever submitted the run.

Flower's ``flwr-serverapp`` unpacks a run's app bundle (FAB) and imports whatever ServerApp its
``pyproject.toml`` names, with the bundle's files first on the import path, as the coordinator's
account. arkfed's launcher (:class:`arkfed.federation.superexec.ServerAppExecutor`) starts this
module instead, which runs Flower's own ServerApp runtime
(:func:`flwr.superlink.runtime.run_serverapp.run_serverapp`) with three names replaced, exactly
as a site's task process does for its ClientApp (:mod:`arkfed.federation.site.executor`):

- the bundle is read in memory and never unpacked (:func:`arkfed.federation.flower_app.inspect_bundle`):
  it must be a lone ``pyproject.toml`` naming arkfed's ServerApp and ClientApp; the run config is
  read from it in memory too;
- before anything runs, the coordinator's signing service must admit the run
  (:mod:`arkfed.federation.coordinator.signer`, op ``start``): only the run this coordinator
  submitted last, once, with its run folder and signed claim unchanged;
- the ServerApp is then :data:`arkfed.federation.coordinator.server_app.app`, imported from the
  installed arkfed, never from the bundle.

A refused run fails in Flower with the reason (``flwr ls`` shows it; the launcher's log has it);
none of the bundle's code runs. Before any of this, while the process is still single-threaded,
the key files named by ``--hide`` are hidden from it (:mod:`arkfed.federation.sandbox`), so even
arkfed's own ServerApp, should it be subverted, cannot read ``coordinator.key`` or ``ca.key``;
and ``TMPDIR`` points into the run's private Flower folder.
"""

from __future__ import annotations

import argparse
import os
import sys


class RunNotAdmitted(Exception):
    """The coordinator refuses to run this submission's ServerApp."""


def _install_gate(signer: str) -> None:
    """Replace bundle installation, project config reading and app loading in Flower's runtime."""
    import importlib
    from pathlib import Path

    from flwr.common.config import flatten_dict, fuse_dicts, get_fab_config

    runtime = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    from arkfed.federation.flower_app import SERVER_APP, inspect_bundle

    bundle: dict[str, object] = {}

    def inspect_instead_of_install(fab_file, *args, **kwargs) -> Path:
        content = bytes(fab_file) if isinstance(fab_file, (bytes, bytearray)) else b""
        refusal = inspect_bundle(content)
        if refusal is not None:
            raise RunNotAdmitted(f"arkfed's coordinator refuses this run: {refusal}; none of its code runs")
        bundle["config"] = get_fab_config(content)
        return Path(os.devnull)

    def project_config(_app_dir) -> dict:
        return bundle["config"]  # type: ignore[return-value]

    def fused_config(_app_dir, override_config) -> dict:
        return fuse_dicts(flatten_dict(bundle["config"]["tool"]["flwr"]["app"].get("config", {})), override_config)

    def run_arkfed(grid, context, server_app_dir: str, server_app_attr: str | None = None, loaded_server_app=None):
        from flwr.server.run_serverapp import run

        from arkfed.federation.coordinator.server_app import RUN_DIR_KEY
        from arkfed.federation.coordinator.signer import SIGNER_ENV, SignerRefused, call
        from arkfed.federation.signing import CLAIM_KEY, TICKET_KEY

        if server_app_attr != SERVER_APP:  # inspect_bundle checked it already
            raise RunNotAdmitted(f"arkfed's coordinator runs {SERVER_APP} only")
        config = context.run_config
        try:
            call(signer, "start", ticket=str(config.get(TICKET_KEY, "")), run_dir=str(config.get(RUN_DIR_KEY, "")),
                 claim=config.get(CLAIM_KEY))
        except SignerRefused as exc:
            raise RunNotAdmitted(f"arkfed's coordinator refuses this run: {exc}") from None
        os.environ[SIGNER_ENV] = signer
        from arkfed.federation.coordinator.server_app import app

        print(f"arkfed ServerApp: run folder {config.get(RUN_DIR_KEY)} admitted by the coordinator's signing service", flush=True)
        return run(grid=grid, context=context, server_app_dir="", loaded_server_app=app)

    for name in ("install_from_fab", "get_project_config", "get_fused_config_from_dir", "run_"):
        if not hasattr(runtime, name):  # a Flower change must not silently skip the gate
            raise RuntimeError(f"flwr.superlink.runtime.run_serverapp has no {name}; arkfed's coordinator gate needs flwr 1.42")
    runtime.install_from_fab = inspect_instead_of_install
    runtime.get_project_config = project_config
    runtime.get_fused_config_from_dir = fused_config
    runtime.run_ = run_arkfed


def _hide_keys(paths: list[str]) -> None:
    from arkfed.federation.sandbox import SandboxUnavailable, hide_files

    if not paths:
        return
    try:
        count = hide_files(paths)
        print(f"arkfed ServerApp: {count} key file(s) hidden from this process (Landlock)", flush=True)
    except SandboxUnavailable as exc:
        print(f"arkfed ServerApp: WARNING: the key files stay readable by the ServerApp: {exc}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="arkfed coordinator's ServerApp task (arkfed's ServerApp only)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--signer", required=True, help="the coordinator's signing service (a Unix socket)")
    parser.add_argument("--hide", action="append", default=[], help="a key file this process must not read")
    parser.add_argument("--tmp-dir", default=None, help="TMPDIR for the ServerApp (inside the run's private folder)")
    args = parser.parse_args(argv)
    with open(args.token_file, encoding="utf-8") as f:  # an in-memory file from the launcher
        token = f.read().strip()
    certificates = None
    if not args.insecure and args.root_certificates:
        with open(args.root_certificates, "rb") as f:
            certificates = f.read()
    if args.tmp_dir:
        os.makedirs(args.tmp_dir, mode=0o700, exist_ok=True)
        os.environ["TMPDIR"] = args.tmp_dir
    _hide_keys(args.hide)  # single-threaded still: Landlock covers every thread started from here on

    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue, restore_output
    from flwr.superlink.runtime.run_serverapp import run_serverapp

    _install_gate(args.signer)
    log_queue: Queue = Queue()
    mirror_output_to_queue(log_queue)
    try:
        run_serverapp(runtime_api_address=args.runtime_api_address, log_queue=log_queue, token=token, insecure=args.insecure,
                      certificates=certificates, parent_pid=args.parent_pid, runtime_dependency_install=False)
    finally:
        restore_output()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
