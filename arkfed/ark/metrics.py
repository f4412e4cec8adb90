"""Evaluation metrics of a site head on a split: per-class AUC, mean AUC, accuracy, loss.

AUCs are computed over the *counted* entries of each class (the mask of
:func:`arkfed.data.schema.label_targets`); a class whose counted labels are all one value has no
AUC (NaN).

A site's mean AUC (``mean_auc``), one definition everywhere (:func:`mean_auc`): the mean of the
AUCs of the schema's ``reported_classes`` that have both a positive and a negative counted label
in the split; no minimum number of positives. Training-time evaluation (``metrics.jsonl``,
``summary.json``), ``evaluate``, ``report``, ``compare``, the transfer curves and the benchmarks
all report this number under this key. ``evaluate`` also reports ``mean_auc_min_positives``:
the same mean over the classes with at least ``--min-positives`` positives
(:func:`arkfed.evaluation.evaluate.evaluate_predictions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from arkfed.ark.losses import task_loss
from arkfed.data.schema import LabelSchema

if TYPE_CHECKING:
    from arkfed.config import TrainSettings
    from arkfed.data.tables import DatasetTable
    from arkfed.model.ark import ArkModel, SiteHead
    from arkfed.site.config import ComputeSettings


@dataclass
class Predictions:
    """Logits, hard targets and mask of a whole split, row-aligned (numpy, N x K)."""

    logits: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def roc_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """ROC AUC (the Mann-Whitney statistic, ties count one half), the one AUC of arkfed.

    ``weights`` (N, or B x N) counts each case that many times: a B x N matrix of bootstrap
    multiplicities gives the B replicates' AUCs in one vectorised pass (the scores are sorted
    once), which is what makes bootstrap CIs over thousands of replicates affordable on a laptop.
    NaN where a replicate lacks positives or negatives. Checked against scikit-learn in the tests.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    single = weights is None or np.ndim(weights) == 1
    w = np.ones((1, len(scores))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if len(scores) == 0:
        out = np.full(len(w), np.nan)
        return float(out[0]) if single else out
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups of equal scores
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each tie group
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (pos * (below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)
    out[(total_pos == 0) | (total_neg == 0)] = np.nan
    return float(out[0]) if single else out


def class_auc(scores: np.ndarray, targets: np.ndarray, mask: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """ROC AUC of one class over its counted entries; NaN when only one label value is present
    (per replicate, with a B x N ``weights`` matrix: see :func:`roc_auc`)."""
    keep = mask > 0
    if weights is not None:
        weights = np.asarray(weights)[..., keep]
    return roc_auc(targets[keep] > 0.5, scores[keep], weights)


def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    """Probabilities: softmax for multiclass (one-vs-rest AUC), sigmoid otherwise."""
    t = torch.as_tensor(logits, dtype=torch.float32)
    return (t.softmax(dim=1) if task == "multiclass" else t.sigmoid()).numpy()


def class_aucs(scores: np.ndarray, targets: np.ndarray, mask: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    return {name: class_auc(scores[:, k], targets[:, k], mask[:, k]) for k, name in enumerate(classes)}


def mean_auc(aucs: dict[str, float], classes: Sequence[str]) -> float:
    """Mean over ``classes`` of the AUCs that exist, i.e. of the classes with both labels in the
    split (NaN if none does). With the schema's ``reported_classes``: a site's mean AUC."""
    values = [aucs[c] for c in classes if c in aucs and not np.isnan(aucs[c])]
    return float(np.mean(values)) if values else float("nan")


def multiclass_accuracy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    rows = mask[:, 0] > 0
    if not rows.any():
        return float("nan")
    return float((logits[rows].argmax(1) == targets[rows].argmax(1)).mean())


def score_predictions(pred: Predictions, schema: LabelSchema, multiclass_loss: str = "ce") -> dict:
    """``{"loss", "mean_auc", "auc": {class: value}, "num_examples"[, "accuracy"]}``; the loss is the
    training's task loss (:func:`arkfed.ark.losses.task_loss`, ``multiclass_loss`` for multiclass schemas)."""
    logits = torch.as_tensor(pred.logits, dtype=torch.float32)
    loss = float(task_loss(logits, torch.as_tensor(pred.targets), torch.as_tensor(pred.mask), schema.task, multiclass_loss))
    aucs = class_aucs(scores_from_logits(pred.logits, schema.task), pred.targets, pred.mask, schema.classes)
    result = {
        "loss": loss,
        "mean_auc": mean_auc(aucs, schema.reported_classes),
        "auc": aucs,
        "num_examples": int(len(pred.logits)),
    }
    if schema.task == "multiclass":
        result["accuracy"] = multiclass_accuracy(pred.logits, pred.targets, pred.mask)
    return result


@torch.no_grad()
def infer(forward, modules: Sequence[torch.nn.Module], loader,
          device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one inference loop: ``forward(images)`` over an eval loader with ``modules`` in eval
    mode (their training state restored afterwards) -> (outputs, targets, masks) as numpy.

    Head outputs for metrics, frozen embeddings for probes and fine-tuned networks all go
    through here, so device placement, memory format and autocast are the same everywhere."""
    from arkfed.devices import autocast, memory_format

    device = torch.device(device)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    outputs, targets, masks = [], [], []
    try:
        for images, t, m in loader:
            fmt = memory_format(device) if images.ndim == 4 else torch.contiguous_format  # ten-crop batches are 5-D
            images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast(device):
                out = forward(images)
            outputs.append(out.float().cpu().numpy())
            targets.append(t.numpy())
            masks.append(m.numpy())
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    if not outputs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(outputs), np.concatenate(targets), np.concatenate(masks)


def predict(model: "ArkModel", head: "SiteHead", loader, device: torch.device | str = "cpu") -> Predictions:
    """Run model + head over an eval loader in eval mode (training state restored afterwards)."""
    logits, targets, masks = infer(lambda x: head(model(x)), (model, head), loader, device)
    if not len(logits):
        k = head.out_features
        return Predictions(np.zeros((0, k), np.float32), np.zeros((0, k), np.float32), np.zeros((0, k), np.float32))
    return Predictions(logits, targets, masks)


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: "ArkModel", loader, device: torch.device) -> "ArkModel":
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``loader``'s
    images (AdaBN); weights are unchanged and ``model`` itself is not touched.

    Why: cycling over sites leaves a BatchNorm model with the statistics of the last site it
    trained on, which can wreck another site's predictions (the demo's CheXpert-style site lost
    up to 0.3 AUC that way). Statistics are site data, so each site re-estimates them on its own
    training images before it evaluates, in local and in federated runs alike.
    """
    import copy

    calibrated = copy.deepcopy(model).eval()
    norms = [m for m in calibrated.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all calibration batches
        norm.train()
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    used = 0
    for batch in loader:
        if len(batch.images) < 2:  # BatchNorm cannot normalise a batch of one
            continue
        calibrated(batch.images.to(device, non_blocking=True).contiguous(memory_format=fmt))
        used += 1
    if not used:
        return model
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return calibrated.eval()


CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32  # fixed, not the run's batch size: the statistics must not depend on it


def calibrated_model(model: "ArkModel", schema: LabelSchema, calibration: "DatasetTable | None", device: torch.device | str,
                     num_workers: int = 0, calibration_images: int = CALIBRATION_IMAGES) -> tuple["ArkModel", bool]:
    """``model`` with BatchNorm statistics re-estimated on the first ``calibration_images`` rows
    of ``calibration`` (a site's training split), in batches of :data:`CALIBRATION_BATCH`; the
    model itself when it has no BatchNorm or there is nothing to calibrate on. The same rows,
    order and batches every time, so training-time evaluation, ``arkfed evaluate`` and
    ``arkfed export --calibrate`` arrive at identical statistics. Returns (model, recalibrated)."""
    from arkfed.data.loaders import make_eval_loader

    device = torch.device(device)
    if calibration is None or len(calibration) < 2 or not has_batchnorm(model):
        return model, False
    subset = calibration.subset(np.arange(min(calibration_images, len(calibration))))
    loader = make_eval_loader(subset, schema, model.spec, CALIBRATION_BATCH, num_workers, device.type == "cuda")
    calibrated = recalibrate_batchnorm(model, loader, device)
    return calibrated, calibrated is not model


def site_predictions(model: "ArkModel", head: "SiteHead", table: "DatasetTable", schema: LabelSchema, device: torch.device | str,
                     batch_size: int = 64, num_workers: int = 0, calibration: "DatasetTable | None" = None,
                     calibration_images: int = CALIBRATION_IMAGES) -> tuple[Predictions, bool]:
    """``head(model(x))`` on a split, after the BatchNorm recalibration of :func:`calibrated_model`;
    what training-time evaluation scores and what ``arkfed evaluate`` scores. -> (predictions, recalibrated)."""
    from arkfed.data.loaders import make_eval_loader
    from arkfed.devices import memory_format

    device = torch.device(device)
    model.to(device, memory_format=memory_format(device))
    head.to(device)
    model, recalibrated = calibrated_model(model, schema, calibration, device, num_workers, calibration_images)
    loader = make_eval_loader(table, schema, model.spec, batch_size, num_workers, device.type == "cuda")
    return predict(model, head, loader, device), recalibrated


def evaluate_site(
    model: "ArkModel",
    head: "SiteHead",
    table: "DatasetTable",
    schema: LabelSchema,
    settings: "TrainSettings",
    calibration: "DatasetTable | None" = None,
    calibration_images: int = CALIBRATION_IMAGES,
    compute: "ComputeSettings | None" = None,
) -> dict:
    """Loss, per-class AUC, mean AUC (and accuracy for multiclass) of ``head(model(x))`` on a split.

    With ``calibration`` (the site's training split) a BatchNorm model is scored with running
    statistics re-estimated on up to ``calibration_images`` of its images (see
    :func:`calibrated_model`); the result then says ``"bn_recalibrated": true``. Uses
    ``settings.batch_size`` and the site's ``compute`` (device, workers; CPU when not given); the
    model is moved to that device and stays there.
    """
    from arkfed.devices import resolve_device

    device = resolve_device(compute.device if compute is not None else "cpu")
    workers = compute.workers() if compute is not None else 0
    pred, recalibrated = site_predictions(model, head, table, schema, device, settings.batch_size, workers, calibration, calibration_images)
    result = score_predictions(pred, schema, settings.multiclass_loss)
    result["bn_recalibrated"] = recalibrated
    return result
