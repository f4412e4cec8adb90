"""``arkfed audit privacy``: a membership-inference audit of a released model on one site's own data.

Run at the site, by its operator: can an attacker who holds the model (an export, or a run folder's
teacher or student, each with this site's head) tell the site's training images from images of the
same site it never trained on? The attack is the loss threshold (Yeom et al., 2018): an image is
called a member when the model's task loss on it, with the site's head, is low. Its score is
``-loss``; the audit reports

- the attack AUC (members = the training split, non-members = the held-out split; 0.5 = the
  attacker guesses) with a bootstrap 95% interval (:func:`arkfed.evaluation.stats.bootstrap_two_sample`,
  members and non-members resampled separately);
- the TPR at 1% FPR: the fraction of members flagged at the threshold that flags 1% of
  non-members (the regime that matters for a privacy claim: few false accusations).

Only these summary numbers are printed and saved; no per-image score leaves the function. The
loss is :func:`arkfed.ark.losses.task_loss_per_sample` on the evaluation view (BatchNorm
re-estimated on the training images as evaluation does). A stronger attack (LiRA's shadow models,
ML Privacy Meter) is not included: it needs many shadow models trained like the audited one, and
no maintained library for it is a dependency; a low loss-threshold AUC is therefore a lower bound
on what an attacker can do, not a proof of privacy. The proof is the DP guarantee (SECURITY.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from arkfed.errors import ArkfedError

FPR = 0.01


def per_image_losses(model, head, table, schema, device: str = "cpu", batch_size: int = 64, calibration=None,
                     multiclass_loss: str = "ce") -> np.ndarray:
    """Each image's task loss under ``head(model(x))`` (evaluation view, labels as evaluation counts them)."""
    from arkfed.ark.losses import task_loss_per_sample
    from arkfed.ark.metrics import site_predictions

    pred, _ = site_predictions(model, head, table, schema, device, batch_size, calibration=calibration)
    losses = task_loss_per_sample(torch.from_numpy(pred.logits).float(), torch.from_numpy(pred.targets).float(),
                                  torch.from_numpy(pred.mask).float(), schema.task, multiclass_loss)
    counted = pred.mask.sum(axis=1) > 0  # an image with no counted label has no loss to attack
    return losses.numpy()[counted]


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = FPR) -> float:
    """Fraction of member scores above the threshold that only ``fpr`` of non-member scores exceed."""
    threshold = np.quantile(non_members, 1.0 - fpr, method="higher")
    return float(np.mean(members > threshold))


def attack_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """AUC of telling members (label 1) from non-members by score (ties count half)."""
    from arkfed.ark.metrics import roc_auc

    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    return float(roc_auc(labels, np.concatenate([members, non_members])))


def loss_threshold_audit(member_losses: Sequence[float], non_member_losses: Sequence[float], n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """The loss-threshold attack's summary: AUC with its bootstrap 95% CI, TPR at 1% FPR, counts."""
    from arkfed.evaluation.stats import bootstrap_two_sample

    members, non_members = -np.asarray(member_losses, float), -np.asarray(non_member_losses, float)
    if len(members) < 2 or len(non_members) < 2:
        raise ArkfedError(f"the audit needs at least 2 training and 2 held-out images with labels (has {len(members)} and "
                          f"{len(non_members)})")
    auc = bootstrap_two_sample(members, non_members, attack_auc, n_boot, seed)
    return {"attack": "loss threshold (Yeom et al. 2018)", "attack_auc": auc["estimate"], "attack_auc_ci95": auc["ci95"],
            "bootstrap": n_boot, f"tpr_at_{FPR:g}_fpr": tpr_at_fpr(members, non_members),
            "members": len(members), "non_members": len(non_members)}


def audit_privacy(model, head, site, held_out: str | None = None, device: str = "cpu", batch_size: int = 64,
                  max_images: int | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """The audit of ``head(model(x))`` on ``site``: training split vs ``held_out`` (default: test if
    the site has one, else val), at most ``max_images`` of each (a seeded draw)."""
    train = site.splits.get("train")
    held_out = held_out or ("test" if len(site.splits.get("test") or ()) else "val")
    other = site.splits.get(held_out)
    if train is None or not len(train) or other is None or not len(other):
        raise ArkfedError(f"the audit needs a training split and a held-out {held_out!r} split with images", site=site.name)
    rng = np.random.default_rng(seed)

    def draw(table):
        if max_images is None or len(table) <= max_images:
            return table
        return table.subset(np.sort(rng.choice(len(table), max_images, replace=False)))

    member = per_image_losses(model, head, draw(train), site.schema, device, batch_size, calibration=train)
    non_member = per_image_losses(model, head, draw(other), site.schema, device, batch_size, calibration=train)
    return {"site": site.name, "held_out": held_out, **loss_threshold_audit(member, non_member, n_boot, seed)}


def run_audit(source: str | Path, site_ref: str, which: str = "teacher", held_out: str | None = None, device: str = "cpu",
              batch_size: int = 64, max_images: int | None = None, n_boot: int = 1000, seed: int = 0, plugins=(),
              out: str | Path | None = None) -> dict:
    """``arkfed audit privacy``: load the model (export or run folder) and the site, audit, save ``results.json``."""
    from arkfed.evaluation.sources import head_for_site, load_one, model_heads, write_results
    from arkfed.site.load import load_site

    site = load_site(site_ref, plugins)
    model = load_one(source, which)
    heads, _ = model_heads(source, which)
    head = head_for_site(heads, site.name, source)
    result = {"model": str(source), "which": which,
              **audit_privacy(model, head, site, held_out, device, batch_size, max_images, n_boot, seed)}
    if out is not None:
        write_results(out, result)
    return result
