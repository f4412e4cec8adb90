"""The accrual benchmark's arms: training one arm on some sites (the Ark loop, or pooled
multi-task training) and scoring it: each site's own test mean AUC, fine-tuning, and transfer to
the held-out site (linear probes and fine-tuning). Every score is the site mean AUC of
:func:`arkfed.ark.metrics.mean_auc`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from arkfed.benchmarking.budget import Budget, torch_device
from arkfed.benchmarking.plan import run_key

# --- training arms -------------------------------------------------------------------------------


def train_config(names: Sequence[str], budget: Budget, seed: int, max_consistency: float = 0.5, mode: str = "cyclic",
                 weighting: str = "equal"):
    """The Ark run of ``names`` at this budget: one visit = one epoch of a site, E rounds (parallel
    mode averages, as Ark+ and FedAvg do: the honest benchmark sites need no robust aggregation)."""
    from arkfed.config import TrainConfig, TrainSettings
    from arkfed.spec import ModelSpec

    return TrainConfig(
        sites=list(names), rounds=budget.epochs, seed=seed, eval_split="test", mode=mode, weighting=weighting, aggregation="mean",
        model=ModelSpec(model=budget.model, img_size=budget.img_size, projector_dim=budget.projector_dim),
        settings=TrainSettings(
            batch_size=budget.batch_size, lr=budget.lr, local_epochs=1, max_steps_per_visit=budget.max_steps_per_visit,
            crop_scale=budget.crop_scale, ema=budget.ema, max_consistency=max_consistency,
        ),
    )


def compute_settings(budget: Budget):
    """Every site of the benchmark trains on this process's hardware."""
    from arkfed.site.config import ComputeSettings

    return ComputeSettings(device=budget.device, num_workers=budget.num_workers)


@dataclass
class Trained:
    """One trained arm: the foundation model (teacher), the student and each site's head."""

    teacher: object
    student: object
    heads: dict
    seconds: float
    steps: int
    own: dict | None = None  # own test scores when the training loop already computed them


def train_arm(arm: str, names: Sequence[str], sites: Mapping, budget: Budget, seed: int, work: Path,
              weighting: str = "equal") -> Trained:
    """Train one arm on ``names``: ``ark``, ``ark-c0`` (``max_consistency: 0``) and ``parallel``
    (``mode: parallel``) are the one Ark loop with a run folder; ``pooled`` is
    :func:`arkfed.benchmarking.baselines.train_pooled`."""
    import shutil

    chosen = {n: sites[n] for n in names}
    compute = compute_settings(budget)
    start = time.perf_counter()
    if arm == "pooled":
        from arkfed.benchmarking.baselines import train_pooled

        state = train_pooled(train_config(names, budget, seed), chosen, compute)
        steps = sum(epoch_steps(sites[n], budget) for n in names) * budget.epochs
        return Trained(state.teacher, state.student, state.heads, time.perf_counter() - start, steps)
    if arm not in ("ark", "ark-c0", "parallel"):
        raise ValueError(f"unknown arm {arm!r}")
    from arkfed.model.weights import load_ark_model, load_heads
    from arkfed.run.folder import read_metrics
    from arkfed.run.local import train_local

    config = train_config(names, budget, seed, max_consistency=0.0 if arm == "ark-c0" else 0.5,
                          mode="parallel" if arm == "parallel" else "cyclic", weighting=weighting)
    out = work / "runs" / run_key(arm, names, seed).replace(":", "_")
    shutil.rmtree(out, ignore_errors=True)
    summary = train_local(config, out, sites=chosen, compute={n: compute for n in names})
    steps = sum(r.get("steps", 0) for r in read_metrics(out) if r.get("kind") == "visit")
    # the loop scored its last round on each site's test split (eval_split="test"), the teacher
    # with the site's teacher head: reuse it
    own = {name: {m: _auc(summary["sites"][name].get(m, {}).get("mean_auc")) for m in ("teacher", "student")} for name in names}
    return Trained(load_ark_model(out, "teacher").eval(), load_ark_model(out, "student").eval(), load_heads(out / "heads"),
                   time.perf_counter() - start, steps, own)


def _auc(value) -> float:
    """A mean AUC as a float (NaN, written ``null``, when no class of the split has both labels)."""
    return float("nan") if value is None else float(value)


def epoch_steps(site, budget: Budget) -> int:
    """Batches in one visit of ``site`` (one epoch, drop-last, capped by the budget)."""
    n = len(site.split("train"))
    steps = max(1, n // min(budget.batch_size, n))
    return min(steps, budget.max_steps_per_visit) if budget.max_steps_per_visit else steps


# --- evaluation ----------------------------------------------------------------------------------


def own_scores(trained: Trained, names: Sequence[str], sites: Mapping, budget: Budget) -> dict[str, dict[str, float]]:
    """Each site's own test mean AUC with its own head, for teacher and student (as the loop scores)."""
    from arkfed.ark.pair import ArkPair, SiteHeads
    from arkfed.ark.tasks import evaluate_site_models
    from arkfed.config import TrainSettings

    settings = TrainSettings(batch_size=max(budget.batch_size, 64))
    out = {}
    for name in names:
        head = trained.heads[name]
        scored = evaluate_site_models(ArkPair(trained.student, trained.teacher, SiteHeads(head, head)), sites[name], settings, "test",
                                      compute=compute_settings(budget))
        out[name] = {label: _auc(r["mean_auc"]) for label, r in scored.items()}
    return out


def finetune_auc(model, site, budget: Budget, seed: int, init: str = "model") -> float:
    """Test mean AUC after fine-tuning ``model``'s backbone (or a ``random`` one) on ``site``."""
    from arkfed.evaluation.finetune import FineTuneSettings, finetune

    settings = FineTuneSettings(epochs=budget.finetune_epochs, lr=budget.finetune_lr, batch_size=budget.batch_size,
                                crop_scale=budget.crop_scale, seed=seed, max_steps_per_epoch=budget.finetune_max_steps,
                                device=str(torch_device(budget)), n_boot=0)
    # mean_auc: every class with both labels in the test split, as everywhere (arkfed.ark.metrics);
    # no bootstrap: the benchmark's intervals are over seeds
    train, val, test = site.split("train"), site.splits.get("val"), site.split("test")
    return float(finetune(model, train, val, test, site.schema, init, settings)["test"]["mean_auc"])


def transfer(model, target, budget: Budget, seed: int, init: str = "model") -> dict[str, float]:
    """Held-out test mean AUC: linear probes on frozen backbone features (all labels, K-shot) and
    fine-tuning. ``init="random"`` probes and fine-tunes a random model of the same architecture."""
    from arkfed.evaluation.embeddings import embed_table
    from arkfed.evaluation.linear_probe import probe_embeddings, random_model

    frozen = random_model(model.spec, seed) if init == "random" else model
    device = str(torch_device(budget))
    train, test = (embed_table(frozen, target.split(s), target.schema, "backbone", 64, device) for s in ("train", "test"))
    out = {}
    for shots in (None, *budget.shots):
        scored = probe_embeddings(train, test, target.schema, shots, seed=seed)
        out["probe all" if shots is None else f"probe {shots}-shot"] = float(scored["mean_auc"])
    out["finetune"] = finetune_auc(model, target, budget, seed, init)
    return out
