"""``arkfed benchmark``: benchmarks that answer a user's question on their own sites.

Thin typer layer over :mod:`arkfed.benchmarking`: ``accrual`` (does joining pay?), ``paper``
(the paper's transfer table beside its published values) and ``privacy`` (what DP costs); ``benchmarks/accrual.py`` is a wrapper of
the accrual command.
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


@benchmark_app.command("forgetting")
def forgetting(
    sites: Optional[str] = typer.Option(
        None, help="comma-separated site names (sites/NAME.yaml) or YAML paths; none = the demo federation + demo-vindr"),
    new: Optional[str] = typer.Option(None, help="the site accrued into the release [demo: demo-vindr; else the last of --sites]"),
    budget: str = typer.Option("default", help="default (2 CPU cores) | smoke (seconds, numbers mean nothing) | gpu (CUDA machine)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the budget's)"),
    epochs: Optional[int] = typer.Option(None, min=1, help="E: rounds of the release's run, the continued run and the new site alone"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (default: the budget's)"),
    out: Optional[Path] = typer.Option(None, help="results folder (default runs/benchmark-forgetting/BUDGET); rerunning resumes it"),
) -> None:
    """Forgetting and gain: release Ark trained on the old sites, continue it with the new site
    (--from RELEASE), and report per seed-paired differences: each old site's own test AUC before and
    after (forgetting), the new site accrued vs trained alone, and its linear probe before (held out)
    and after. Writes results.json and results.md."""
    from rich.console import Console

    from arkfed.benchmarking.budget import budget_with
    from arkfed.benchmarking.forgetting import benchmark_forgetting

    chosen = budget_with(budget, seeds=seeds, epochs=epochs, device=device)
    refs = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
    folder = out or Path("runs") / "benchmark-forgetting" / budget
    benchmark_forgetting(refs, new, chosen, folder, budget_name=budget)
    Console(highlight=False, width=200).print((folder / "results.md").read_text())


@benchmark_app.command("paper")
def paper(
    sites: Optional[str] = typer.Option(
        None, help="comma-separated site names (sites/NAME.yaml) or YAML paths; none = the synthetic demo (checks the pipeline only)"),
    budget: str = typer.Option("default", help="default (CPU) | smoke (seconds, numbers mean nothing) | gpu (CUDA machine)"),
    runs: Optional[int] = typer.Option(None, min=1, help="fine-tuning runs per target and init [the paper's count; smoke: 2]"),
    protocol: str = typer.Option("ark", help="ark: read each site as Ark's reference code does, where its plugin can | arkfed"),
    model: Optional[Path] = typer.Option(
        None, help="the model fine-tuned from: a run folder, an export or a weights file [none: Ark trained here on --sites]"),
    arch: Optional[str] = typer.Option(None, help="timm architecture of a plain backbone weights --model (e.g. the released Ark-6's)"),
    img_size: Optional[int] = typer.Option(None, min=16, help="input size of a plain backbone weights --model [224, the paper's]"),
    imagenet: Optional[Path] = typer.Option(None, help="a local timm ImageNet weights file of the model's architecture (never downloaded)"),
    epochs: Optional[int] = typer.Option(None, min=1, help="E: rounds of Ark trained here without --model (default: the budget's)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (default: the budget's)"),
    num_workers: Optional[int] = typer.Option(None, min=0, help="DataLoader workers (default: the budget's)"),
    out: Optional[Path] = typer.Option(None, help="results folder (default runs/benchmark-paper/BUDGET); rerunning resumes it"),
    report_only: bool = typer.Option(False, "--report-only", help="train nothing: the table from the records in --out so far"),
) -> None:
    """The paper's table: Ark's transfer protocol on every paper target present locally (fine-tuned
    from the model, from ImageNet (local file) and from random init), beside Ark-6's published
    values, with the budget, hardware, protocol and runs it was measured under. Writes
    results.json and results.md."""
    from rich.console import Console

    from arkfed.benchmarking.budget import budget_with
    from arkfed.benchmarking.paper import benchmark_paper

    chosen = budget_with(budget, epochs=epochs, device=device, num_workers=num_workers)
    refs = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
    folder = out or Path("runs") / "benchmark-paper" / budget
    benchmark_paper(refs, chosen, folder, runs=runs, protocol=protocol, model=model, arch=arch, img_size=img_size, imagenet=imagenet,
                    budget_name=budget, report_only=report_only)
    Console(highlight=False, width=200).print((folder / "results.md").read_text())


@benchmark_app.command("privacy")
def privacy(
    budget: str = typer.Option("default", help="default (2 CPU cores) | smoke (seconds, numbers mean nothing) | gpu (CUDA machine)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the budget's)"),
    epochs: Optional[int] = typer.Option(None, min=1, help="rounds of cyclic Ark (default: the budget's)"),
    epsilons: str = typer.Option("none,8,4,1", help="comma-separated arms: none (no DP) or every site's epsilon"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="batch size of every visit (default: the budget's)"),
    lr: Optional[float] = typer.Option(None, min=0, help="learning rate (default: the budget's)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (default: the budget's)"),
    out: Optional[Path] = typer.Option(None, help="results folder (default runs/benchmark-privacy/BUDGET); rerunning resumes it"),
) -> None:
    """What differential privacy costs on the demo federation: every site at each epsilon and without DP,
    paired by seed: own test AUC, held-out linear probe, membership-inference attack AUC, epsilon spent
    and the DP / no-DP visit time. Writes results.json and results.md."""
    from rich.console import Console

    from arkfed.benchmarking.budget import budget_with
    from arkfed.benchmarking.privacy import benchmark_privacy
    from arkfed.errors import ArkfedError

    try:
        arms = [None if e.strip() == "none" else float(e) for e in epsilons.split(",") if e.strip()]
    except ValueError:
        raise ArkfedError(f"--epsilons takes none and numbers, comma-separated, got {epsilons!r}") from None
    import dataclasses

    chosen = budget_with(budget, seeds=seeds, epochs=epochs, device=device)
    chosen = dataclasses.replace(chosen, **{k: v for k, v in (("batch_size", batch_size), ("lr", lr)) if v is not None})
    folder = out or Path("runs") / "benchmark-privacy" / budget
    benchmark_privacy(chosen, folder, arms)
    Console(highlight=False, width=200).print((folder / "results.md").read_text())


def register(app: typer.Typer) -> None:
    app.add_typer(benchmark_app, name="benchmark")
