"""Only arkfed's own task launchers may claim Flower tasks: SuperExec authentication (issue 22).

Flower's runtime API (a site's SuperNode, the coordinator's SuperLink) hands a pending task, with
the token that lets its holder read the task's input (run config, app bundle, the messages with
the model) and push its output, to whoever calls ``/v1/runtime/acquire-task``. It listens on
127.0.0.1, where every local account can call it; Flower authenticates that call only when the
SuperNode / SuperLink was started with ``--superexec-auth-secret-file`` (HMAC-SHA256 over method,
timestamp, single-use nonce and body: :mod:`flwr.supercore.auth.superexec`).

So ``arkfed site`` and ``arkfed coordinator`` make a fresh random secret at every start
(:func:`new_secret`: 0600, written atomically, in a folder only their account can enter, never on
a command line or in a log), start the SuperNode / SuperLink with it and give its path to their
task launcher, which signs its requests with Flower's own interceptor (``run_superexec(...,
superexec_auth_secret=...)``, as ``flower-superexec --superexec-auth-secret-file`` does). A task's
token then reaches the task process in memory only: the site's launcher forks it
(:mod:`.site.executor`); the coordinator's (:class:`ServerAppExecutor`) gives its ServerApp task
process (:mod:`arkfed.federation.coordinator.serverapp_task`: arkfed's own ServerApp, never a
bundle's) an anonymous in-memory file, where Flower's own launcher would put ``--token`` on a
command line that every local account can read in ``/proc/PID/cmdline``.

Flower logs every refused request in the SuperNode's or SuperLink's own log
(``[/v1/runtime/acquire-task][ApiError:1008] SuperExec authentication failed ...``);
:func:`refused_requests` finds those lines so the site can report them.

``python -m arkfed.federation.superexec`` is the coordinator's task launcher.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from arkfed.errors import ArkfedError

SECRET_FILE = "superexec.secret"
SECRET_OPTION = "--superexec-auth-secret-file"  # Flower's own option (flower-supernode, -superlink, -superexec)
# Flower's log line for a runtime request it refused (no or a wrong SuperExec signature, no or a wrong task token)
REFUSED = re.compile(r"\[(/v1/runtime/[\w-]+)\]\[ApiError:1008\] ([^\n]*)")


def private_folder(path: str | Path) -> Path:
    """``path``, created if needed, that only this account can list or enter (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def new_secret(folder: str | Path) -> Path:
    """A fresh random secret (256 bits from the OS, as hex) in ``folder/superexec.secret``: written
    through a new 0600 file and renamed into place, in a 0700 folder. Returns its path."""
    import secrets

    from arkfed.io import atomic_write

    path = private_folder(folder) / SECRET_FILE
    atomic_write(path, lambda tmp: tmp.write_text(secrets.token_hex(32)), mode=0o600)
    return path


def read_secret(path: str | Path) -> bytes:
    """The secret at ``path`` (Flower's own loader), refused unless it is a regular file of this
    account that no other account can read or write."""
    from flwr.supercore.auth import load_superexec_auth_secret

    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ArkfedError(f"{path}: the SuperExec secret must be a regular file of this account with mode 0600")
    secret = load_superexec_auth_secret(str(path))
    if not secret:
        raise ArkfedError(f"{path}: the SuperExec secret is empty")
    return secret


def remove_secret(path: str | Path | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


def refused_requests(log: str) -> list[str]:
    """Flower's lines for runtime requests it refused (authentication), in a SuperNode/SuperLink log."""
    return [match.group(0) for match in REFUSED.finditer(log)]


def listener_uids(port: int) -> set[int] | None:
    """The accounts (uids) with a socket listening on TCP ``port`` at 127.0.0.1 or any address, from
    ``/proc/net/tcp`` and ``tcp6`` (None where there is no such table: not Linux)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].is_file():
        return None
    suffix = f":{port:04X}"
    local = {"0100007F", "00000000", "00000000000000000000000000000000", "0000000000000000FFFF00000100007F"}
    uids = set()
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl, local, remote, state, queues, timer, retransmits, uid, ...
            if len(fields) > 7 and fields[3] == "0A" and fields[1].endswith(suffix) and fields[1][: -len(suffix)] in local:
                uids.add(int(fields[7]))
    return uids


def check_listener(port: int, what: str) -> None:
    """Refuse to hand the task launcher (and its signed requests) to ``127.0.0.1:port`` unless only
    this account listens there: another local account could have bound the port first."""
    uids = listener_uids(port)
    if uids is not None and uids != {os.getuid()}:
        raise ArkfedError(f"127.0.0.1:{port}, {what}, is listened on by account(s) {sorted(uids) or 'none'}, not (only) "
                          f"this one ({os.getuid()}): another local account may hold the port; not starting the task launcher")


class ServerAppExecutor:
    """Flower SuperExec executor for the coordinator: arkfed's ServerApp task process
    (:mod:`arkfed.federation.coordinator.serverapp_task`, never a bundle's ServerApp) for ServerApp
    tasks only (other task types are never acquired), its task token passed through an in-memory file."""

    def __init__(self, task_args: list[str] | None = None) -> None:
        self.children: dict[subprocess.Popen, str | None] = {}  # process -> its token file on disk, if any
        self.task_args = list(task_args or [])  # --signer, --hide, --tmp-dir for the task process

    def get_eligible_capacity(self, supported_task_types, *, insecure: bool = False, root_certificates_path=None):
        from flwr.supercore.constant import TaskType

        return {t for t in supported_task_types if t == TaskType.SERVER_APP}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure: bool = False, root_certificates_path=None) -> None:
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.SERVER_APP:
            return LaunchResult.failed(f"arkfed's coordinator runs ServerApp tasks only, not {spec.task_type}")
        fd, token_path, on_disk = _token_file(spec.token)
        argv = [sys.executable, "-m", "arkfed.federation.coordinator.serverapp_task", "--runtime-api-address",
                spec.runtime_api_address, "--token-file", token_path, *self.task_args]
        if spec.insecure:
            argv.append("--insecure")
        elif spec.root_certificates_path is not None:
            argv += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=() if fd is None else (fd,))
        except OSError as exc:
            if on_disk:
                os.unlink(token_path)
            return LaunchResult.failed(f"could not start flwr-serverapp: {exc}")
        finally:
            if fd is not None:
                os.close(fd)
        self.children[child] = token_path if on_disk else None
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished ServerApp processes (and remove their token files, if any)."""
        for child, token_path in list(self.children.items()):
            if child.poll() is not None:
                del self.children[child]
                if token_path:
                    Path(token_path).unlink(missing_ok=True)

    def close(self) -> None:
        for child, token_path in self.children.items():
            if child.poll() is None:
                child.terminate()
            if token_path:
                Path(token_path).unlink(missing_ok=True)


TOKEN_FOLDER: Path | None = None  # where token files go where there are no in-memory files (not Linux)


def _token_file(token: str) -> tuple[int | None, str, bool]:
    """``(fd to pass, path the child reads, whether it is on disk)``. On Linux an anonymous
    in-memory file the child reads through ``/proc/self/fd/N`` (other accounts cannot open another
    process's fds); elsewhere a new 0600 file in the 0700 folder of the secret."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("flwr-task-token")  # close-on-exec; Popen's pass_fds hands it to this child only
        os.write(fd, token.encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd, f"/proc/self/fd/{fd}", False
    import tempfile

    fd, path = tempfile.mkstemp(dir=TOKEN_FOLDER, prefix=".task-", suffix=".token")  # 0600, O_EXCL
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    return None, path, True


def main(argv: list[str] | None = None) -> None:
    """The coordinator's task launcher: Flower's SuperExec loop, signing with the SuperLink's secret,
    launching ServerApp tasks through :class:`ServerAppExecutor`."""
    parser = argparse.ArgumentParser(description="arkfed coordinator's SuperExec (ServerApp tasks only)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument(SECRET_OPTION, dest="secret_file", required=True)
    parser.add_argument("--signer", required=True, help="the coordinator's signing service (a Unix socket)")
    parser.add_argument("--hide", action="append", default=[], help="a key file the ServerApp must not read")
    parser.add_argument("--tmp-dir", default=None, help="TMPDIR for the ServerApp")
    args = parser.parse_args(argv)
    global TOKEN_FOLDER
    TOKEN_FOLDER = Path(args.secret_file).parent
    secret = read_secret(args.secret_file)
    from flwr.supercore.superexec import run_superexec as superexec

    task_args = ["--signer", args.signer, *(a for path in args.hide for a in ("--hide", path))]
    if args.tmp_dir:
        task_args += ["--tmp-dir", args.tmp_dir]
    executor = ServerAppExecutor(task_args)
    superexec.get_executor = lambda *a, **k: executor  # Flower's loop, our executor
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=secret,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
