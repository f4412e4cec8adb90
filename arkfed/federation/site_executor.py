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
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback


def preload() -> None:
    """Import what every ClientApp task needs, once, before any fork."""
    import timm  # noqa: F401
    import torch  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import arkfed.federation.client_app  # noqa: F401
    import arkfed.metrics  # noqa: F401
    import arkfed.visit  # noqa: F401
    from arkfed.plugins import discover_plugins

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


def _run_task(spec) -> int:
    """Body of a forked task process: Flower's ClientApp runtime, as ``flwr-clientapp`` runs it."""
    try:
        from flwr.supercore.exit import exit_handler
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        exit_handler.registered_exit_handlers.clear()  # the parent's handlers are not ours
        exit_handler._lock_handlers = threading.Lock()
        from arkfed.federation.client_app import guard_task_replies

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
    args = parser.parse_args(argv)
    preload()
    from flwr.supercore.superexec import run_superexec as superexec

    executor = ForkExecutor()
    superexec.get_executor = lambda *a, **k: executor  # Flower's loop, our executor
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
