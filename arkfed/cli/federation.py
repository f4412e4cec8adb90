"""``arkfed coordinator``, ``arkfed site`` and ``arkfed certs init``: Ark across institutions with Flower.

The coordinating institution runs ``arkfed coordinator``; each institution runs ``arkfed site``
with its site YAML. Images, labels and the sites' heads never leave the sites; only model weights
and scalar metrics travel. Security is on by default (TLS + registered site keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

certs_app = typer.Typer(help="Certificates and keys for a secure federation.", no_args_is_help=True)

COORDINATOR_HELP = """Coordinate a federated Ark run: start a Flower SuperLink, wait for the listed sites, train.

Sites join with `arkfed site`. Writes the same run folder as `arkfed train` (config.yaml,
metrics.jsonl, checkpoint, teacher.safetensors, summary.json); the sites' heads stay at the sites.
Needs --certs DIR from `arkfed certs init` (TLS + site authentication) unless --insecure.
"""

SITE_HELP = """Join a federated Ark run as one site: start a Flower SuperNode serving this site's data.

The site's images, labels and head never leave this machine; what it sends is logged in
<state_dir>/outbox.jsonl. Pass --root-certificates (the federation's ca.crt) and --key (this
site's key from `arkfed certs init`), or --insecure for a trial on a trusted network.

The site's `policy:` (in its YAML) limits what a coordinator may ask; with `approval: manual` each
new run waits until you approve the fingerprint this command prints:
`arkfed site --config SITE.yaml --approve FINGERPRINT` (from another terminal).
"""


def _train_config(sites: list[str], config_file: Optional[Path], **options):
    """The run's TrainConfig: from a YAML file (e.g. an earlier run's config.yaml) or the options."""
    import yaml

    from arkfed.cli.train import SITES_DEFAULTS
    from arkfed.errors import ArkfedError
    from arkfed.model import ModelSpec
    from arkfed.training import TrainConfig, TrainSettings

    try:
        if config_file is not None:
            data = yaml.safe_load(Path(config_file).read_text())
            data.update({"sites": sites or data.get("sites", []), "site_configs": [], "rounds": options["rounds"] or data.get("rounds", SITES_DEFAULTS["rounds"])})
            return TrainConfig.model_validate(data)
        # the same defaults as `arkfed train --sites`, so a federated run trains what a local one would
        options = {k: SITES_DEFAULTS[k] if v is None and k in SITES_DEFAULTS else v for k, v in options.items()}
        low, high = (float(x) for x in options["crop_scale"].split(","))
        return TrainConfig(
            sites=sites, rounds=options["rounds"], seed=options["seed"], init=options["init"], order=options["order"],
            model=ModelSpec(model=options["model"], img_size=options["img_size"], projector_dim=options["projector_dim"]),
            settings=TrainSettings(
                batch_size=options["batch_size"], local_epochs=options["local_epochs"], lr=options["lr"],
                crop_scale=(low, high), max_steps_per_visit=options["max_steps_per_visit"], device=options["device"],
            ),
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ArkfedError(f"invalid training configuration: {' '.join(str(exc).split())[:300]}") from None


def coordinator(
    sites: Optional[str] = typer.Option(None, help="comma-separated site names, in visiting order (as in each site's YAML)"),
    rounds: Optional[int] = typer.Option(None, min=1, help="rounds; each visits every site once [default 20]"),
    mode: str = typer.Option("cyclic", help="cyclic (Ark: one site after the other) | parallel (all sites at once, averaged)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/fed-TIMESTAMP)"),
    address: str = typer.Option("0.0.0.0:9092", help="HOST:PORT the SuperLink listens on (sites connect here)"),
    certs: Optional[Path] = typer.Option(None, help="certificate folder from `arkfed certs init` (TLS + site keys)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no site authentication (trials on trusted networks only)"),
    resume: Optional[Path] = typer.Option(None, help="continue RUN from its last finished visit"),
    config: Optional[Path] = typer.Option(None, "--config", help="TrainConfig YAML (e.g. a run's config.yaml) instead of the options below"),
    model: Optional[str] = typer.Option(None, help="timm backbone [default as `arkfed train --sites`: swin_base_patch4_window7_224]"),
    img_size: Optional[int] = typer.Option(None, min=16, help="[default 224]"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="[default 32]"),
    lr: Optional[float] = typer.Option(None, help="[default 5e-4]"),
    local_epochs: int = typer.Option(1, min=1),
    crop_scale: Optional[str] = typer.Option(None, help="random-resized-crop area range MIN,MAX [default 0.08,1]"),
    projector_dim: int = typer.Option(1376, min=1),
    init: str = typer.Option("random", help="random | imagenet | PATH"),
    order: str = typer.Option("fixed", help="fixed | shuffle"),
    seed: int = typer.Option(0, min=0),
    device: str = typer.Option("cpu", help="device at the sites: cpu | cuda | auto"),
    max_steps_per_visit: Optional[int] = typer.Option(None, min=1),
    join_timeout: float = typer.Option(600.0, help="seconds to wait for all sites to join"),
    visit_timeout: float = typer.Option(3600.0, help="seconds a visit may take before it is retried, then skipped"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="plain log lines instead of the live view"),
) -> None:
    from datetime import datetime

    from rich.console import Console

    from arkfed.errors import ArkfedError
    from arkfed.federation.certs import CertificateFolder
    from arkfed.federation.launcher import print_insecure_warning, run_coordinator
    from arkfed.federation.live import FederationView
    from arkfed.federation.protocol import FederationSettings

    console = Console(highlight=False, soft_wrap=True)
    if certs is None and not insecure:
        raise ArkfedError("the coordinator needs --certs DIR (create it with `arkfed certs init DIR --coordinator-host HOST "
                          "--sites A,B`), or --insecure to run without encryption and site authentication")
    if insecure:
        print_insecure_warning(lambda text: console.print(f"[bold red]{text}[/]"))
    if mode not in ("cyclic", "parallel"):
        raise ArkfedError(f"--mode must be cyclic or parallel, got {mode!r}")
    names = [s.strip() for s in (sites or "").split(",") if s.strip()]
    if resume is None and not names and config is None:
        raise ArkfedError("give --sites NAME,NAME (the names in the sites' YAML files)")
    train_config = None if resume is not None else _train_config(
        names, config, rounds=rounds, model=model, img_size=img_size, batch_size=batch_size, lr=lr,
        local_epochs=local_epochs, crop_scale=crop_scale, projector_dim=projector_dim, init=init, order=order,
        seed=seed, device=device, max_steps_per_visit=max_steps_per_visit,
    )
    run_dir = resume or out or Path("runs") / datetime.now().strftime("fed-%Y%m%d-%H%M%S")
    fed = FederationSettings(mode=mode, join_timeout=join_timeout, visit_timeout=visit_timeout)
    folder = CertificateFolder(certs) if certs is not None and not insecure else None
    console.print(f"coordinator listening on {address}; run folder {run_dir}")
    with FederationView(console, quiet=quiet) as view:
        summary = run_coordinator(train_config, run_dir, fed, address, folder, resume=resume is not None, view=view)
    _print_summary(console, summary, run_dir)


def _print_summary(console, summary: dict, run_dir: Path) -> None:
    from arkfed.progress import summary_table

    if summary.get("sites"):
        console.print(summary_table(summary))
    skipped = (summary.get("federation") or {}).get("skipped") or []
    for skip in skipped:
        console.print(f"[yellow]skipped:[/] site {skip['site']} {skip['stage']} in round {skip['round'] + 1}: {skip['reason']}")
    console.print(f"run folder: {run_dir}  (teacher: {Path(run_dir) / 'teacher.safetensors'})")


def site(
    config: Path = typer.Option(..., "--config", help="this site's YAML (sites/NAME.yaml)"),
    coordinator_address: Optional[str] = typer.Option(None, "--coordinator", help="HOST:PORT of the coordinator's SuperLink"),
    root_certificates: Optional[Path] = typer.Option(None, help="the federation's ca.crt (TLS)"),
    key: Optional[Path] = typer.Option(None, help="this site's private key from `arkfed certs init` (authentication)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS (trials on trusted networks only)"),
    plugins_dir: Optional[list[Path]] = typer.Option(None, help="extra dataset plugin folder(s)"),
    connect_timeout: float = typer.Option(120.0, help="seconds to wait for the first connection"),
    approve: Optional[str] = typer.Option(None, "--approve", help="approve the run with this FINGERPRINT (policy approval: manual) and exit"),
) -> None:
    from rich.console import Console

    from arkfed.errors import ArkfedError
    from arkfed.federation.launcher import print_insecure_warning
    from arkfed.federation.site_node import SiteNode
    from arkfed.site import load_site_config, resolve_site_path

    console = Console(highlight=False, soft_wrap=True)
    if approve is not None:
        from arkfed.policy import approve_run

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
    try:
        _serve(node, console, connect_timeout)
    except KeyboardInterrupt:
        console.print(f"site {node.name!r}: leaving the federation")
    finally:
        node.stop()


def _serve(node, console, connect_timeout: float) -> None:
    """Keep the site's SuperNode connected: restart it when it drops out (e.g. the coordinator
    restarted for --resume), stop with a clear error when the coordinator will not admit it."""
    import time

    from arkfed.errors import ArkfedError
    from arkfed.federation.site_node import SiteNotAdmitted

    backoff, admitted, first = 5.0, False, time.monotonic()
    shown: set[str] = set()
    while True:
        node.start()
        try:
            node.wait_connected(connect_timeout)
            console.print(f"site {node.name!r}: connected; waiting for work (Ctrl-C to leave)")
            backoff, admitted = 5.0, True
            while True:
                node.check()
                _show_pending_runs(node, console, shown)
                time.sleep(1.0)
        except SiteNotAdmitted as exc:
            # a coordinator that is still starting may not have registered the key yet
            if admitted or time.monotonic() - first > connect_timeout:
                raise
            console.print(f"[yellow]{exc}; retrying in {backoff:.0f} s (the coordinator may still be starting)[/]")
            node.stop()
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        except ArkfedError as exc:
            console.print(f"[yellow]site {node.name!r}: {exc}; reconnecting in {backoff:.0f} s[/]")
            node.stop()
            time.sleep(backoff)
            backoff = min(backoff * 2, 60.0)


def _show_pending_runs(node, console, shown: set[str]) -> None:
    """Policy ``approval: manual``: each run waiting for approval, once, with what it asks."""
    from arkfed.policy import pending_runs

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
            + (f" on split {entry['split']}" if entry.get("split") else "") + "\n"
            f"  approve: arkfed site --config {node.config_path} --approve {fingerprint}"
        )


@certs_app.command("init")
def certs_init(
    out: Path = typer.Argument(..., help="folder to create (ca.crt, coordinator.crt/.key, sites/<name>.key/.pub)"),
    coordinator_host: str = typer.Option(..., help="comma-separated host names/IPs sites use to reach the coordinator"),
    sites: str = typer.Option(..., help="comma-separated site names (as in the sites' YAML files)"),
    days: int = typer.Option(825, min=1, help="certificate validity"),
    overwrite: bool = typer.Option(False, help="replace an existing CA and site keys"),
) -> None:
    """Create a CA, the coordinator's TLS certificate and one key pair per site."""
    from rich.console import Console

    from arkfed.federation.certs import init_certificates

    folder = init_certificates(out, coordinator_host.split(","), sites.split(","), days=days, overwrite=overwrite)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"created {folder.root}:")
    console.print(f"  coordinator: --certs {folder.root}   (keep ca.key and coordinator.key private)")
    for name in sorted(folder.registered_sites()):
        console.print(f"  site {name}: give it {folder.ca_cert} and {folder.site_key(name)} "
                      f"(arkfed site --root-certificates ca.crt --key {name}.key)")


def register(app: typer.Typer) -> None:
    app.command(name="coordinator", help=COORDINATOR_HELP)(coordinator)
    app.command(name="site", help=SITE_HELP)(site)
    app.add_typer(certs_app, name="certs")
