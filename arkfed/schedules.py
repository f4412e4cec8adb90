"""Ark's schedules (consistency weight, teacher momentum) and the teacher EMA update.

Both schedules follow Ark's reference ``cosine_scheduler`` (from DINO), indexed by site visit:
``value(v) = final + (base - final) * (1 + cos(pi * v / T)) / 2`` for ``v`` in ``[0, T)``, so the
first visit gets ``base`` and the last approaches ``final``. The consistency weight goes 0 -> c_max
(0.5) and the teacher momentum ``base`` (0.9) -> 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from arkfed.config import TrainSettings


def cosine_value(base: float, final: float, step: float, total: int) -> float:
    """Ark's/DINO's cosine interpolation from ``base`` (step 0) towards ``final`` (step ``total``)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * step / total))


def consistency_weight(visit: float, total_visits: int, max_c: float = 0.5) -> float:
    """c for a visit: 0 at the first visit, rising to ``max_c`` by the end of the run."""
    return cosine_value(0.0, max_c, visit, total_visits)


def teacher_momentum(visit: float, total_visits: int, base: float = 0.9) -> float:
    """EMA momentum for a visit: ``base`` at the first visit, rising to 1 (a frozen teacher)."""
    return cosine_value(base, 1.0, visit, total_visits)


ARK_PLUS_C = (0.9, 5.0)  # Ark_Plus/Pretraining/trainer.py: coff = (momentum_schedule[it] - 0.9) * 5


def consistency_from_momentum(momentum: float) -> float:
    """Ark+'s c, tied to the teacher momentum: ``(m - 0.9) * 5`` (``Ark_Plus/Pretraining/trainer.py``),
    clamped to ``[0, 1]``. With Ark's base momentum 0.9 this equals the cosine ``c`` schedule
    (0 -> 0.5); with another base it does not (0.99: c runs 0.45 -> 0.5), which is Ark+'s behaviour."""
    offset, slope = ARK_PLUS_C
    return min(max((momentum - offset) * slope, 0.0), 1.0)


def ema_update(teacher: "nn.Module", student: "nn.Module", momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters *and* buffers.

    Floating-point buffers (BatchNorm running mean/var) are averaged like parameters, so a CNN
    teacher's normalisation statistics follow its weights (Ark's code leaves them stale). Integer
    buffers (``num_batches_tracked``) are copied from the student. (torch is imported here so
    that the schedules stay importable without it.)
    """
    import torch

    with torch.no_grad():
        _ema(teacher, student, momentum)


def _ema(teacher: "nn.Module", student: "nn.Module", momentum: float) -> None:
    import torch

    t_state = teacher.state_dict(keep_vars=True)
    s_state = student.state_dict(keep_vars=True)
    if t_state.keys() != s_state.keys():
        raise ValueError("teacher and student have different architectures")
    t_float, s_float = [], []
    for key, t in t_state.items():
        s = s_state[key]
        if t.dtype.is_floating_point:
            t_float.append(t.data)
            s_float.append(s.data.to(t.dtype))
        else:
            t.data.copy_(s.data)
    if t_float:
        torch._foreach_mul_(t_float, momentum)
        torch._foreach_add_(t_float, s_float, alpha=1.0 - momentum)


def visit_lrs(settings: TrainSettings, total_visits: int, visits_per_round: int = 1) -> list[float]:
    """The lr of every visit from timm's warm-up + cosine scheduler, stepped per visit.

    The warm-up lasts ``warmup_visits + warmup_rounds * visits_per_round`` steps (so Ark's 20
    warm-up epochs are 20 rounds whatever the number of sites)."""
    import torch
    from timm.scheduler import create_scheduler_v2

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.lr)
    warmup = settings.warmup_visits + settings.warmup_rounds * visits_per_round
    warmup = min(warmup, max(total_visits - 1, 0))
    warmup_lr = settings.lr * 0.01 if settings.warmup_lr is None else settings.warmup_lr
    scheduler, _ = create_scheduler_v2(
        dummy, sched="cosine", num_epochs=total_visits, warmup_epochs=warmup,
        warmup_lr=warmup_lr, min_lr=settings.min_lr,
    )
    lrs = []
    for visit in range(total_visits):
        scheduler.step(visit)
        lrs.append(float(dummy.param_groups[0]["lr"]))
    return lrs


def ark_as_run_lr(settings: TrainSettings, epoch: float, rounds: int) -> float:
    """The lr Ark's code sets after ``lr_scheduler.step(epoch)``: timm's ``CosineLRScheduler`` (built by
    ``create_scheduler(args, optimizer)``, Ark_MICCAI2023/engine.py line 101: ``--sched cosine``, ``--epochs``
    = ``rounds``, ``--warmup-epochs`` = ``warmup_rounds`` W, ``--warmup-lr``, ``--min-lr``, no noise, one
    cycle, warm-up not a prefix) evaluated at ``epoch``, which in Ark is the validation loss (engine.py
    line 169). Written out: ``warmup_lr + epoch * (lr - warmup_lr) / W`` for ``epoch < W``, then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * epoch / rounds)) / 2`` for ``epoch < rounds``, then ``min_lr``.
    Checked against timm's scheduler in the tests."""
    warmup_lr = settings.lr * 0.01 if settings.warmup_lr is None else settings.warmup_lr
    warmup = settings.warmup_rounds
    if epoch < warmup:
        return warmup_lr + epoch * (settings.lr - warmup_lr) / warmup
    if epoch < rounds:  # timm: cycle i = epoch // rounds = 0, t_curr = epoch
        return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1.0 + math.cos(math.pi * epoch / rounds))
    return settings.min_lr  # past its one cycle


def ark_as_run_round_lr(settings: TrainSettings, rounds: int, val_losses: dict[int, float], rnd: int) -> float:
    """The lr of round ``rnd`` under ``lr_schedule="ark-as-run"``: before any validation loss timm's
    initial lr (``warmup_lr`` with a warm-up, else ``lr``), then :func:`ark_as_run_lr` at the mean
    validation loss of the last round before ``rnd`` that has one (``val_losses``: round -> loss)."""
    lr = (settings.lr * 0.01 if settings.warmup_lr is None else settings.warmup_lr) if settings.warmup_rounds else settings.lr
    for previous in range(rnd):
        if previous in val_losses:
            lr = ark_as_run_lr(settings, val_losses[previous], rounds)
    return lr


def schedule_values(settings: TrainSettings, step: float, total: int) -> tuple[float, float]:
    """(consistency weight c, teacher momentum) at ``step`` of ``total`` schedule steps: c from its
    own cosine (Ark) or tied to the momentum (Ark+, ``consistency_schedule="momentum"``)."""
    momentum = teacher_momentum(step, total, settings.momentum_teacher)
    if settings.consistency_schedule == "momentum":
        return consistency_from_momentum(momentum), momentum
    return consistency_weight(step, total, settings.max_consistency), momentum
