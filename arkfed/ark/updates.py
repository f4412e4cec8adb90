"""Model updates checked before anyone uses them: at the site before it replies, at the coordinator
before a returned model touches the student, the teacher or the checkpoint.

A site is trusted with its own data, not with the federation's model: a bug, a bad learning rate
or a hostile site can return NaN weights, tensors of another shape, an update scaled by 1e6 or
turned around, claim a million examples to dominate a parallel-mode average, or report an AUC of
1e9. :func:`check_update` says what is wrong with a returned state (one line) or None; the caller
skips that visit and carries on. A finished visit, local or decoded from a Flower reply, is one
:class:`VisitReply`; the Ark loop passes every one through :class:`UpdateGuard` (the one gate:
:func:`check_reply` with the adaptive norm bound, and :func:`check_visit_metrics`) before it is
used, and every evaluation result through :func:`check_eval_metrics`. No Flower here.

The adaptive bound (:class:`UpdateGuard`, on by default with ``update_norm_factor`` =
:data:`NORM_FACTOR`): a returned student may be at most ``factor`` times the median norm of the
updates accepted so far from the student it was sent (L2 over every floating-point tensor,
BatchNorm statistics included). Each remembered norm is first scaled up, never down, for a visit
that may take more steps (a larger declared training split) or runs at a higher lr than the one it
came from, so sites of different sizes and the lr warm-up do not trip it; updates shrink as the lr
decays, which only loosens it. The median means one site, which holds at most its share of the
history, cannot raise the bound by itself. Before any update was accepted (the warm-up: the run's
first visit, or a first round where every visit was refused) the bound is :data:`WARMUP_FACTOR`
times the norm of the model itself. With per-iteration EMA the returned teacher is a convex
combination of the sent teacher and the visit's students, so it may move at most the student's
bound plus the distance between the sent student and teacher.

The direction check (``min_update_cosine`` = :data:`MIN_COSINE`), per site: a site's data are the
same at every visit, so its honest updates keep pulling the model the same way (its gradients,
and BatchNorm statistics towards its own images' statistics); an update whose cosine with the mean
direction of that site's accepted updates (the sum of their unit vectors: one model-sized vector
per site, one dot product per visit) is below the threshold is nearly their reverse and is
refused (the demo's honest visits: cosines -0.06 to 0.79 with their site's earlier updates).
Against the mean of all sites' updates a reversal cannot be told from honest visits when the
statistics swing from site to site (the demo's honest visits reach cosine -0.65 there). A
site's first accepted update has nothing to be compared with (only the norm bound applies); the
directions start afresh when a run is resumed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from arkfed.errors import NonFiniteError

if TYPE_CHECKING:
    from torch import Tensor
    from torch.nn import Module

    from arkfed.ark.pair import SiteHeads
    from arkfed.ark.visit import VisitResult
    from arkfed.config import TrainSettings, VisitPlan


def non_finite_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an Inf."""
    import torch

    return [key for key, value in state.items() if value.dtype.is_floating_point and not bool(torch.isfinite(value).all())]


def check_finite(weights: Mapping[str, Tensor] | Module, what: str, site: str | None = None) -> None:
    """Refuse to hand on weights with NaN/Inf (they would poison the teacher and the checkpoint):
    raise :class:`NonFiniteError` naming ``what`` and the first bad tensor of ``weights`` (a
    state dict or a module), never the values."""
    state = weights.state_dict() if hasattr(weights, "state_dict") else weights
    bad = non_finite_keys(state)
    if bad:
        raise NonFiniteError(f"the {what} has non-finite values in {len(bad)} tensor(s), first {bad[0]!r}", site=site)


def max_examples(split_size: int, settings: TrainSettings) -> int:
    """The most examples a visit can see on a training split of ``split_size`` images: whole
    batches over ``local_epochs`` epochs (:func:`arkfed.data.loaders.visit_draws`), capped by max_steps."""
    batch = min(settings.batch_size, split_size)
    bound = split_size * settings.local_epochs
    if settings.max_steps_per_visit is not None:
        bound = min(bound, settings.max_steps_per_visit * batch)
    return max(bound, 0)


def update_norm(reference: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> float:
    """||update - reference|| over the floating-point tensors (float64 accumulation)."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    for key, ref in reference.items():
        if ref.dtype.is_floating_point:
            total += (update[key].to(torch.float64) - ref.to(torch.float64)).pow(2).sum()
    return math.sqrt(float(total))


def check_update(
    reference: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    num_examples: int,
    split_size: int | None,
    max_norm: float | None,
) -> str | None:
    """Why ``update`` (a returned ``state_dict``) must not be used, or None when it may.

    ``reference`` is the state that was sent: keys, dtypes and shapes must match it exactly;
    every floating value must be finite; ``num_examples`` must be positive and at most
    ``split_size`` (the bound the site declared: training-split size x epochs, see
    :func:`max_examples`; None when unknown); with ``max_norm``, ||update - reference|| must not
    exceed it.
    """
    missing = [k for k in reference if k not in update]
    if missing:
        return f"missing tensor {missing[0]!r} ({len(missing)} missing)"
    extra = [k for k in update if k not in reference]
    if extra:
        return f"unexpected tensor {extra[0]!r} ({len(extra)} not in the model)"
    for key, ref in reference.items():
        value = update[key]
        if value.dtype != ref.dtype:
            return f"tensor {key!r} has dtype {value.dtype}, the model has {ref.dtype}"
        if tuple(value.shape) != tuple(ref.shape):
            return f"tensor {key!r} has shape {tuple(value.shape)}, the model has {tuple(ref.shape)}"
    bad = non_finite_keys(update)
    if bad:
        return f"non-finite values in {len(bad)} tensor(s), first {bad[0]!r}"
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        return f"num_examples must be a positive integer, got {num_examples!r}"
    if split_size is not None and num_examples > split_size:
        return f"num_examples {num_examples} exceeds what the site declared (at most {split_size})"
    if max_norm is not None:
        norm = update_norm(reference, update)
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


@dataclass
class VisitReply:
    """A finished visit, from an in-process site or decoded from a Flower reply: its scalar result,
    the returned student (and teacher, with per-iteration EMA), ``extra`` fields for the metrics
    line (e.g. bytes sent and received) and, for in-process sites, the trained heads (kept only if
    the reply is accepted). Unchecked until :func:`check_reply` says it may be used."""

    result: VisitResult
    student: dict[str, Tensor]
    teacher: dict[str, Tensor] | None = None
    extra: dict = field(default_factory=dict)
    heads: SiteHeads | None = None


def check_reply(reply: VisitReply, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], split_size: int | None,
                max_norm: float | None = None, teacher_max_norm: float | None = None) -> str | None:
    """Why the states of ``reply`` must not be used, or None.

    The returned student (and teacher, when one came back) pass :func:`check_update` against the
    states that were sent (``student``, ``teacher``) with ``split_size`` the bound from the site's
    declared training split (:func:`max_examples`); ``max_norm`` bounds the student's update,
    ``teacher_max_norm`` the returned teacher's (:class:`UpdateGuard` sets both).
    """
    checks = [("student", student, reply.student, max_norm)]
    if reply.teacher is not None:
        checks.append(("teacher", teacher, reply.teacher, teacher_max_norm))
    for name, sent, state, norm in checks:
        reason = check_update(sent, state, reply.result.num_examples, split_size, norm)
        if reason is not None:
            return f"returned {name}: {reason}"
    return None


# -- the adaptive bound --------------------------------------------------------------------------
NORM_FACTOR = 4.0
"""Default ``update_norm_factor``: how many times the median accepted update a student may move."""
WARMUP_FACTOR = 10.0
"""Before any update was accepted: how many times its own norm the model may move."""
MIN_COSINE = -0.5
"""Default ``min_update_cosine``: the lowest cosine an update may have with its site's accepted ones."""


def state_norm(state: Mapping[str, Tensor]) -> float:
    """||state|| over the floating-point tensors (float64 accumulation)."""
    total = 0.0
    for value in state.values():
        if value.dtype.is_floating_point:
            total += float(value.double().pow(2).sum())
    return math.sqrt(total)


@dataclass(frozen=True)
class Accepted:
    """What the adaptive bound remembers of an accepted update: its norm, the most examples the
    visit could see (:func:`max_examples` of the declared split) and the visit's planned lr."""

    norm: float
    examples: int
    lr: float


class UpdateGuard:
    """The one gate for every returned visit, local or remote (see the module docstring):
    :func:`check_reply` with the adaptive bound on the student's update (``factor`` x the median
    accepted update norm, :data:`WARMUP_FACTOR` x the model's norm before any; None or 0: off)
    and the absolute ``max_norm`` (None: none), then :func:`check_visit_metrics`, then the
    direction check (an update whose cosine with the mean direction of the same site's accepted
    updates is below ``min_cosine`` is refused; None or -1: off). The caller records each
    accepted update with :meth:`accept`."""

    def __init__(self, factor: float | None = NORM_FACTOR, max_norm: float | None = None, min_cosine: float | None = MIN_COSINE):
        self.factor, self.max_norm = factor or None, max_norm or None
        self.min_cosine = min_cosine if min_cosine is not None and min_cosine > -1 else None
        self.history: list[Accepted] = []
        self.directions: dict[str, dict[str, Tensor]] = {}  # per site: the sum of its accepted updates' unit vectors

    def bound(self, examples: int, lr: float, sent: Mapping[str, Tensor]) -> float | None:
        """The most the student sent as ``sent`` may move at a visit that may see ``examples`` at ``lr``."""
        bounds = [self.max_norm] if self.max_norm else []
        if self.factor:
            if self.history:
                scaled = [h.norm * max(1.0, examples / max(h.examples, 1)) * max(1.0, lr / h.lr if h.lr > 0 else 1.0)
                          for h in self.history]
                bounds.append(self.factor * statistics.median(scaled))
            else:
                bounds.append(WARMUP_FACTOR * state_norm(sent))
        return min(bounds) if bounds else None

    def cosine(self, site: str, sent: Mapping[str, Tensor], returned: Mapping[str, Tensor]) -> float | None:
        """cos(returned - sent, mean direction of ``site``'s accepted updates); None before its first."""
        direction = self.directions.get(site)
        if direction is None:
            return None
        dot = norm = reference = 0.0
        for key, mean in direction.items():
            delta = returned[key].double() - sent[key].double()
            dot += float((delta * mean.double()).sum())
            norm += float(delta.pow(2).sum())
            reference += float(mean.double().pow(2).sum())
        return dot / math.sqrt(norm * reference) if norm > 0 and reference > 0 else None

    def check(self, reply: VisitReply, plan: VisitPlan, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor],
              examples: int | None) -> str | None:
        """Why ``reply`` to ``plan`` must not be used (the student and teacher sent, ``examples`` the
        most examples its declared split allows), or None."""
        bound = self.bound(examples or 0, plan.lr, student)
        teacher_bound = None if bound is None or reply.teacher is None else bound + update_norm(teacher, student)
        problem = check_reply(reply, student, teacher, examples, bound, teacher_bound) or check_visit_metrics(reply.result, plan)
        if problem is None and self.min_cosine is not None:
            cosine = self.cosine(plan.site, student, reply.student)
            if cosine is not None and cosine < self.min_cosine:
                return (f"returned student: its update points against the site's accepted updates (cosine {cosine:.3f} "
                        f"with their mean direction, below {self.min_cosine:g})")
        return problem

    def accept(self, reply: VisitReply, plan: VisitPlan, student: Mapping[str, Tensor], examples: int | None) -> float:
        """Remember an accepted update (``student``: the state sent); returns its norm."""
        norm = update_norm(student, reply.student)
        self.remember(Accepted(norm, examples or 0, plan.lr))
        if self.min_cosine is not None and norm > 0:
            unit = {k: ((reply.student[k].double() - v.double()) / norm).float() for k, v in student.items() if v.dtype.is_floating_point}
            old = self.directions.get(plan.site)
            self.directions[plan.site] = unit if old is None else {k: old[k] + unit[k] for k in unit}
        return norm

    def remember(self, accepted: Accepted) -> None:
        self.history.append(accepted)


# -- reported metrics ------------------------------------------------------------------------------
def _out_of_range(value, low: float, high: float | None = None, undefined: bool = False) -> bool:
    """True unless ``value`` is a number in [low, high] (or, with ``undefined``, None or NaN)."""
    if undefined and (value is None or (isinstance(value, float) and math.isnan(value))):
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return True
    return value < low or (high is not None and value > high)


def _eval_metric_problem(key: str, value) -> str | None:
    if key == "auc":
        items = dict(value) if isinstance(value, Mapping) else {"?": value}
        bad = [name for name, auc in items.items() if _out_of_range(auc, 0.0, 1.0, undefined=True)]
        return f"AUC of {bad[0]!r} is {items[bad[0]]!r}, outside [0, 1]" if bad else None
    if key in ("mean_auc", "accuracy"):
        return f"{key} {value!r} is outside [0, 1]" if _out_of_range(value, 0.0, 1.0, undefined=True) else None
    if key == "loss":
        return f"loss {value!r} is not a finite number >= 0" if _out_of_range(value, 0.0) else None
    if key == "num_examples":
        return f"num_examples {value!r} is not an integer >= 0" if _out_of_range(value, 0) or not isinstance(value, int) else None
    if isinstance(value, (bool, str)):
        return None
    return f"metric {key!r} is {value!r}, not a finite number" if _out_of_range(value, -math.inf) else None


def check_eval_metrics(result: Mapping) -> str | None:
    """Why one model's evaluation result must not be recorded, or None: the loss is a finite number
    >= 0, AUCs and accuracy are in [0, 1] (or undefined: None or NaN, e.g. a class with one label),
    ``num_examples`` is an integer >= 0 and any other number is finite."""
    for key, value in result.items():
        problem = _eval_metric_problem(key, value)
        if problem is not None:
            return problem
    return None


def check_visit_metrics(result: VisitResult, plan: VisitPlan) -> str | None:
    """Why a visit's scalar result must not be recorded, or None: losses finite and >= 0, steps,
    seconds and speed >= 0, and the lr, consistency weight and momentum those of ``plan``."""
    for key in ("loss", "task_loss", "consistency_loss", "seconds", "images_per_s", "steps"):
        value = getattr(result, key)
        if _out_of_range(value, 0.0):
            return f"metric {key!r} is {value!r}, not a finite number >= 0"
    for key in ("lr", "consistency", "momentum"):
        value, planned = getattr(result, key), getattr(plan, key)
        if _out_of_range(value, -math.inf) or not math.isclose(value, planned, rel_tol=1e-6, abs_tol=1e-12):
            return f"metric {key!r} is {value!r}, the plan says {planned!r}"
    for key in ("epsilon_spent", "epsilon_budget", "noise_multiplier"):  # DP visits only (None otherwise)
        value = getattr(result, key)
        if value is not None and _out_of_range(value, 0.0):
            return f"metric {key!r} is {value!r}, not a finite number >= 0"
    return None
