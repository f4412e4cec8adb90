"""``arkfed coordinator``, ``arkfed site`` and ``arkfed certs``: Ark across institutions with Flower.

The coordinating institution runs ``arkfed coordinator``; each institution runs ``arkfed site``
with its site YAML. Images, labels and the sites' heads never leave the sites; only model weights
and scalar metrics travel. Security is on by default (TLS + registered site keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from arkfed.cli.options import with_run_options

certs_app = typer.Typer(help="Certificates and keys for a secure federation.", no_args_is_help=True)

COORDINATOR_HELP = """Coordinate a federated Ark run: start a Flower SuperLink, wait for the listed sites, train.

Sites join with `arkfed site`. The run starts once --min-sites listed sites have joined (default:
all); a listed site that joins later enters at the next round, and the visits it missed are
recorded as skips (reason absent). With --resume RUN the timeouts come from RUN/federation.json;
sites left running reconnect by themselves (`arkfed site` restarts its SuperNode).

Writes the same run folder as `arkfed train` (config.yaml, metrics.jsonl, checkpoint,
teacher.safetensors, summary.json); the sites' heads stay at the sites.
Needs --certs DIR from `arkfed certs init` with each site's key registered by `arkfed certs
add-site` (TLS + site authentication) unless --insecure. Only Flower's Fleet API is served on
--address (a gateway); the SuperLink itself listens on 127.0.0.1 only.
"""

SITE_HELP = """Join a federated Ark run as one site: start a Flower SuperNode serving this site's data.

The site's images, labels and head never leave this machine; what it sends is logged in
<state_dir>/outbox.jsonl. Pass --root-certificates (the federation's ca.crt) and --key (this
site's key from `arkfed certs site-key`), or --insecure for a trial on a trusted network. The site
runs only arkfed's own ClientApp, for runs signed by the coordinator that ca.crt certifies.

The site's `policy:` (in its YAML) limits what a coordinator may ask; with `approval: manual` each
new run waits until you approve the fingerprint this command prints:
`arkfed site --config SITE.yaml --approve FINGERPRINT` (from another terminal).
"""


@with_run_options
def coordinator(
    sites: Optional[str] = typer.Option(None, help="comma-separated site names, in visiting order (as in each site's YAML)"),
    recipe: Optional[str] = typer.Option(None, help="starting settings: base | ... (`--recipe list` describes them) [base]"),
    config: Optional[Path] = typer.Option(None, "--config", help="run configuration YAML (e.g. an earlier run's config.yaml)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/fed-TIMESTAMP)"),
    address: str = typer.Option("0.0.0.0:9092", help="HOST:PORT sites connect to (serves Flower's Fleet API only)"),
    superlink_port: Optional[int] = typer.Option(None, min=1, max=65535, help="port of the SuperLink on 127.0.0.1 "
                                                 "(default: any free port); fix it when your own reverse proxy forwards to it"),
    certs: Optional[Path] = typer.Option(None, help="certificate folder from `arkfed certs init` (TLS + registered site keys)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no site authentication (trials on trusted networks only)"),
    resume: Optional[Path] = typer.Option(None, help="continue RUN from its last finished visit"),
    join_timeout: float = typer.Option(600.0, help="seconds to wait for the listed sites (--min-sites of them) to join"),
    visit_timeout: float = typer.Option(3600.0, help="seconds a visit may take before it is skipped (never retried after a "
                                        "timeout; a site not connected at its turn is skipped at once, as absent)"),
    rejoin_wait: float = typer.Option(30.0, min=0.0, help="seconds to wait for a site that vanished mid-visit to come back "
                                      "before its one retry"),
    max_update_norm: Optional[float] = typer.Option(None, min=0.0, help="skip a returned student farther (L2) than this from the one "
                                                    "sent, on top of the adaptive bound (--update-norm-factor); with "
                                                    "--secure-aggregation (required) each site clips its own update to it before masking"),
    max_split_size: int = typer.Option(1_000_000, min=1, help="cap on each split size a site declares when it joins (bounds the "
                                       "examples it may claim); sizes are fixed at join"),
    log: str = typer.Option("", help="also log to trackers: tensorboard,mlflow (in the run folder)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="plain log lines instead of the live view"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config.yaml and stop"),
    console_address: Optional[str] = typer.Option(None, "--console", help="also serve the run's web console (`arkfed console`) on "
                                                  "HOST:PORT; not 127.0.0.1 needs --certs (its TLS) and the printed login token"),
    run_overrides: dict | None = None,
) -> None:
    from rich.console import Console

    from arkfed.cli.options import check_secure_aggregation, resolve_run_config
    from arkfed.cli.train import default_out, print_recipes
    from arkfed.errors import ArkfedError
    from arkfed.federation.certs import CertificateFolder
    from arkfed.federation.coordinator.launcher import print_insecure_warning, run_coordinator
    from arkfed.federation.coordinator.live import FederationView
    from arkfed.federation.protocol import FederationSettings
    from arkfed.run.folder import config_text

    if recipe == "list":
        return print_recipes()
    console = Console(highlight=False, soft_wrap=True)
    names = [s.strip() for s in (sites or "").split(",") if s.strip()]
    train_config = None if resume is not None else resolve_run_config(names, run_overrides or {}, config, recipe, "base", federated=True)
    if dry_run:
        if train_config is not None:
            typer.echo(config_text(train_config), nl=False)
        return
    check_secure_aggregation(train_config, max_update_norm)
    if certs is None and not insecure:
        raise ArkfedError("the coordinator needs --certs DIR (create it with `arkfed certs init DIR --coordinator-host HOST` "
                          "and register each site's key with `arkfed certs add-site`), or --insecure to run without "
                          "encryption and site authentication")
    if insecure:
        print_insecure_warning(lambda text: console.print(f"[bold red]{text}[/]"))
    run_dir = resume or out or default_out("fed")
    from arkfed.run.trackers import parse_log_option

    fed = FederationSettings(join_timeout=join_timeout, visit_timeout=visit_timeout, rejoin_wait=rejoin_wait, log=parse_log_option(log),
                             max_update_norm=max_update_norm or None, max_split_size=max_split_size)
    folder = CertificateFolder(certs) if certs is not None and not insecure else None
    console.print(f"coordinator: Fleet API on {address} (SuperLink on 127.0.0.1 only); run folder {run_dir}")
    web = _start_console("run", Path(run_dir), console_address, certs if folder is not None else None, console.print)
    try:
        with FederationView(console, quiet=quiet) as view:
            summary = run_coordinator(train_config, run_dir, fed, address, folder, resume=resume is not None, view=view,
                                      superlink_port=superlink_port)
    finally:
        if web is not None:
            web.stop()
    from arkfed.cli.train import print_summary

    print_summary(console, summary, run_dir)


def site(
    config: Path = typer.Option(..., "--config", help="this site's YAML (sites/NAME.yaml)"),
    coordinator_address: Optional[str] = typer.Option(None, "--coordinator", help="HOST:PORT of the coordinator's SuperLink"),
    root_certificates: Optional[Path] = typer.Option(None, help="the federation's ca.crt (TLS)"),
    key: Optional[Path] = typer.Option(None, help="this site's private key from `arkfed certs site-key` (authentication)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS (trials on trusted networks only)"),
    plugins_dir: Optional[list[Path]] = typer.Option(None, help="extra dataset plugin folder(s)"),
    connect_timeout: float = typer.Option(120.0, help="seconds to wait for the first connection"),
    approve: Optional[str] = typer.Option(None, "--approve", help="approve the waiting run FINGERPRINT, then exit"),
    console_address: Optional[str] = typer.Option(None, "--console", help="also serve this site's web console (`arkfed console "
                                                  "--site`: approvals, policy, outbox) on HOST:PORT, e.g. 127.0.0.1:8766"),
) -> None:
    from rich.console import Console

    from arkfed.errors import ArkfedError
    from arkfed.federation.coordinator.launcher import print_insecure_warning
    from arkfed.federation.site.node import SiteNode
    from arkfed.site.config import load_site_config, resolve_site_path

    console = Console(highlight=False, soft_wrap=True)
    if approve is not None:
        from arkfed.site.policy import approve_run

        site_config = load_site_config(resolve_site_path(config))
        path = approve_run(site_config.local_state_dir, approve)
        console.print(f"site {site_config.name!r}: run {approve.strip().lower()} approved (recorded in {path})")
        return
    if coordinator_address is None:
        raise ArkfedError("give --coordinator HOST:PORT (or --approve FINGERPRINT to approve a waiting run)")
    if root_certificates is None and not insecure:
        raise ArkfedError("pass --root-certificates ca.crt (and --key SITE.key) from the coordinator, or --insecure")
    if insecure:
        print_insecure_warning(lambda text: console.print(f"[bold red]{text}[/]"))
    node = SiteNode(resolve_site_path(config), coordinator_address, None if insecure else root_certificates,
                    None if insecure else key, plugins_dir or ())
    console.print(f"site {node.name!r}: data checked; connecting to {coordinator_address} (state in {node.state_dir})")
    web = _start_console("site", resolve_site_path(config), console_address, None, console.print)
    try:
        _serve(node, console, connect_timeout)
    except KeyboardInterrupt:
        console.print(f"site {node.name!r}: leaving the federation")
    finally:
        node.stop()
        if web is not None:
            web.stop()


def _start_console(kind: str, path: Path, address: str | None, certs: Path | None, print_line):
    """``--console HOST:PORT``: the web console in this process (a thread), or None."""
    if address is None:
        return None
    from rich.markup import escape

    from arkfed.cli.console import console_settings
    from arkfed.console.serve import announce, start_console

    running = start_console(kind, path, console_settings(address, certs, None, None, False, None, 2.0))
    announce(running, lambda text: print_line(escape(text)))
    return running


def _serve(node, console, connect_timeout: float) -> None:
    """The site's supervisor (:func:`arkfed.federation.site.node.supervise`): its SuperNode is
    started again whenever it drops out (e.g. the coordinator restarted for --resume); a clear
    error when the coordinator will not admit it."""
    from arkfed.federation.site.node import supervise

    shown: set[str] = set()

    def say(text: str, problem: bool) -> None:
        console.print(text, style="yellow" if problem else None, markup=False)

    def tick() -> None:
        _show_pending_runs(node, console, shown)
        _show_refused_requests(node, console)

    supervise(node, connect_timeout, say, tick)


def _show_refused_requests(node, console) -> None:
    """Requests the SuperNode's runtime API refused (without this start's SuperExec secret or a task
    token: another local account trying to claim the site's tasks), as Flower logged them."""
    import time

    from rich.markup import escape

    refused = node.refused_since_last()
    if refused:
        console.print(f"[bold red]{time.strftime('%Y-%m-%d %H:%M:%S')} site {node.name!r}: the SuperNode refused {len(refused)} "
                      f"runtime request(s) from a process without the task launcher's secret or a task token (another local "
                      f"account?); Flower logged each in {escape(str(node.process.log_path))}; last: {escape(refused[-1])}[/]")


def _signed_line(signed: dict | None) -> str:
    """The signed run's plan, as the operator approves it (the fingerprint covers the whole claim)."""
    if not signed:
        return ""
    return (f"  signed: sites {signed.get('sites')}, {signed.get('rounds')} round(s), {signed.get('mode')} ({signed.get('order')}), "
            f"seed {signed.get('seed')}, init {signed.get('init')}, evaluates {signed.get('eval_split')}, "
            f"recipe {signed.get('recipe')}; valid until {signed.get('expires_at')}\n")


def _show_pending_runs(node, console, shown: set[str]) -> None:
    """Policy ``approval: manual``: each run waiting for approval, once, with what it asks."""
    from arkfed.site.policy import pending_runs

    for entry in pending_runs(node.state_dir):
        fingerprint = entry.get("fingerprint", "?")
        if fingerprint in shown:
            continue
        shown.add(fingerprint)
        settings, model = entry.get("settings") or {}, entry.get("model") or {}
        console.print(
            f"[bold yellow]site {node.name!r}: run {entry.get('run_uid')} waits for your approval[/] (fingerprint {fingerprint})\n"
            f"  model {model.get('model')} at {model.get('img_size')} px; batch {settings.get('batch_size')}, "
            f"epochs {settings.get('local_epochs')}, max steps per visit {settings.get('max_steps_per_visit')}, "
            f"lr {settings.get('lr')}, device {settings.get('device')}; first request: {entry.get('request')}"
            + (f" on split {entry['split']}" if entry.get("split") else "") + "\n" + _signed_line(entry.get("signed"))
            + f"  approve: arkfed site --config {node.config_path} --approve {fingerprint}"
        )


@certs_app.command("init")
def certs_init(
    out: Path = typer.Argument(..., help="folder to create (ca.crt, ca.key, coordinator.crt/.key, sites/)"),
    coordinator_host: str = typer.Option(..., help="comma-separated host names/IPs sites use to reach the coordinator"),
    sites: str = typer.Option("", help="ONE-MACHINE TRIALS ONLY: also make these sites' keys here (across institutions "
                                       "each site runs `arkfed certs site-key` instead)"),
    days: int = typer.Option(825, min=1, help="certificate validity"),
    overwrite: bool = typer.Option(False, help="replace an existing CA and site keys"),
) -> None:
    """At the coordinator: create the federation's CA and the coordinator's TLS certificate."""
    from rich.console import Console

    from arkfed.federation.certs import init_certificates

    folder = init_certificates(out, coordinator_host.split(","), sites.split(","), days=days, overwrite=overwrite)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"created {folder.root}:")
    console.print(f"  coordinator: --certs {folder.root}   (keep ca.key and coordinator.key private)")
    console.print(f"  every site: give it {folder.ca_cert} (arkfed site --root-certificates ca.crt)")
    made = [name for name in sorted(folder.registered_sites()) if folder.site_key(name).is_file()]
    for name in made:
        console.print(f"  site {name}: give it {folder.site_key(name)} ([yellow]trials only[/]: made here, so this "
                      "machine could act as the site; across institutions use `arkfed certs site-key`)")
    if not made:
        console.print("  next: each site runs `arkfed certs site-key SITE --out DIR` and sends you SITE.pub; "
                      f"register it with `arkfed certs add-site SITE SITE.pub --certs {folder.root}`")


@certs_app.command("site-key")
def certs_site_key(
    site: str = typer.Argument(..., help="this site's name (as in its YAML)"),
    out: Path = typer.Option(..., "--out", help="folder for SITE.key (private, 0600) and SITE.pub"),
    overwrite: bool = typer.Option(False, help="replace an existing key (the coordinator must register the new .pub)"),
) -> None:
    """At a site: make this site's key pair; send only SITE.pub to the coordinator."""
    from rich.console import Console

    from arkfed.federation.certs import make_site_key, public_key_fingerprint

    key, pub = make_site_key(site, out, overwrite=overwrite)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"site {site}: private key {key} (keep it here: arkfed site --key {key})")
    console.print(f"  send {pub} to the coordinator; fingerprint {public_key_fingerprint(pub)} "
                  "(read it to them over another channel)")


@certs_app.command("add-site")
def certs_add_site(
    site: str = typer.Argument(..., help="the site's name (as in its YAML)"),
    public_key: Path = typer.Argument(..., help="the SITE.pub the site sent"),
    certs: Path = typer.Option(..., "--certs", help="the coordinator's certificate folder (from `arkfed certs init`)"),
    overwrite: bool = typer.Option(False, help="replace a different key already registered for this site"),
) -> None:
    """At the coordinator: register a site's public key under its name."""
    from rich.console import Console

    from arkfed.federation.certs import CertificateFolder, add_site, public_key_fingerprint

    path = add_site(CertificateFolder(certs), site, public_key, overwrite=overwrite)
    Console(highlight=False, soft_wrap=True).print(
        f"registered site {site}: {path}, fingerprint {public_key_fingerprint(path)} (check it with the site)")


def admit(
    run: Path = typer.Argument(..., help="the running federated run's folder", show_default=False),
    site: str = typer.Argument(..., help="the site's name (as in its YAML)", show_default=False),
    public_key: Path = typer.Argument(..., help="the SITE.pub the site sent", show_default=False),
    certs: Path = typer.Option(..., "--certs", help="the coordinator's certificate folder (from `arkfed certs init`)"),
    from_round: Optional[int] = typer.Option(None, "--round", min=1, help="first round the site is visited in [the next round "
                                              "not yet started]"),
) -> None:
    """At the coordinator, while `arkfed coordinator` runs RUN: admit SITE into the federation from the next round. Registers
    its key (as `certs add-site`, and with the running SuperLink), signs a membership change extending the run's signed
    claim (the old configuration with SITE added) and records it in RUN/membership.jsonl; the coordinator applies it when
    that round starts, and every site verifies it against its pinned CA before serving anything more of the run."""
    from rich.console import Console

    from arkfed.federation.certs import CertificateFolder
    from arkfed.federation.coordinator.admission import admit_site

    change = admit_site(run, site, public_key, CertificateFolder(certs), None if from_round is None else from_round - 1)
    Console(highlight=False, soft_wrap=True).print(
        f"site {site} admitted into run {change['run_uid']} from round {change['from_round'] + 1} (signed membership change "
        f"{change['nonce'][:12]}, extends {change['parent']}); start the site with `arkfed site` to join")


def register(app: typer.Typer) -> None:
    app.command(name="coordinator", help=COORDINATOR_HELP)(coordinator)
    app.command(name="admit")(admit)
    app.command(name="site", help=SITE_HELP)(site)
    app.add_typer(certs_app, name="certs")
