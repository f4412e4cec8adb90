"""``arkfed train``: Ark over sites, with in-process sites (local) or real Flower processes (``--federated``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from arkfed.cli.options import with_run_options

DEMO_DIR = Path("demo-data")

HELP = (
    "Train an Ark foundation model by cycling over sites.\n\n"
    "A round visits every site once; a visit trains the shared student backbone+projector and that "
    "site's own head on its training split; the teacher is an EMA of the student (and carries an EMA of "
    "every head). After each round every site's evaluation split is scored for student and teacher. Writes "
    "a run folder (config.yaml, metrics.jsonl, checkpoint, teacher.safetensors, heads/, teacher-heads/, "
    "provenance.json, summary.json).\n\n"
    "Without --sites it trains on the offline demo federation (synthetic images, generated into demo-data/ "
    "if absent) with the `demo` recipe. With --sites the default recipe is `base` (arkfed's defaults, not "
    "the paper's); --recipe chooses another (`arkfed train --recipe list` describes them). Settings: the "
    "recipe, then --config FILE, then the options given."
)


def _site_refs(sites: Optional[str], demo_dir: Path) -> list[str]:
    if sites:
        return [s.strip() for s in sites.split(",") if s.strip()]
    import json

    from arkfed.demo.generate import MARKER_FILE, ensure_demo_federation

    typer.echo(f"no --sites: training on the synthetic demo federation in {demo_dir}/")
    try:  # a demo generated with other settings (`arkfed demo-data --size ...`) is used as it is
        info = json.loads((demo_dir / MARKER_FILE).read_text())
        kwargs = {"seed": int(info["seed"]), "size": int(info["size"]), "counts": dict(info["counts"])}
    except (OSError, ValueError, KeyError, TypeError):
        kwargs = {}
    return [str(p) for p in ensure_demo_federation(demo_dir, **kwargs)]


def default_out(prefix: str) -> Path:
    from datetime import datetime

    return Path("runs") / datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S")


def print_recipes() -> None:
    from rich.console import Console

    from arkfed.run.recipes import describe_recipes

    Console(highlight=False, soft_wrap=True).print(describe_recipes())


@with_run_options
def train(
    sites: Optional[str] = typer.Option(None, help="comma-separated site names (sites/NAME.yaml) or YAML paths; none = demo federation"),
    recipe: Optional[str] = typer.Option(None, help="starting settings: demo | base | ... (`--recipe list` describes them) "
                                          "[demo without --sites, else base]"),
    config: Optional[Path] = typer.Option(None, "--config", help="run configuration YAML (e.g. an earlier run's config.yaml)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/ark-TIMESTAMP)"),
    resume: Optional[Path] = typer.Option(None, help="continue RUN from its last finished visit (settings come from RUN/config.yaml)"),
    device: Optional[str] = typer.Option(None, help="override every site's compute.device: cpu | cuda | auto "
                                          "(site YAMLs set it otherwise)"),
    num_workers: Optional[int] = typer.Option(None, min=0, help="override every site's compute.num_workers"),
    gpus: Optional[int] = typer.Option(None, min=1, help="override every site's compute.gpus: GPUs per visit (DDP; batch size is per GPU)"),
    log: str = typer.Option("", help="also log to trackers: tensorboard,mlflow (in the run folder)"),
    plugins_dir: Optional[list[Path]] = typer.Option(None, help="extra dataset plugin folder(s)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="plain log lines instead of the live view (CI)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config.yaml and stop"),
    demo_dir: Path = typer.Option(DEMO_DIR, help="where the demo federation lives (used without --sites)"),
    federated: bool = typer.Option(False, "--federated", help="run it as a Flower federation on this machine: one SuperLink + one "
                                 "SuperNode per site on 127.0.0.1 (TLS + site keys)"),
    max_update_norm: Optional[float] = typer.Option(None, min=0.0, help="with --federated, as `arkfed coordinator --max-update-norm`: "
                                                    "skip a returned student farther (L2) than this from the one sent; with "
                                                    "--secure-aggregation (required) each site clips its own update to it before masking"),
    run_overrides: dict | None = None,
) -> None:
    from rich.console import Console

    from arkfed.cli.options import check_secure_aggregation, resolve_run_config
    from arkfed.errors import ArkfedError
    from arkfed.run.folder import RunFolder, config_text
    from arkfed.site.config import load_site_config, resolve_site_path

    if recipe == "list":
        return print_recipes()
    console = Console(highlight=False, soft_wrap=True)
    if resume is not None:
        run_dir, refs = resume, RunFolder(resume).read_site_configs()
        train_config = RunFolder(resume).read_config()
    else:
        file_sites = _file_sites(config) if not sites else []
        refs = _site_refs(sites or ",".join(file_sites), demo_dir)
        paths = [str(resolve_site_path(ref).resolve()) for ref in refs]
        names = [load_site_config(p).name for p in paths]
        default_recipe = "base" if (sites or file_sites) else "demo"
        train_config = resolve_run_config(names, run_overrides or {}, config, recipe, default_recipe, federated)
        refs, run_dir = paths, out or default_out("ark")
        if dry_run:
            typer.echo(config_text(train_config), nl=False)
            return
    if max_update_norm is not None and not federated:
        raise ArkfedError("--max-update-norm is for --federated runs (a local run's updates are checked by --update-norm-factor)")
    check_secure_aggregation(None if resume is not None and federated else train_config, max_update_norm, federated)
    summary = _run(train_config, run_dir, refs, resume is not None, federated, quiet, log, device, num_workers, plugins_dir or (), gpus,
                   max_update_norm)
    print_summary(console, summary, run_dir)


def _file_sites(config: Optional[Path]) -> list[str]:
    if config is None:
        return []
    import yaml

    try:
        return list((yaml.safe_load(Path(config).read_text()) or {}).get("sites") or [])
    except (OSError, yaml.YAMLError, AttributeError):
        return []  # resolve_run_config reports the file's problem


def _run(config, run_dir: Path, refs: list[str], resume: bool, federated: bool, quiet: bool, log: str,
         device: Optional[str], num_workers: Optional[int], plugins_dirs, gpus: Optional[int] = None,
         max_update_norm: Optional[float] = None) -> dict:
    from arkfed.errors import ArkfedError

    if federated:  # same run folder, visits at real Flower sites (arkfed.federation)
        if device is not None or num_workers is not None or gpus is not None:
            raise ArkfedError("with --federated each site's hardware comes from its YAML (compute:); drop --device/--num-workers/--gpus")
        from arkfed.federation.loopback import train_federated

        return train_federated(config, run_dir, refs, resume=resume, quiet=quiet, log=log, max_update_norm=max_update_norm)
    from arkfed.run.local import load_quorum, train_local
    from arkfed.run.progress import make_progress

    sites, unreadable = load_quorum(refs, config, plugins_dirs)
    compute = {name: site.config.compute.override(device=device, num_workers=num_workers, gpus=gpus) for name, site in sites.items()}
    return train_local(config, run_dir, resume=resume, sites=sites, site_configs=refs, compute=compute,
                       callbacks=[make_progress(quiet), *trackers(log, Path(run_dir))], unreadable=unreadable)


def trackers(log: str, run_dir: Path) -> list:
    from arkfed.run.trackers import make_trackers

    return make_trackers(log, run_dir)


def print_summary(console, summary: dict, run_dir: Path) -> None:
    from arkfed.run.progress import summary_table

    if summary.get("sites"):
        console.print(summary_table(summary))
    for skip in summary.get("skipped") or []:
        console.print(f"[yellow]skipped:[/] site {skip['site']} {skip['stage']} in round {skip['round'] + 1}: {skip['reason']}")
    console.print(f"run folder: {run_dir}  (teacher: {Path(run_dir) / 'teacher.safetensors'})")


def register(app: typer.Typer) -> None:
    app.command(name="train", help=HELP)(train)
