"""Serving the console with uvicorn: on its own (``arkfed console``) or beside a coordinator or a
site in the same process (``--console HOST:PORT``), in a thread that ends with the process."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from arkfed.console.app import ConsoleTarget, create_app
from arkfed.console.security import Guard, check_binding, is_loopback, read_password_file
from arkfed.errors import ArkfedError

DEFAULT_ADDRESS = "127.0.0.1:8765"
WILDCARDS = ("0.0.0.0", "::", "")


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into its parts; one clear error otherwise."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ArkfedError(f"console address {address!r}: expected HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host.strip("[]"), int(port)


@dataclass
class ConsoleSettings:
    """How one console is served (the ``arkfed console`` options)."""

    address: str = DEFAULT_ADDRESS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    login: bool = False
    password_file: Path | None = None
    poll_seconds: float = 2.0

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> tuple[str, int]:
        host, port = parse_address(self.address)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ArkfedError("the console's TLS needs both a certificate and its key (--tls-cert and --tls-key, or --certs DIR)")
        for path in (self.tls_cert, self.tls_key, self.password_file):
            if path is not None and not Path(path).is_file():
                raise ArkfedError(f"{path}: no such file")
        check_binding(host, self.tls, self.login or self.password_file is not None or not is_loopback(host))
        return host, port


def allowed_hosts(host: str, tls_cert: Path | None) -> tuple[str, ...]:
    """The names a browser may use for this console: the loopback names, the bound address, and
    (with TLS) the names its certificate holds."""
    names = ["127.0.0.1", "localhost", "::1"]
    if host not in WILDCARDS:
        names.append(host)
    if tls_cert is not None:
        from arkfed.federation.certs import certificate_hosts

        names += certificate_hosts(Path(tls_cert))
    return tuple(dict.fromkeys(names))


def make_guard(settings: ConsoleSettings, host: str) -> Guard:
    """Login off the loopback interface (or with --login / --password-file): a printed token unless a password file."""
    password = read_password_file(settings.password_file) if settings.password_file is not None else None
    login = settings.login or password is not None or not is_loopback(host)
    token = secrets.token_urlsafe(18) if login and password is None else None
    return Guard(login=login, token=token, password_hash=password,
                 allowed_hosts=allowed_hosts(host, settings.tls_cert))


@dataclass
class RunningConsole:
    server: object
    thread: threading.Thread
    url: str
    guard: Guard

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_console(kind: str, path: Path, settings: ConsoleSettings, timeout: float = 15.0) -> RunningConsole:
    """Serve the console for ``path`` (a run folder or a site YAML) in a daemon thread; returns once it listens."""
    import uvicorn

    host, port = settings.check()
    guard = make_guard(settings, host)
    app = create_app(ConsoleTarget(kind, Path(path), settings.poll_seconds, settings.tls), guard)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", ws="none",
                            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="arkfed-console", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ArkfedError(f"the console could not listen on {settings.address} (is the port in use?)")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
    shown = "127.0.0.1" if host in WILDCARDS else host
    shown = f"[{shown}]" if ":" in shown else shown
    return RunningConsole(server, thread, f"{'https' if settings.tls else 'http'}://{shown}:{bound}/", guard)


def announce(console: RunningConsole, print_line) -> None:
    """What the operator needs to open it: the address, and the login token when there is one."""
    print_line(f"console: {console.url}")
    if console.guard.token is not None:
        print_line(f"console login token (paste it on the login page; it changes each start): {console.guard.token}")
    elif console.guard.login:
        print_line("console login: the password whose hash is in the password file")
