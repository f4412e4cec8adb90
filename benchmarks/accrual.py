"""Does accruing knowledge across sites help?  The product's core claim, measured.

Protocol (leave one site out, on the offline demo federation; issue 5):

1. Pretrain with Ark on every demo site except the held-out target (default ``demo-chexpert``).
2. Pretrain on each single source site alone for the *same number of optimizer steps* (same
   visits, same steps per visit, same lr schedule and EMA) and keep the best one, chosen by a
   full linear probe on the target's *validation* split (never its test split).
3. For each pretraining, and for a random init of the same architecture, on the target site:
   linear probes on the frozen teacher embedding (all training images, and K-shot for each K in
   ``shots``), and full fine-tuning with a new head (best-val epoch), all scored on the target's
   test split (mean AUC over its reported classes).
4. Repeat for every seed (pretraining init, data order, few-shot subsets and fine-tuning all
   follow it). Print mean AUC per arm and the paired differences Ark - single and Ark - random
   as mean +/- sd over seeds with a 95% t-interval; a difference is "resolved" when that
   interval excludes 0.

Budget (``--budget``):

- ``default``: the demo's own recipe, timm's ``test_resnet`` at 128 px (as ``arkfed train``
  without --sites), 6 rounds x 2 source sites x 40 steps of 16 images per visit (480 steps),
  lr 3e-3, crop 0.7-1, teacher EMA per iteration, probes with all, 10 and 50 images per class,
  3 fine-tuning epochs, seeds 0,1,2. Measured: 15.8 min on 2 CPU cores (2026-11-26). At this
  budget the Ark - single difference IS resolved beyond seed noise, and it is negative: with
  demo-chexpert held out, the best single source (demo-nih, every seed) beat Ark on
  demo-nih + demo-shenzhen by -0.088 +/- 0.026 mean AUC (full probe; 95% CI -0.153..-0.023),
  -0.099 +/- 0.017 (10-shot), -0.090 +/- 0.028 (50-shot) and -0.063 +/- 0.018 (fine-tune);
  Ark beat random init by +0.068 +/- 0.045 (probe) and +0.073 +/- 0.030 (fine-tune), not
  resolved with 3 seeds. Reading: at equal steps Ark spends half of them on the TB-only
  Shenzhen-style site, whose single finding the CheXpert-style target does not have, while the
  NIH-style site shares most of the target's findings. Accrual does not help on this demo at this
  budget; a federation whose sources are each relevant to the target is where to look for a gain.
- ``resnet18``: resnet18 at 128 px, 6 rounds x 2 sites x 40 steps of 32 images, lr 1e-3, crop
  0.5-1, 5 fine-tuning epochs: about an hour of CPU (not measured); a GPU with
  ``--device auto --num-workers 8`` is the practical place for it.
- ``smoke``: resnet18 at 32 px, 1 round x 3 steps x 8 images per visit, 5-shot probes, 1
  fine-tuning epoch, on a small generated federation: checks the pipeline end to end in
  4-8 minutes on 2 CPU cores shared with other jobs (measured); its numbers mean nothing.

Why a per-iteration EMA teacher by default: with Ark's visit-wise EMA the teacher after 12
visits is still ~half its random initialisation (the product of the momenta), so a short
benchmark would compare random inits with one another; ``--ema visit`` gives Ark's schedule.

Usage::

    python benchmarks/accrual.py                      # the default budget
    python benchmarks/accrual.py --budget smoke       # end-to-end check
    python benchmarks/accrual.py --held-out demo-nih --seeds 0,1,2,3,4 --device auto
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Budget:
    model: str = "resnet18"
    img_size: int = 128
    demo_size: int = 128
    demo_counts: dict | None = None  # images per demo site (None: the generator's defaults)
    rounds: int = 6
    steps_per_visit: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    projector_dim: int = 256
    crop_scale: tuple[float, float] = (0.5, 1.0)
    ema: str = "iteration"
    shots: tuple[int, ...] = (10, 50)
    finetune_epochs: int = 5
    finetune_lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)


BUDGETS = {
    # the demo's own recipe (timm's test_resnet at 128 px, as `arkfed train` without --sites): all arms
    # and 3 seeds in about 16 minutes on 2 CPU cores, and the Ark - single difference is resolved
    "default": Budget(model="test_resnet", batch_size=16, lr=3e-3, crop_scale=(0.7, 1.0), finetune_epochs=3, finetune_lr=3e-3),
    "resnet18": Budget(),
    "smoke": Budget(img_size=32, demo_size=32, demo_counts={"demo-nih": 160, "demo-chexpert": 160, "demo-shenzhen": 100},
                    rounds=1, steps_per_visit=3, batch_size=8, projector_dim=32, shots=(5,), finetune_epochs=1),
}


def load_demo_sites(demo_dir: Path, budget: Budget) -> dict:
    from arkfed.demo import ensure_demo_federation
    from arkfed.site import load_site

    paths = ensure_demo_federation(demo_dir, seed=0, size=budget.demo_size, counts=budget.demo_counts)
    sites = {}
    for path in paths:
        site = load_site(path)
        sites[site.name] = site
    return sites


def pretrain(sites: dict, budget: Budget, seed: int, out: Path, device: str, visits: int | None = None, num_workers: int = 0):
    """Ark over ``sites`` (``visits`` total, default rounds x sites) with a fixed number of steps
    per visit; returns (teacher, total optimizer steps, seconds)."""
    from arkfed.loop import train_local
    from arkfed.site import ComputeSettings
    from arkfed.model import ModelSpec
    from arkfed.runs import RunFolder
    from arkfed.training import TrainConfig, TrainSettings
    from arkfed.weights import load_ark_model

    visits = visits or budget.rounds * len(sites)
    rounds = math.ceil(visits / len(sites))
    # enough local epochs that every visit runs exactly steps_per_visit batches
    per_epoch = min(max(1, len(s.split("train")) // budget.batch_size) for s in sites.values())
    config = TrainConfig(
        sites=list(sites), rounds=rounds, seed=seed,
        model=ModelSpec(model=budget.model, img_size=budget.img_size, projector_dim=budget.projector_dim),
        settings=TrainSettings(batch_size=budget.batch_size, lr=budget.lr, local_epochs=math.ceil(budget.steps_per_visit / per_epoch),
                               max_steps_per_visit=budget.steps_per_visit, crop_scale=budget.crop_scale, ema=budget.ema),
    )
    start = time.perf_counter()
    if RunFolder(out).has_run():
        import shutil

        shutil.rmtree(out)
    compute = ComputeSettings(device=device, num_workers=num_workers)
    train_local(config, out, sites=sites, compute={name: compute for name in sites})
    steps = sum(r.get("steps", 0) for r in RunFolder(out).read_metrics() if r.get("kind") == "visit")
    return load_ark_model(out, "teacher").eval(), steps, time.perf_counter() - start


def transfer(model, target, budget: Budget, seed: int, device: str, random_init: bool = False) -> dict[str, float]:
    """Target-site test mean AUC of linear probes (all, K-shot) and fine-tuning.

    The same seed draws the same few-shot subsets for every arm, so differences are paired.
    """
    from arkfed.evaluation.embeddings import embed_table
    from arkfed.evaluation.finetune import FineTuneSettings, finetune
    from arkfed.evaluation.linear_probe import probe_embeddings, random_model

    train, val, test, schema = target.split("train"), target.splits.get("val"), target.split("test"), target.schema
    frozen = random_model(model.spec, seed) if random_init else model
    tr, te = (embed_table(frozen, t, schema, device=device) for t in (train, test))
    out = {}
    for shots in (None, *budget.shots):
        out["probe all" if shots is None else f"probe {shots}-shot"] = probe_embeddings(tr, te, schema, shots, seed=seed)["mean_auc"]
    ft = FineTuneSettings(epochs=budget.finetune_epochs, lr=budget.finetune_lr, batch_size=budget.batch_size,
                          crop_scale=budget.crop_scale, seed=seed, device=device)
    out["finetune"] = finetune(model, train, val, test, schema, "random" if random_init else "model", ft)["test"]["mean_auc"]
    return out


def probe_on_val(model, target, seed: int, device: str) -> float:
    from arkfed.evaluation.embeddings import embed_table
    from arkfed.evaluation.linear_probe import probe_embeddings

    tr, va = (embed_table(model, target.split(s), target.schema, device=device) for s in ("train", "val"))
    return probe_embeddings(tr, va, target.schema, seed=seed)["mean_auc"]


def paired(a: list[float], b: list[float]) -> dict:
    """Mean and sd of the per-seed differences a - b, with a 95% t-interval of the mean."""
    from scipy.stats import t

    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    mean = float(d.mean())
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "resolved": bool(n > 1 and abs(mean) > half)}


def run_seed(sites: dict, target_name: str, budget: Budget, seed: int, work: Path, device: str, log, num_workers: int = 0) -> dict:
    target = sites[target_name]
    sources = {k: v for k, v in sites.items() if k != target_name}
    ark, ark_steps, ark_s = pretrain(sources, budget, seed, work / f"ark-s{seed}", device, num_workers=num_workers)
    log(f"seed {seed}: Ark on {list(sources)}: {ark_steps} steps in {ark_s:.0f}s")
    visits = budget.rounds * len(sources)
    singles = {}
    for name, site in sources.items():
        model, steps, secs = pretrain({name: site}, budget, seed, work / f"single-{name}-s{seed}", device, visits=visits,
                                      num_workers=num_workers)
        singles[name] = (model, probe_on_val(model, target, seed, device), steps)
        log(f"seed {seed}: single {name}: {steps} steps in {secs:.0f}s, target val probe {singles[name][1]:.3f}")
    best = max(singles, key=lambda k: singles[k][1])
    if singles[best][2] != ark_steps:
        log(f"warning: step counts differ (Ark {ark_steps}, {best} {singles[best][2]})")
    result = {
        "seed": seed, "best_single": best, "steps": {"ark": ark_steps, "single": singles[best][2]},
        "ark": transfer(ark, target, budget, seed, device),
        "single": transfer(singles[best][0], target, budget, seed, device),
        "random": transfer(ark, target, budget, seed, device, random_init=True),
    }
    log(f"seed {seed}: " + json.dumps({k: result[k] for k in ("ark", "single", "random")}))
    return result


def print_table(results: list[dict], target: str, budget_name: str) -> dict:
    from rich.console import Console
    from rich.table import Table

    evals = list(results[0]["ark"])
    table = Table(title=f"Accrual benchmark: held-out {target}, budget {budget_name}, {len(results)} seeds (test mean AUC)")
    for col in ("evaluation", "Ark (mean ± sd)", "best single", "random init", "Ark − single [95% CI]", "Ark − random [95% CI]"):
        table.add_column(col, justify="left" if col == "evaluation" else "right")
    summary = {}
    for e in evals:
        arms = {arm: [r[arm][e] for r in results] for arm in ("ark", "single", "random")}
        vs_single, vs_random = paired(arms["ark"], arms["single"]), paired(arms["ark"], arms["random"])
        summary[e] = {**{arm: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
                         for arm, v in arms.items()}, "ark_minus_single": vs_single, "ark_minus_random": vs_random}

        def fmt(p: dict) -> str:
            mark = " resolved" if p["resolved"] else ""
            return f"{p['mean']:+.3f} ± {p['sd']:.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]{mark}"

        table.add_row(e, *[f"{summary[e][a]['mean']:.3f} ± {summary[e][a]['sd']:.3f}" for a in ("ark", "single", "random")],
                      fmt(vs_single), fmt(vs_random))
    console = Console(highlight=False)
    (console if console.is_terminal else Console(highlight=False, width=160)).print(table)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--held-out", default="demo-chexpert", help="the target site (demo-nih, demo-chexpert, demo-shenzhen)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the budget's)")
    parser.add_argument("--ema", choices=("iteration", "visit"), default=None, help="teacher EMA (default: the budget's)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for pretraining")
    parser.add_argument("--demo-dir", type=Path, default=None, help="demo federation folder (default WORK/demo-SIZE)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "accrual", help="run folders, demo data and results.json")
    args = parser.parse_args(argv)

    import torch

    from arkfed.training import resolve_device

    budget = BUDGETS[args.budget]
    if args.seeds:
        budget = replace(budget, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.ema:
        budget = replace(budget, ema=args.ema)
    device = str(resolve_device(args.device))
    work = args.work / args.budget
    work.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    log(f"budget {args.budget}: {json.dumps(asdict(budget))}; device {device}; torch threads {torch.get_num_threads()}")
    demo_dir = args.demo_dir or args.work / f"demo-{budget.demo_size}-{'default' if budget.demo_counts is None else 'small'}"
    sites = load_demo_sites(demo_dir, budget)
    if args.held_out not in sites:
        parser.error(f"--held-out must be one of {sorted(sites)}")
    log("sites: " + ", ".join(f"{n} ({len(s.split('train'))} train / {len(s.split('test'))} test, {s.schema.task})" for n, s in sites.items()))
    start = time.perf_counter()
    results = [run_seed(sites, args.held_out, budget, seed, work, device, log, args.num_workers) for seed in budget.seeds]
    summary = print_table(results, args.held_out, args.budget)
    minutes = (time.perf_counter() - start) / 60
    print(f"total {minutes:.1f} min; best single site per seed: {[r['best_single'] for r in results]}")
    (work / "results.json").write_text(json.dumps({"budget": asdict(budget), "held_out": args.held_out, "device": device,
                                                   "minutes": minutes, "seeds": results, "summary": summary}, indent=2))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
