"""Evaluation metrics of a site head on a split: per-class AUC, mean AUC, accuracy, loss.

AUCs are computed with scikit-learn over the *counted* entries of each class (the mask of
:func:`arkfed.schema.label_targets`); a class whose counted labels are all one value has no AUC
(NaN) and is left out of the mean. The mean runs over the schema's ``reported_classes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from arkfed.losses import task_loss
from arkfed.schema import LabelSchema

if TYPE_CHECKING:
    from arkfed.dataset import DatasetTable
    from arkfed.site import ComputeSettings
    from arkfed.model import ArkModel, SiteHead
    from arkfed.training import TrainSettings


@dataclass
class Predictions:
    """Logits, hard targets and mask of a whole split, row-aligned (numpy, N x K)."""

    logits: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def class_auc(scores: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """ROC AUC of one class over its counted entries; NaN when only one label value is present."""
    from sklearn.metrics import roc_auc_score

    keep = mask > 0
    y = targets[keep] > 0.5
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, scores[keep]))


def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    """Probabilities: softmax for multiclass (one-vs-rest AUC), sigmoid otherwise."""
    t = torch.as_tensor(logits, dtype=torch.float32)
    return (t.softmax(dim=1) if task == "multiclass" else t.sigmoid()).numpy()


def class_aucs(scores: np.ndarray, targets: np.ndarray, mask: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    return {name: class_auc(scores[:, k], targets[:, k], mask[:, k]) for k, name in enumerate(classes)}


def mean_auc(aucs: dict[str, float], classes: Sequence[str]) -> float:
    """Mean over ``classes`` of the AUCs that exist (NaN if none does)."""
    values = [aucs[c] for c in classes if c in aucs and not np.isnan(aucs[c])]
    return float(np.mean(values)) if values else float("nan")


def multiclass_accuracy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    rows = mask[:, 0] > 0
    if not rows.any():
        return float("nan")
    return float((logits[rows].argmax(1) == targets[rows].argmax(1)).mean())


def score_predictions(pred: Predictions, schema: LabelSchema) -> dict:
    """``{"loss", "mean_auc", "auc": {class: value}, "num_examples"[, "accuracy"]}``."""
    logits = torch.as_tensor(pred.logits, dtype=torch.float32)
    loss = float(task_loss(logits, torch.as_tensor(pred.targets), torch.as_tensor(pred.mask), schema.task))
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
def predict(model: "ArkModel", head: "SiteHead", loader, device: torch.device | str = "cpu") -> Predictions:
    """Run model + head over an eval loader in eval mode (training state restored afterwards)."""
    from arkfed.training import autocast, memory_format

    device = torch.device(device)
    was_training = model.training, head.training
    model.eval(), head.eval()
    logits, targets, masks = [], [], []
    try:
        for images, t, m in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))
            with autocast(device):
                out = head(model(images))
            logits.append(out.float().cpu().numpy())
            targets.append(t.numpy())
            masks.append(m.numpy())
    finally:
        model.train(was_training[0]), head.train(was_training[1])
    k = head.out_features
    if not logits:
        return Predictions(np.zeros((0, k), np.float32), np.zeros((0, k), np.float32), np.zeros((0, k), np.float32))
    return Predictions(np.concatenate(logits), np.concatenate(targets), np.concatenate(masks))


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
    :func:`recalibrate_batchnorm`); the result then says ``"bn_recalibrated": true``. Uses
    ``settings.batch_size`` and the site's ``compute`` (device, workers; CPU when not given); the
    model is moved to that device and stays there.
    """
    from arkfed.data import make_eval_loader
    from arkfed.training import memory_format, resolve_device

    device = resolve_device(compute.device if compute is not None else "cpu")
    workers = compute.workers() if compute is not None else 0
    model.to(device, memory_format=memory_format(device))
    head.to(device)
    pin = device.type == "cuda"
    recalibrate = calibration is not None and len(calibration) > 0 and has_batchnorm(model)
    if recalibrate:
        subset = calibration.subset(np.arange(min(calibration_images, len(calibration))))
        model = recalibrate_batchnorm(
            model, make_eval_loader(subset, schema, model.spec, settings.batch_size, workers, pin), device
        )
    loader = make_eval_loader(table, schema, model.spec, settings.batch_size, workers, pin)
    result = score_predictions(predict(model, head, loader, device), schema)
    result["bn_recalibrated"] = recalibrate
    return result

