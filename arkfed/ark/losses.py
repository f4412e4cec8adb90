"""Ark's losses: the masked task loss of a site head and the student-teacher consistency loss.

The task loss takes the ``(targets, mask)`` pair of :func:`arkfed.data.schema.label_targets`. Masked
entries are *excluded*: they contribute nothing to the loss or its gradient, and the sum is
divided by the number of counted entries (not by B x K), so a batch with many ignored labels is
not silently down-weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arkfed.data.schema import TaskType


def masked_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the entries where ``mask`` is 1 (0 if none count)."""
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    counted = mask.sum()
    total = torch.where(mask > 0, per_entry, torch.zeros_like(per_entry)).sum()
    return total / counted.clamp(min=1.0)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose mask is set; ``targets`` are one-hot (B x K)."""
    rows = mask[:, 0] > 0
    per_row = F.cross_entropy(logits, targets.argmax(dim=1), reduction="none")
    total = torch.where(rows, per_row, torch.zeros_like(per_row)).sum()
    return total / rows.sum().clamp(min=1)


def task_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, task: TaskType, multiclass_loss: str = "ce") -> torch.Tensor:
    """BCE-with-logits for multilabel/binary schemas; for multiclass, cross-entropy (``multiclass_loss="ce"``)
    or BCE-with-logits on the one-hot targets (``"bce"``, Ark-6's ``BCEWithLogitsLoss`` for every dataset:
    a multiclass row counts in all its K entries or in none, so the mean is over rows x K as in torch)."""
    if task == "multiclass" and multiclass_loss == "ce":
        return masked_cross_entropy(logits, targets, mask)
    return masked_bce_with_logits(logits, targets, mask)


def consistency_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Ark's consistency term: mean squared error between projector outputs (teacher detached)."""
    return F.mse_loss(student_embedding, teacher_embedding.detach())


def ark_loss(task: torch.Tensor, consistency: torch.Tensor | None, c: float) -> torch.Tensor:
    """(1 - c) * task + c * consistency; without a teacher term (c = 0) just the task loss."""
    if consistency is None or c == 0:
        return task
    return (1.0 - c) * task + c * consistency


def task_loss_per_sample(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, task: TaskType,
                         multiclass_loss: str = "ce") -> torch.Tensor:
    """The task loss of each sample on its own (``B``): its counted entries' mean BCE (cross-entropy for
    a counted multiclass row), 0 for a sample with none. What DP-SGD clips (:mod:`arkfed.ark.privacy`):
    sample ``i``'s term depends on sample ``i`` alone, unlike :func:`task_loss`'s pooled denominator."""
    if task == "multiclass" and multiclass_loss == "ce":
        per_row = F.cross_entropy(logits, targets.argmax(dim=1), reduction="none")
        return torch.where(mask[:, 0] > 0, per_row, torch.zeros_like(per_row))
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    counted = (mask > 0).to(per_entry.dtype)
    return (per_entry * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1.0)


def consistency_loss_per_sample(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Ark's consistency term of each sample (``B``): its own mean squared error (teacher detached);
    the batch mean is :func:`consistency_loss`."""
    return (student_embedding - teacher_embedding.detach()).pow(2).mean(dim=1)
