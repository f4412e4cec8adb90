"""Data commands: ``demo-data``, ``validate``, ``prepare``, ``list-datasets``, ``add-dataset``.

Thin rendering over :mod:`arkfed.demo.generate`, :mod:`arkfed.site.validate` and :mod:`arkfed.datasets._scaffold`;
nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def _console() -> Console:
    """A console made per command, so the terminal width (or $COLUMNS) of that call is used."""
    return Console(highlight=False)

PLUGINS_DIR_HELP = "extra folder of plugin files (repeatable; also $ARKFED_PLUGINS)"


def demo_data(
    out: Path = typer.Argument(..., help="folder to write the federation into (created if needed)"),
    seed: int = typer.Option(0, help="same seed -> byte-identical files"),
    size: int = typer.Option(128, min=32, max=1024, help="image width and height in pixels"),
) -> None:
    """Write the SYNTHETIC offline demo federation: 3 sites in the NIH, CheXpert and Shenzhen layouts."""
    from arkfed.demo.generate import DEMO_SITES, SYNTHETIC_NOTICE, generate_demo_federation, site_classes

    console = _console()

    with console.status(f"drawing {sum(s.images for s in DEMO_SITES)} synthetic chest X-rays into {out} ..."):
        yamls = generate_demo_federation(out, seed=seed, size=size)
    table = Table(title=f"demo federation in {out} (seed {seed}, {size} px)")
    for column in ("site", "plugin", "images", "findings drawn", "site config"):
        table.add_column(column)
    for site, yaml in zip(DEMO_SITES, yamls):
        table.add_row(site.name, site.dataset, str(site.images), ", ".join(site_classes(site)), str(yaml))
    console.print(table)
    console.print(f"[bold yellow]{SYNTHETIC_NOTICE}[/]")
    console.print(f"next: arkfed validate {yamls[0]}   |   arkfed train --sites {','.join(map(str, yamls))}", soft_wrap=True)


def validate(
    site: str = typer.Argument(..., help="site name (sites/NAME.yaml) or path to a site YAML"),
    plugins_dir: Optional[list[Path]] = typer.Option(None, "--plugins-dir", help=PLUGINS_DIR_HELP),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images", help="read the images, not only the labels"),
    sample: Optional[int] = typer.Option(None, min=1, help="read only N images drawn at random (default: all)"),
) -> None:
    """Read a site end to end and summarise it; exit status 1 when anything is wrong."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from arkfed.site.validate import validate_site

    console = _console()
    with Progress(TextColumn("reading images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("images", total=None)
        report = validate_site(site, plugins_dir or (), check_images=check_images, sample=sample,
                               progress=lambda done, total: progress.update(task, completed=done, total=total))
    render_report(report, console)
    if not report.ok:
        raise typer.Exit(1)


def prepare(
    site: str = typer.Argument(..., help="site name (sites/NAME.yaml) or path to a site YAML"),
    plugins_dir: Optional[list[Path]] = typer.Option(None, "--plugins-dir", help=PLUGINS_DIR_HELP),
    size: Optional[int] = typer.Option(None, min=16, max=4096, help="longer side of stored images [cache.size, 512]"),
    workers: int = typer.Option(0, min=0, help="decoding processes (0: in this process)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="discard the cache and decode everything again"),
    verify: bool = typer.Option(False, "--verify", help="afterwards, re-read every shard and check its CRC32"),
) -> None:
    """Decode every image of a site once into its prepared-image cache (resumable; only new or changed images)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from arkfed.data.cache import CacheIndex, verify_shards
    from arkfed.site.cache import cache_folder, prepare_site
    from arkfed.site.config import load_site_config
    from arkfed.site.load import load_site

    console = _console()
    config = load_site_config(site)
    if size is not None:
        config = config.model_copy(update={"cache": config.cache.model_copy(update={"size": size})})
    loaded = load_site(config, plugins_dir or (), cache=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("decoding", total=None)
        report = prepare_site(loaded, workers=workers, rebuild=rebuild,
                              progress=lambda done, total: progress.update(task, completed=done, total=total))
        problems = []
        if verify:
            progress.update(task, description="verifying", completed=0, total=None)
            problems = verify_shards(CacheIndex.load(cache_folder(config), config.cache.size),
                                     lambda done, total: progress.update(task, completed=done, total=total))
    rate = report.decoded / report.seconds if report.seconds > 0 else 0.0
    console.print(f"site {config.name}: cache at {report.size} px in {report.folder}", soft_wrap=True, markup=False)
    console.print(f"{report.images} images: {report.reused} already prepared, {report.new} new, {report.changed} changed "
                  f"since prepared (re-decoded), {report.unreadable} unreadable; {report.shards} shard(s), "
                  f"{report.nbytes / 2**20:.1f} MiB; {report.seconds:.1f} s ({rate:.0f} images/s decoded)")
    for line in report.dropped:
        console.print(f"[yellow]rebuilt:[/] {line}", soft_wrap=True)
    for line in report.errors:
        console.print(f"[bold red]unreadable:[/] {line}", soft_wrap=True)
    for line in problems:
        console.print(f"[bold red]corrupt:[/] {line} (run again with --rebuild)", soft_wrap=True)
    if config.cache.mode == "off":
        console.print(f"note: {config.name}'s YAML has no `cache: auto` (or `on`): training decodes files until it does", soft_wrap=True)
    if report.unreadable or problems:
        raise typer.Exit(1)


def render_report(report, console: Console) -> None:
    """Print a ValidationReport: splits, class counts, images read, then errors and warnings."""
    if report.splits:
        console.print(f"[bold]site {report.site}[/]  dataset {report.dataset}  root {report.root}")
        console.print(f"schema: {report.label_schema}")
        console.print(_splits_table(report))
        console.print(_classes_table(report))
        if report.images_checked:
            console.print(f"read {report.images_checked} of {report.images_total} images: {len(report.unreadable)} unreadable")
        if report.cache is not None:
            console.print(report.cache.describe(), soft_wrap=True, markup=False)
    for message in report.errors:
        console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    for message in report.warnings:
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
    if report.ok:
        console.print(f"[bold green]site {report.site}: OK[/]")
    elif report.splits:
        console.print(f"[bold red]site {report.site}: {len(report.errors)} error(s)[/]")


def _splits_table(report) -> Table:
    table = Table(title="splits")
    for column in ("split", "images", "patients", "M", "F", "sex unknown", "age median (min-max)", "age missing"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for s in report.splits:
        age = f"{s.age.median:g} ({s.age.min:g}-{s.age.max:g})" if s.age.known else "-"
        table.add_row(s.name, str(s.images), str(s.patients or "-"), str(s.sex.get("M", 0)), str(s.sex.get("F", 0)),
                      str(s.sex.get("unknown", 0)), age, str(s.age.missing))
    return table


def _classes_table(report) -> Table:
    table = Table(title="labels per class: positive / negative / uncertain / missing (prevalence)")
    table.add_column("class")
    for s in report.splits:
        table.add_column(s.name, justify="right")
    names = [c.name for c in report.splits[0].classes]
    for k, name in enumerate(names):
        cells = []
        for s in report.splits:
            c = s.classes[k]
            prevalence = f"{c.prevalence:.0%}" if c.positive + c.negative else "-"
            cells.append(f"[bold]{c.positive}[/] / {c.negative} / {c.uncertain} / {c.missing} ({prevalence})")
        table.add_row(name, *cells)
    return table


def list_datasets(
    plugins_dir: Optional[list[Path]] = typer.Option(None, "--plugins-dir", help=PLUGINS_DIR_HELP),
) -> None:
    """Show every dataset plugin found and its label schema (and the plugins that failed to load)."""
    from arkfed.site.validate import list_plugins

    console = _console()
    summaries, failures = list_plugins(plugins_dir or ())
    table = Table(title="dataset plugins", caption="* = eval class (averaged into the site's mean AUC); none marked = all")
    table.add_column("plugin", ratio=2)
    table.add_column("task")
    table.add_column("uncertain / missing")
    table.add_column("classes", ratio=3)
    for p in summaries:
        name = f"[bold]{p.name}[/]\n[dim]{p.description}[/]"
        s = p.label_schema
        if s is None:
            table.add_row(name, "-", "-", f"[dim]{p.schema_note}[/]")
            continue
        marked = [f"{c}*" if c in (s["eval_classes"] or ()) else c for c in s["classes"]]
        table.add_row(name, s["task"], f"{s['uncertain']} / {s['missing']}", ", ".join(marked))
    console.print(table)
    for name, error in failures.items():
        console.print(f"[bold red]failed to load plugin {name}:[/] {error}", soft_wrap=True)


def add_dataset(
    name: str = typer.Argument(..., help="plugin name (a Python identifier); also the site name"),
    labels: Path = typer.Option(..., "--labels", help="label CSV: one row per image"),
    image_column: str = typer.Option(..., "--image-column", help="column holding image paths"),
    label_columns: Optional[str] = typer.Option(
        None, "--label-columns", help="comma-separated label columns (default: every column holding only 1/0/-1/blank)"),
    task: str = typer.Option("multilabel", help="multilabel | multiclass | binary"),
    uncertain: str = typer.Option("lsr-ones", help="uncertain (-1) policy: ones | zeros | lsr-ones | lsr-zeros | ignore"),
    missing: str = typer.Option("zeros", help="blank label policy: zeros | ignore"),
    patient_column: Optional[str] = typer.Option(None, help="patient id column (splits keep patients together)"),
    sex_column: Optional[str] = typer.Option(None),
    age_column: Optional[str] = typer.Option(None),
    split_column: Optional[str] = typer.Option(None, help="column holding train/val/test (default: split by patient)"),
    image_dir: str = typer.Option("", help="folder the image paths are relative to, under --root"),
    root: Optional[Path] = typer.Option(None, help="the site's data folder (default: the CSV's folder)"),
    plugins_dir: Path = typer.Option(Path("plugins"), "--plugins-dir", help="where to write NAME.py"),
    sites_dir: Path = typer.Option(Path("sites"), "--sites-dir", help="where to write NAME.yaml"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing plugin or site file"),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images"),
) -> None:
    """Write a plugin for a dataset described by a CSV (plugins/NAME.py + sites/NAME.yaml), then validate it."""
    from pydantic import ValidationError

    from arkfed.datasets._scaffold import DatasetRequest, scaffold_dataset
    from arkfed.errors import ArkfedError
    from arkfed.site.config import load_site_config
    from arkfed.site.validate import validate_site

    try:
        request = DatasetRequest(
            name=name, labels=labels, image_column=image_column, task=task, uncertain=uncertain, missing=missing,
            label_columns=[c.strip() for c in label_columns.split(",") if c.strip()] if label_columns else None,
            patient_column=patient_column, sex_column=sex_column, age_column=age_column, split_column=split_column,
            image_dir=image_dir, root=root, plugins_dir=plugins_dir, sites_dir=sites_dir, force=force,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ArkfedError(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}") from None
    result = scaffold_dataset(request)
    console = _console()
    console.print(f"wrote {result.plugin_file} and {result.site_file}")
    console.print(f"schema: {result.label_schema.describe()}")
    for column, why in result.inferred.skipped.items():
        console.print(f"[dim]column {column!r} is not a label column: {why}[/]")
    report = validate_site(load_site_config(result.site_file), [plugins_dir], check_images=check_images)
    render_report(report, console)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo-data")(demo_data)
    app.command("validate")(validate)
    app.command("prepare")(prepare)
    app.command("list-datasets")(list_datasets)
    app.command("add-dataset")(add_dataset)
