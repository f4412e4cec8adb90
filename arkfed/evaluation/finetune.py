"""``arkfed finetune``: full fine-tuning on a new site, against random and ImageNet baselines.

The network is what a user of the export gets: the timm backbone with a new linear head on its
pooled features (the projector and old heads are dropped). Every parameter trains. The same
split, augmentation, schedule and seed serve every ``init``, so differences are the init's:

- ``model``: the given weights (run folder, export or weights file);
- ``random``: the same architecture, randomly initialised;
- ``imagenet``: timm's ImageNet weights (needs the network; offline it fails with a clear error).

The new head learns at ``head_lr_scale`` (10x) the backbone's rate: with a short schedule a
randomly initialised head on a pretrained backbone otherwise spends the whole budget catching up
while its gradients disturb the pretrained features (measured: a pretrained model fell below a
random init at one shared lr, and clearly above it with the head at 10x). The epoch with the best
validation mean AUC is kept and scored on the test split, as Ark does for its transfer experiments.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from arkfed.ark.losses import task_loss
from arkfed.ark.metrics import Predictions, score_predictions
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable
from arkfed.evaluation.linear_probe import random_init_seed
from arkfed.model.ark import ArkModel
from arkfed.spec import ModelSpec

FineTuneInit = Literal["model", "random", "imagenet"]


class FineTuneNet(nn.Module):
    """A timm backbone with a fresh linear head on its pooled features."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class FineTuneSettings:
    epochs: int = 5
    lr: float = 1e-3
    head_lr_scale: float = 10.0
    weight_decay: float = 0.05
    batch_size: int = 32
    crop_scale: tuple[float, float] = (0.5, 1.0)  # small crops cut away global findings at small sizes
    seed: int = 0
    max_steps_per_epoch: int | None = None
    min_positives: int = 10
    n_boot: int = 1000
    device: str = "cpu"


def initial_backbone(model: ArkModel, init: FineTuneInit, seed: int) -> nn.Module:
    """A copy of ``model``'s backbone, or a fresh random / ImageNet one of the same architecture."""
    if init == "model":
        return copy.deepcopy(model.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_init_seed(seed))
        return ArkModel(model.spec, pretrained=init == "imagenet").backbone


def predict_net(net: nn.Module, table: DatasetTable, schema: LabelSchema, spec: ModelSpec, batch_size: int, device: str) -> Predictions:
    """The fine-tuned network over a split, through the one inference loop (:func:`arkfed.ark.metrics.infer`)."""
    from arkfed.ark.metrics import infer
    from arkfed.data.loaders import make_eval_loader

    return Predictions(*infer(net, (net,), make_eval_loader(table, schema, spec, batch_size), device))


def train_epoch(net: nn.Module, optimizer, scheduler, table: DatasetTable, schema: LabelSchema, spec: ModelSpec,
                settings: FineTuneSettings, epoch: int) -> tuple[float, int]:
    """One pass over the (augmented) training split; returns the mean loss and the steps taken."""
    from arkfed.data.loaders import TrainLoaderOptions, make_train_loader

    options = TrainLoaderOptions(settings.batch_size, epochs=1, seed=settings.seed * 1000 + epoch, crop_scale=settings.crop_scale,
                                 views="ark", max_steps=settings.max_steps_per_epoch)
    loader = make_train_loader(table, schema, spec, options)
    net.train()
    losses = []
    for images, _, targets, mask in loader:  # the student view: geometry + intensity jitter
        loss = task_loss(net(images.to(settings.device)), targets.to(settings.device), mask.to(settings.device), schema.task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return float(np.mean(losses)), len(losses)


def finetune(model: ArkModel, train: DatasetTable, val: DatasetTable | None, test: DatasetTable, schema: LabelSchema,
             init: FineTuneInit, settings: FineTuneSettings) -> dict:
    """Fine-tune from ``init`` and return the history and the test metrics of the best-val epoch."""
    torch.manual_seed(settings.seed)
    net = FineTuneNet(initial_backbone(model, init, settings.seed), schema.num_classes).to(settings.device)
    spec = model.spec
    optimizer = torch.optim.AdamW([
        {"params": net.backbone.parameters(), "lr": settings.lr},
        {"params": net.head.parameters(), "lr": settings.lr * settings.head_lr_scale},
    ], weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(train) // min(settings.batch_size, len(train)))
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                    total_steps=settings.epochs * steps_per_epoch, pct_start=0.1, anneal_strategy="cos")
    history, best, best_state = [], -np.inf, None
    for epoch in range(settings.epochs):
        loss, _ = train_epoch(net, optimizer, scheduler, train, schema, spec, settings, epoch)
        record = {"epoch": epoch, "train_loss": loss}
        if val is not None and len(val):
            record["val_mean_auc"] = score_predictions(predict_net(net, val, schema, spec, 64, settings.device), schema)["mean_auc"]
        history.append(record)
        score = record.get("val_mean_auc", epoch)  # without a val split: the last epoch
        if best_state is None or (not np.isnan(score) and score > best):
            best, best_state, best_epoch = score, copy.deepcopy(net.state_dict()), epoch
    from arkfed.evaluation.evaluate import evaluate_predictions

    net.load_state_dict(best_state)
    scored = evaluate_predictions(predict_net(net, test, schema, spec, 64, settings.device), schema, settings.n_boot, settings.seed,
                                  test, settings.min_positives)
    return {"init": init, "epochs": settings.epochs, "lr": settings.lr, "seed": settings.seed, "best_epoch": best_epoch,
            "history": history, "test": scored}


def finetune_curve(models: dict[str, ArkModel], train: DatasetTable, val: DatasetTable | None, test: DatasetTable, schema: LabelSchema,
                   inits: tuple[str, ...], sizes: tuple[int | None, ...], seeds: tuple[int, ...], settings: FineTuneSettings,
                   correction: str = "holm") -> dict:
    """Fine-tuning at several training-set sizes (random subsets shared by every initialisation
    for a seed): ``inits`` of ``models["model"]`` (model, random, imagenet) plus every other
    entry of ``models`` (compared models, fine-tuned from their own weights)."""
    import dataclasses

    from arkfed.evaluation.curves import REFERENCE, size_label, subset_rows, summarise_curves

    plan = [(i, models[REFERENCE], i) for i in inits] + [(name, m, "model") for name, m in models.items() if name != REFERENCE]
    records, runs = [], []
    for name, model, init in plan:
        for size in sizes:
            for seed in seeds:
                rows = subset_rows(len(train), size, seed)
                run = finetune(model, train.subset(rows), val, test, schema, init, dataclasses.replace(settings, seed=seed))
                run |= {"init": name, "size": size_label(size), "train_size": int(len(rows))}
                runs.append(run)
                records.append({"init": name, "size": size_label(size), "seed": seed, "score": run["test"]["mean_auc"],
                                "train_size": int(len(rows))})
    curve = summarise_curves(records, list(sizes), "mean AUC", None, correction, unit="training images")
    for run in runs:  # the first seed's test bootstrap: shown when the seeds do not vary (see curves.shown_ci)
        if run["seed"] == seeds[0]:
            curve["inits"][run["init"]][run["size"]]["bootstrap_ci"] = run["test"].get("mean_auc_ci")
    return {"curve": curve, "runs": runs, "seeds": list(seeds), "sizes": [size_label(s) for s in sizes]}
