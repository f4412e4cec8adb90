"""Ark's cosine schedules (consistency weight, teacher momentum), the lr plan and the EMA update."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from arkfed.config import TrainConfig, TrainSettings
from arkfed.run.plan import plan_visits
from arkfed.schedules import consistency_weight, ema_update, teacher_momentum, visit_lrs


def reference_cosine(base, final, epochs, niter_per_ep):
    """Ark's/DINO's cosine_scheduler (no warm-up), verbatim in numpy."""
    iters = np.arange(epochs * niter_per_ep)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_schedules_match_arks_reference():
    epochs, datasets = 5, 3  # Ark indexes by epoch * num_datasets + dataset
    c_ref = reference_cosine(0.0, 0.5, epochs, datasets)
    m_ref = reference_cosine(0.9, 1.0, epochs, datasets)
    total = epochs * datasets
    for v in range(total):
        assert consistency_weight(v, total) == pytest.approx(c_ref[v], abs=1e-12)
        assert teacher_momentum(v, total) == pytest.approx(m_ref[v], abs=1e-12)
    assert consistency_weight(0, total) == 0.0 and teacher_momentum(0, total) == pytest.approx(0.9)
    assert consistency_weight(total / 2, total) == pytest.approx(0.25)
    assert teacher_momentum(total, total, base=0.8) == pytest.approx(1.0)
    c = [consistency_weight(v, total) for v in range(total)]
    assert all(a < b for a, b in zip(c, c[1:]))


def test_ema_update_averages_parameters_and_batchnorm_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(4, 1, 5, 5) * 3 + 1)  # moves the student's running stats
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.75)
    s = student.state_dict()
    for key, value in teacher.state_dict().items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.75 * before[key] + 0.25 * s[key], atol=1e-6), key
        else:
            assert torch.equal(value, s[key]), key  # num_batches_tracked is copied
    assert not torch.equal(teacher[1].running_mean, before["1.running_mean"])


def test_ema_with_momentum_one_keeps_teacher_and_zero_copies_student():
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(teacher.state_dict()[k], t0[k]) for k in t0)
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(teacher.state_dict()[k], student.state_dict()[k]) for k in t0)


def test_visit_lrs_warmup_then_cosine():
    settings = TrainSettings(lr=0.1, min_lr=0.0, warmup_visits=2)
    lrs = visit_lrs(settings, 10)
    assert lrs[0] == pytest.approx(0.001) and lrs[0] < lrs[1] < lrs[2]
    # after warm-up timm's cosine (t_initial = 10) continues: lr(t) = 0.05 * (1 + cos(pi t / 10))
    for t in range(2, 10):
        assert lrs[t] == pytest.approx(0.05 * (1 + math.cos(math.pi * t / 10)), rel=1e-6)


def test_plan_visits_order_and_seeds():
    config = TrainConfig(sites=["a", "b", "c"], rounds=4, order="shuffle", seed=3)
    plans = plan_visits(config)
    assert [p.visit for p in plans] == list(range(12))
    for r in range(4):
        assert sorted(p.site for p in plans if p.round == r) == ["a", "b", "c"]
    assert len({tuple(p.site for p in plans if p.round == r) for r in range(4)}) > 1  # shuffled
    assert plans == plan_visits(config)  # a pure function of the config
    assert len({p.seed for p in plans}) == 12
    fixed = plan_visits(config.model_copy(update={"order": "fixed"}))
    assert [p.site for p in fixed] == ["a", "b", "c"] * 4
    assert fixed[5].consistency == pytest.approx(consistency_weight(5, 12))
    assert fixed[5].momentum == pytest.approx(teacher_momentum(5, 12, 0.9))
    assert plans[0].model_validate_json(plans[0].model_dump_json()) == plans[0]  # JSON for Flower
