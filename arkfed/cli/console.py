"""``arkfed console``: the web console for a run folder (coordinator view) or a site (site view)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

CONSOLE_HELP = """Open the web console: a run's progress (coordinator view) or a site's approvals and outbox (site view).

`arkfed console RUN` shows a run folder, live while it trains (local or federated) and afterwards.
`arkfed console --site sites/NAME.yaml` shows, at a site, the runs waiting for approval (Approve /
Refuse, the same record as `arkfed site --approve`), the site's policy and every message that left
the site. Serves 127.0.0.1:8765 by default (open the printed address in a browser); any other
address needs TLS (--certs DIR or --tls-cert/--tls-key) and a login (a token printed at start, or
--password-file). On 127.0.0.1 every account on this machine can open it: --login asks for the
token there too. Every script and style is served by arkfed itself.
"""


def console_settings(address: str, certs: Optional[Path], tls_cert: Optional[Path], tls_key: Optional[Path], login: bool,
                     password_file: Optional[Path], poll: float):
    from arkfed.console.serve import ConsoleSettings

    if certs is not None:  # the federation's certificates: the coordinator's TLS certificate and key
        from arkfed.federation.certs import CertificateFolder

        folder = CertificateFolder(certs)
        tls_cert, tls_key = tls_cert or folder.coordinator_cert, tls_key or folder.coordinator_key
    return ConsoleSettings(address=address, tls_cert=tls_cert, tls_key=tls_key, login=login, password_file=password_file,
                           poll_seconds=poll)


def console(
    run: Optional[Path] = typer.Argument(None, help="run folder (coordinator view)"),
    site: Optional[Path] = typer.Option(None, "--site", help="this site's YAML (site view; serve it on the site's machine)"),
    address: str = typer.Option("127.0.0.1:8765", help="HOST:PORT to serve; not 127.0.0.1 needs TLS and a login"),
    certs: Optional[Path] = typer.Option(None, help="TLS with the federation's certificate folder (coordinator.crt/.key)"),
    tls_cert: Optional[Path] = typer.Option(None, help="TLS certificate (PEM)"),
    tls_key: Optional[Path] = typer.Option(None, help="its private key (PEM)"),
    login: bool = typer.Option(False, "--login", help="ask for the printed token on 127.0.0.1 too"),
    password_file: Optional[Path] = typer.Option(None, help="log in with a password whose hash is in FILE (--hash-password)"),
    hash_password: bool = typer.Option(False, "--hash-password", help="read a password twice and print its hash line, then exit"),
    poll: float = typer.Option(2.0, min=0.2, help="seconds between the page's live updates"),
) -> None:
    import time

    from arkfed.errors import ArkfedError

    if hash_password:
        return _print_password_hash()
    if (run is None) == (site is None):
        raise ArkfedError("give a run folder (`arkfed console RUN`) or a site (`arkfed console --site sites/NAME.yaml`), one of them")
    from arkfed.console.serve import announce, start_console

    settings = console_settings(address, certs, tls_cert, tls_key, login, password_file, poll)
    if site is not None:
        from arkfed.site.config import load_site_config, resolve_site_path

        site = resolve_site_path(site)
        load_site_config(site)  # a bad YAML fails here, with its one-line error
    running = start_console("run" if run is not None else "site", run if run is not None else site, settings)
    announce(running, typer.echo)
    typer.echo("Ctrl-C stops it")
    try:
        while running.thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        running.stop()


def _print_password_hash() -> None:
    from arkfed.console.security import hash_password
    from arkfed.errors import ArkfedError

    password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 12:
        raise ArkfedError("use a password of at least 12 characters")
    typer.echo(hash_password(password))


def register(app: typer.Typer) -> None:
    app.command(name="console", help=CONSOLE_HELP)(console)
