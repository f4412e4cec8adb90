"""A site's SuperExec that starts each ClientApp task from a warm, already-imported process.

Flower's SuperNode hands every message to a fresh ``flwr-clientapp`` interpreter, which then
imports torch and timm again: several seconds of CPU per message, i.e. per site visit. ``arkfed
site`` therefore runs the SuperNode with ``--isolation process`` and this module as its SuperExec:
Flower's own SuperExec loop (:func:`flwr.supercore.superexec.run_superexec.run_superexec`) with an
executor that *forks* the task process from this parent, which imported torch, timm, Flower's
ClientApp runtime and arkfed once. Each task still runs in its own short-lived process through
Flower's :func:`~flwr.supernode.runtime.run_clientapp.run_clientapp`, exactly as ``flwr-clientapp``
would; only the interpreter start-up is saved.

The parent never runs a tensor operation, so no thread pools exist when it forks.

Sites run arkfed's ClientApp and nothing else. Flower would unpack each run's app bundle (FAB)
and import whatever ClientApp its ``pyproject.toml`` names, with the bundle's own files on the
import path. Here the task process instead reads the bundle in memory without unpacking it
(:func:`inspect_bundle`): it must hold ``pyproject.toml`` alone and name arkfed's own ServerApp and
ClientApp; the ClientApp is then :mod:`arkfed.federation.site.client_app`, imported from the installed
arkfed, never from the bundle. Every message is also checked against the coordinator's signature
of the run (:mod:`arkfed.federation.signing`, against the federation CA the site pinned with
``--root-certificates``): the claim must be unexpired, the request must be the signed run's (its
visit plan exactly the scheduled one, its evaluation the signed split) and, for a visit or an
evaluation (or a secure aggregation's message, :mod:`arkfed.federation.secagg`), carry the
coordinator's authorization over its fields and weights; a run or visit
served before is refused as a replay (:mod:`arkfed.federation.site.served`). A refused message gets a one-line
``SITE_REFUSED`` error reply, logged in the site's ``outbox.jsonl`` like every reply. This is done
by replacing two names inside Flower's ``run_clientapp`` module for the task process
(:func:`_install_gate`); ``pyproject.toml`` pins flwr 1.42 for that reason.

Only this launcher can claim the SuperNode's tasks: it signs its runtime requests with the secret
the site made for this start (``--superexec-auth-secret-file``, :mod:`arkfed.federation.superexec`),
through Flower's own SuperExec signing; a forked task gets its token in memory, never on a command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback

from arkfed.federation.flower_app import inspect_bundle  # shared with the coordinator, which checks bundles alike


def preload() -> None:
    """Import what every ClientApp task needs, once, before any fork."""
    import timm  # noqa: F401
    import torch  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import arkfed.ark.metrics  # noqa: F401
    import arkfed.ark.visit  # noqa: F401
    import arkfed.federation.site.client_app  # noqa: F401
    from arkfed.datasets._plugin import discover_plugins

    discover_plugins()


class ForkExecutor:
    """Flower SuperExec executor (same interface as its SubprocessExecutor): one forked process per task."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure: bool = False, root_certificates_path=None):
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure: bool = False, root_certificates_path=None) -> None:
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"arkfed's site executor runs ClientApp tasks only, not {spec.task_type}")
        pid = os.fork()
        if pid == 0:  # the task process: never returns into the SuperExec loop
            os._exit(_run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        import signal

        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


FEDERATION_CA: str | None = None  # the CA this site pinned at enrolment (None: insecure trial, runs unsigned)


class GatedClientApp:
    """arkfed's ClientApp behind the site's checks: the bundle verdict, the run signature and
    expiry, the run id, the request against the signed run, its authorization, and replays."""

    def __init__(self, refusal: str | None):
        self.refusal = refusal

    def check(self, message, context) -> dict | None:
        """The verified claim (None in an insecure trial), or :class:`RunRefused`."""
        from arkfed.federation import messages as m
        from arkfed.federation.membership import check_member_request
        from arkfed.federation.secagg import SECURE
        from arkfed.federation.signing import RunRefused, verify_authorization, verify_run

        if self.refusal:
            raise RunRefused(self.refusal)
        claim = verify_run(context.run_config, FEDERATION_CA) if FEDERATION_CA else None
        if m.REQUEST not in message.content.config_records:
            raise RunRefused("the message carries no arkfed request")
        check_member_request(claim, message.content.config_records[m.REQUEST], FEDERATION_CA)  # after any signed membership change
        if claim is not None and message.metadata.message_type in (m.VISIT, m.EVALUATE, SECURE):
            verify_authorization(context.run_config, FEDERATION_CA, claim, message.metadata.message_type, message.content)
        return claim

    def _served(self, message, context, claim: dict):
        """The site's records and this request's item (None for a hello); the run must not be a replay."""
        from arkfed.federation import messages as m
        from arkfed.federation.signing import request_fields
        from arkfed.federation.site.client_app import node_site_config
        from arkfed.federation.site.served import ServedRecords, served_item

        records = ServedRecords(node_site_config(context).local_state_dir)
        records.check_run(claim, message.metadata.run_id)
        return records, served_item(message.metadata.message_type, request_fields(message.content.config_records[m.REQUEST]))

    def _refuse(self, message, context, exc: Exception):
        from flwr.app import Error, Message

        from arkfed.federation.messages import SITE_REFUSED
        from arkfed.federation.site.client_app import node_site_config
        from arkfed.federation.site.heads import append_outbox

        reason = f"refused: {exc}"
        print(f"arkfed site: run {message.metadata.run_id}: {reason}", flush=True)
        try:
            state_dir = node_site_config(context).local_state_dir
            append_outbox(state_dir, {"message_type": message.metadata.message_type, "run_id": message.metadata.run_id,
                                      "group": message.metadata.group_id,
                                      "error": {"code": SITE_REFUSED, "reason": reason}})
        except Exception as log_exc:  # the refusal stands even if the audit log cannot be written
            print(f"arkfed site: could not log the refusal: {log_exc}", flush=True)
        return Message(Error(code=SITE_REFUSED, reason=reason), reply_to=message)

    def __call__(self, message, context):
        from arkfed.federation.signing import RunRefused
        from arkfed.federation.site.client_app import app

        try:
            claim = self.check(message, context)
            records, item = self._served(message, context, claim) if claim is not None else (None, None)
            if item is None:
                return app(message=message, context=context)
            with records.serve(claim, item, {"flower_run": message.metadata.run_id}):
                reply = app(message=message, context=context)
        except RunRefused as exc:
            return self._refuse(message, context, exc)
        if reply.has_error():  # a failed or refused request may be retried
            records.release(claim, item)
        return reply


def _install_gate() -> None:
    """Make Flower's ``run_clientapp`` inspect the bundle instead of installing it, and load the
    gated arkfed ClientApp instead of the bundle's."""
    import hashlib
    from pathlib import Path

    from flwr.supernode.runtime import run_clientapp as runtime

    verdict: dict[str, object] = {}

    def inspect_instead_of_install(fab_file, *args, **kwargs) -> Path:
        content = bytes(fab_file) if isinstance(fab_file, (bytes, bytearray)) else b""
        verdict["refusal"] = inspect_bundle(content)
        verdict["hash"] = hashlib.sha256(content).hexdigest()
        return Path(os.devnull)

    def load_gated(fab_id: str, fab_version: str, fab_hash: str) -> GatedClientApp:
        refusal = verdict.get("refusal", "the run's app bundle was not inspected")
        if refusal is None and verdict.get("hash") != fab_hash:
            refusal = "the run's app bundle does not match its hash"
        return GatedClientApp(refusal)  # type: ignore[arg-type]

    for name in ("install_from_fab", "get_load_client_app_fn"):
        if not hasattr(runtime, name):  # a Flower change must not silently skip the gate
            raise RuntimeError(f"flwr.supernode.runtime.run_clientapp has no {name}; arkfed's site gate needs flwr 1.42")
    runtime.install_from_fab = inspect_instead_of_install
    runtime.get_load_client_app_fn = lambda *args, **kwargs: load_gated


def _run_task(spec) -> int:
    """Body of a forked task process: Flower's ClientApp runtime, as ``flwr-clientapp`` runs it,
    with arkfed's gate in place of bundle installation and loading (:func:`_install_gate`)."""
    try:
        from flwr.supercore.exit import exit_handler
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        _install_gate()
        exit_handler.registered_exit_handlers.clear()  # the parent's handlers are not ours
        exit_handler._lock_handlers = threading.Lock()
        from arkfed.federation.site.client_app import guard_task_replies

        guard_task_replies()  # Flower's own error text never leaves the site (issue 8, item 6)
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=os.getppid(),
            runtime_dependency_install=False,
        )
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="arkfed site SuperExec (forks warm ClientApp task processes)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--federation-ca", default=None,
                        help="the federation's ca.crt: runs must be signed by a coordinator certificate it issued")
    parser.add_argument("--superexec-auth-secret-file", dest="secret_file", required=True,
                        help="the secret the SuperNode was started with (only this launcher may claim its tasks)")
    args = parser.parse_args(argv)
    from arkfed.federation.superexec import read_secret

    secret = read_secret(args.secret_file)
    global FEDERATION_CA
    FEDERATION_CA = args.federation_ca
    if FEDERATION_CA is None:
        print("arkfed site: no federation CA (insecure trial): runs are not checked for a coordinator signature", flush=True)
    preload()
    from flwr.supercore.superexec import run_superexec as superexec

    executor = ForkExecutor()
    superexec.get_executor = lambda *a, **k: executor  # Flower's loop, our executor
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=secret,  # Flower signs every acquire-task with it (SuperExecAuthHttpInterceptor)
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
