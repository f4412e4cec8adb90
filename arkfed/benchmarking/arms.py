"""The accrual benchmark's arms: training one arm on some sites (the Ark loop, including the
compute-matched single site of :func:`matched_visit`, or pooled multi-task training) and scoring
it: each site's own test mean AUC, fine-tuning, and transfer to the held-out site (linear probes
and fine-tuning). Every score is the site mean AUC of :func:`arkfed.ark.metrics.mean_auc`.
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
                 weighting: str = "equal", visit: tuple[int, int] | None = None):
    """The Ark run of ``names`` at this budget: one visit = one epoch of a site, E rounds (parallel
    mode averages, as Ark+ and FedAvg do: the honest benchmark sites need no robust aggregation).
    ``visit`` = (local epochs, steps): a visit of exactly that many steps instead (the matched arm)."""
    from arkfed.config import TrainConfig, TrainSettings
    from arkfed.spec import ModelSpec

    local_epochs, max_steps = visit or (1, budget.max_steps_per_visit)
    return TrainConfig(
        sites=list(names), rounds=budget.epochs, seed=seed, eval_split="test", mode=mode, weighting=weighting, aggregation="mean",
        model=ModelSpec(model=budget.model, img_size=budget.img_size, projector_dim=budget.projector_dim),
        settings=TrainSettings(
            batch_size=budget.batch_size, lr=budget.lr, local_epochs=local_epochs, max_steps_per_visit=max_steps,
            crop_scale=budget.crop_scale, ema=budget.ema, max_consistency=max_consistency,
        ),
    )


def matched_visit(name: str, match: Sequence[str], sites: Mapping, budget: Budget) -> tuple[int, int]:
    """(local epochs, steps) of a visit of ``name`` alone as long as one round of Ark on ``match``
    (one epoch of each of those sites): E such visits train as many steps, on as many images, as
    Ark on ``match`` for E rounds."""
    steps = sum(epoch_steps(sites[n], budget) for n in match)
    return -(-steps // epoch_steps(sites[name], budget, capped=False)), steps


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
    images: int = 0  # training images drawn (steps x batch: whole batches only)
    own: dict | None = None  # own test scores when the training loop already computed them


LOOP_ARMS = ("ark", "ark-c0", "parallel", "matched")


def loop_config(arm: str, names: Sequence[str], sites: Mapping, budget: Budget, seed: int, weighting: str = "equal",
                match: Sequence[str] = ()):
    """The loop's config of an arm: ``ark``; ``ark-c0`` (``max_consistency: 0``); ``parallel``
    (``mode: parallel``); ``matched``: Ark on one site, each of its E visits as long as a round of
    Ark on ``match`` (:func:`matched_visit`)."""
    if arm not in LOOP_ARMS:
        raise ValueError(f"unknown arm {arm!r}")
    if arm == "matched":
        if len(names) != 1 or not match:
            raise ValueError(f"the matched arm trains one site as long as Ark on the sources, got {names} matched to {match}")
        return train_config(names, budget, seed, visit=matched_visit(names[0], match, sites, budget))
    return train_config(names, budget, seed, max_consistency=0.0 if arm == "ark-c0" else 0.5,
                        mode="parallel" if arm == "parallel" else "cyclic", weighting=weighting)


def train_arm(arm: str, names: Sequence[str], sites: Mapping, budget: Budget, seed: int, work: Path,
              weighting: str = "equal", match: Sequence[str] = ()) -> Trained:
    """Train one arm on ``names``: the arms of :func:`loop_config` are the one Ark loop with a run
    folder (steps and images counted from its visit records); ``pooled`` is
    :func:`arkfed.benchmarking.baselines.train_pooled`."""
    import shutil

    chosen = {n: sites[n] for n in names}
    compute = compute_settings(budget)
    start = time.perf_counter()
    if arm == "pooled":
        from arkfed.benchmarking.baselines import train_pooled

        state = train_pooled(train_config(names, budget, seed), chosen, compute)
        steps = {n: epoch_steps(sites[n], budget) * budget.epochs for n in names}
        images = sum(k * min(budget.batch_size, len(sites[n].split("train"))) for n, k in steps.items())
        return Trained(state.teacher, state.student, state.heads, time.perf_counter() - start, sum(steps.values()), images)
    from arkfed.model.weights import load_ark_model, load_heads
    from arkfed.run.folder import read_metrics
    from arkfed.run.local import train_local

    config = loop_config(arm, names, sites, budget, seed, weighting, match)
    out = work / "runs" / run_key(arm, names, seed).replace(":", "_")
    shutil.rmtree(out, ignore_errors=True)
    summary = train_local(config, out, sites=chosen, compute={n: compute for n in names})
    visits = [r for r in read_metrics(out) if r.get("kind") == "visit"]
    # the loop scored its last round on each site's test split (eval_split="test"), the teacher
    # with the site's teacher head: reuse it
    own = {name: {m: _auc(summary["sites"][name].get(m, {}).get("mean_auc")) for m in ("teacher", "student")} for name in names}
    return Trained(load_ark_model(out, "teacher").eval(), load_ark_model(out, "student").eval(), load_heads(out / "heads"),
                   time.perf_counter() - start, sum(r.get("steps", 0) for r in visits), sum(r.get("num_examples", 0) for r in visits), own)


def _auc(value) -> float:
    """A mean AUC as a float (NaN, written ``null``, when no class of the split has both labels)."""
    return float("nan") if value is None else float(value)


def epoch_steps(site, budget: Budget, capped: bool = True) -> int:
    """Batches in one visit of ``site`` (one epoch, drop-last, capped by the budget unless ``capped=False``)."""
    n = len(site.split("train"))
    steps = max(1, n // min(budget.batch_size, n))
    return min(steps, budget.max_steps_per_visit) if budget.max_steps_per_visit and capped else steps


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


def finetune_run(model, site, budget: Budget, seed: int, init: str = "model") -> dict:
    """:func:`arkfed.evaluation.finetune.finetune` of ``model``'s backbone (or a ``random`` one) on
    ``site`` at this budget: the best validation epoch's test metrics, without bootstrap (the
    benchmarks' intervals are over seeds)."""
    from arkfed.evaluation.finetune import FineTuneSettings, finetune

    settings = FineTuneSettings(epochs=budget.finetune_epochs, lr=budget.finetune_lr, batch_size=budget.batch_size,
                                crop_scale=budget.crop_scale, seed=seed, max_steps_per_epoch=budget.finetune_max_steps,
                                device=str(torch_device(budget)), n_boot=0)
    train, val, test = site.split("train"), site.splits.get("val"), site.split("test")
    return finetune(model, train, val, test, site.schema, init, settings)


def finetune_auc(model, site, budget: Budget, seed: int, init: str = "model") -> float:
    """Test mean AUC after fine-tuning ``model``'s backbone (or a ``random`` one) on ``site``:
    every class with both labels in the test split, as everywhere (:mod:`arkfed.ark.metrics`)."""
    return float(finetune_run(model, site, budget, seed, init)["test"]["mean_auc"])


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
