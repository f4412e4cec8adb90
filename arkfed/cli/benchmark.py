"""``arkfed benchmark``: benchmarks that answer a user's question on their own sites.

Thin typer layer over :mod:`arkfed.benchmarking`; ``benchmarks/accrual.py`` is a wrapper of the
same command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

benchmark_app = typer.Typer(help="Benchmarks on your own sites (or the offline demo federation).", no_args_is_help=True)


@benchmark_app.command("accrual")
def accrual(
    sites: Optional[str] = typer.Option(
        None, help="comma-separated site names (sites/NAME.yaml) or YAML paths; none = the demo federation + demo-vindr"),
    held_out: Optional[str] = typer.Option(
        None, help="the site held out for the accrual curve [demo: demo-vindr; else the last of --sites]"),
    budget: str = typer.Option(
        "default", help="default (2 CPU cores, ~20 min) | smoke (seconds, numbers mean nothing) | gpu (CUDA machine)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the budget's)"),
    epochs: Optional[int] = typer.Option(
        None, min=1, help="E: epochs of each site's own data, alone and as a member (default: the budget's)"),
    weighting: str = typer.Option("equal", help="parallel-federation average: equal (Ark+) | samples (FedAvg)"),
    imagenet: Optional[Path] = typer.Option(None, help="a local timm weights file for the ImageNet-init baseline (never downloaded)"),
    ema: Optional[str] = typer.Option(None, help="teacher EMA: iteration (budget default) | visit (Ark's)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (default: the budget's)"),
    num_workers: Optional[int] = typer.Option(None, min=0, help="DataLoader workers (default: the budget's)"),
    out: Optional[Path] = typer.Option(None, help="results folder (default runs/benchmark-accrual/BUDGET); rerunning resumes it"),
    report_only: bool = typer.Option(False, "--report-only", help="train nothing: tables and figure from the records in --out so far"),
) -> None:
    """Does joining pay? Join vs alone per site, the accrual curve on a held-out site, and Ark's
    ablations (single sites, pooled multi-task, c = 0, parallel federation, random/ImageNet init),
    paired by seed. Writes results.json, results.md and accrual.png."""
    from rich.console import Console

    from arkfed.benchmarking.accrual import benchmark_accrual
    from arkfed.benchmarking.budget import budget_with

    chosen = budget_with(budget, seeds=seeds, epochs=epochs, ema=ema, device=device, num_workers=num_workers)
    refs = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
    folder = out or Path("runs") / "benchmark-accrual" / budget
    benchmark_accrual(refs, held_out, chosen, folder, weighting=weighting, imagenet=imagenet, budget_name=budget,
                      report_only=report_only)
    Console(highlight=False, width=200).print((folder / "results.md").read_text())


def register(app: typer.Typer) -> None:
    app.add_typer(benchmark_app, name="benchmark")
