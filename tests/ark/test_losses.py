"""Masked task losses (ignored entries truly excluded) and Ark's combined loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arkfed.ark.losses import ark_loss, consistency_loss, masked_bce_with_logits, masked_cross_entropy, task_loss
from arkfed.data.schema import UNCERTAIN, LabelSchema, label_targets


def test_masked_bce_ignores_nan_labels_and_normalises_by_counted_entries():
    schema = LabelSchema(task="multilabel", classes=("a", "b", "c"), missing="ignore", uncertain="ignore")
    raw = np.array([[1, np.nan, 0], [UNCERTAIN, 1, np.nan]], dtype=np.float32)
    targets, mask = (torch.from_numpy(x) for x in label_targets(raw, schema))
    logits = torch.tensor([[0.3, -2.0, 1.0], [5.0, 0.5, 7.0]], requires_grad=True)
    loss = masked_bce_with_logits(logits, targets, mask)
    counted = [(0, 0, 1.0), (0, 2, 0.0), (1, 1, 1.0)]
    expected = sum(F.binary_cross_entropy_with_logits(logits[i, j], torch.tensor(t)) for i, j, t in counted) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0 and logits.grad[1, 2] == 0
    assert logits.grad[0, 0] != 0
    # changing an ignored logit (even to inf) changes nothing
    worse = logits.detach().clone()
    worse[1, 2] = float("inf")
    assert masked_bce_with_logits(worse, targets, mask).item() == pytest.approx(loss.item())


def test_masked_bce_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.zeros(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_full_mask_equals_plain_bce():
    logits, targets = torch.randn(4, 5), torch.rand(4, 5)
    assert torch.allclose(masked_bce_with_logits(logits, targets, torch.ones(4, 5)), F.binary_cross_entropy_with_logits(logits, targets))


def test_multiclass_cross_entropy_skips_unlabelled_rows():
    schema = LabelSchema(task="multiclass", classes=("x", "y", "z"))
    raw = np.array([[0, 1, 0], [np.nan, np.nan, np.nan], [1, 0, 0]], dtype=np.float32)
    targets, mask = (torch.from_numpy(x) for x in label_targets(raw, schema))
    logits = torch.randn(3, 3)
    loss = task_loss(logits, targets, mask, "multiclass")
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([1, 0]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(masked_cross_entropy(logits, targets, torch.zeros(3, 3))) == 0.0


def test_ark_loss_combines_task_and_consistency():
    s, t = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    cons = consistency_loss(s, t)
    assert cons.item() == pytest.approx(((s - t) ** 2).mean().item())
    task = torch.tensor(2.0)
    assert ark_loss(task, cons, 0.3).item() == pytest.approx(0.7 * 2.0 + 0.3 * cons.item())
    assert ark_loss(task, cons, 0.0) is task
    cons.backward()
    assert t.grad is None  # the teacher side gets no gradient
