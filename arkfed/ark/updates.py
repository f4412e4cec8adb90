"""Model updates checked before anyone uses them: at the site before it replies, at the coordinator
before a returned model touches the student, the teacher or the checkpoint.

A site is trusted with its own data, not with the federation's model: a bug, a bad learning rate
or a hostile site can return NaN weights, tensors of another shape, or claim a million examples
to dominate a parallel-mode average. :func:`check_update` says what is wrong with a returned
state (one line) or None; the caller skips that visit and carries on. A finished visit, local or
decoded from a Flower reply, is one :class:`VisitReply`; the Ark loop passes every one through
:func:`check_reply` (the one gate) before it is used. No Flower here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from arkfed.errors import ArkfedError

if TYPE_CHECKING:
    from torch import Tensor
    from torch.nn import Module

    from arkfed.ark.tasks import SiteHeads
    from arkfed.ark.visit import VisitResult
    from arkfed.config import TrainSettings


class NonFiniteError(ArkfedError):
    """A loss or a weight became NaN/Inf; ``category`` is what the site sends (never the values)."""

    def __init__(self, message: str, *, site: str | None = None, category: str = "non_finite_update"):
        super().__init__(message, site=site)
        self.category = category


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
                max_norm: float | None = None) -> str | None:
    """The one gate for a returned visit, local or remote: why ``reply`` must not be used, or None.

    The returned student (and teacher, when one came back) pass :func:`check_update` against the
    states that were sent (``student``, ``teacher``) with ``split_size`` the bound from the site's
    declared training split (:func:`max_examples`); ``max_norm`` bounds the student only.
    """
    checks = [("student", student, reply.student, max_norm)]
    if reply.teacher is not None:
        checks.append(("teacher", teacher, reply.teacher, None))
    for name, sent, state, norm in checks:
        reason = check_update(sent, state, reply.result.num_examples, split_size, norm)
        if reason is not None:
            return f"returned {name}: {reason}"
    return None
