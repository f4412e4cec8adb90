"""A site's own update under secure aggregation: checked and clipped at the site, before masking.

With ``secure_aggregation`` (parallel mode, federated runs) the coordinator sees only the mean of
the round's student updates (Flower's SecAgg+, :mod:`arkfed.federation.coordinator.secure`), so
its one gate for returned updates (:class:`arkfed.ark.updates.UpdateGuard`: shapes, finite values,
the norm bounds, the direction check) cannot look at a single site's update any more. What can
still be checked moves to the site, which checks its own update before it is masked
(:func:`clipped_update`):

- every floating-point value finite, else :class:`~arkfed.errors.NonFiniteError` (the visit fails
  as ``non_finite_update``, exactly as a plain visit's would);
- the L2 norm (over every floating-point tensor, BatchNorm statistics included, as
  :func:`arkfed.ark.updates.update_norm`) at most the run's ``max_update_norm``: a larger update
  is scaled down onto it (clipped, as DP-SGD and FedAvg-with-clipping do), not refused, so one
  large honest step costs only its length. The mean of clipped updates then moves the student at
  most ``max_update_norm`` (a convex combination), and one site running this code moves it at most
  its weight's share of that. A site that alters its code can put anything into the masked sum:
  the coordinator's check of the unmasked mean (:func:`mean_update`) is then the only bound.

The trade-off against robust aggregation: clipping bounds how far one site can pull the model, but
a site (buggy or hostile) that sends a wrong but finite update within the bound, or a reversed
one, is no longer caught, and nothing is "the median": the coordinate-wise median, trimmed mean
and Krum need single updates. Integer buffers (BatchNorm's ``num_batches_tracked``) do not travel:
the coordinator keeps the values it sent.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

from arkfed.errors import NonFiniteError

if TYPE_CHECKING:
    from torch import Tensor


def float_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The tensors that travel in a secure aggregation, in ``state_dict`` order: the floating-point ones."""
    return [key for key, value in state.items() if value.dtype.is_floating_point]


def clipped_update(sent: Mapping[str, Tensor], trained: Mapping[str, Tensor], max_norm: float,
                   site: str | None = None) -> tuple[dict[str, Tensor], float]:
    """(``trained - sent`` over the floating-point tensors, scaled down to L2 norm ``max_norm`` when
    longer; its norm before clipping). Raises :class:`NonFiniteError` for a NaN/Inf anywhere in it."""
    import torch

    if not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"the clipping bound must be a positive number, got {max_norm!r}")
    update = {key: trained[key].detach().to(torch.float64) - sent[key].detach().to(torch.float64) for key in float_keys(sent)}
    bad = [key for key, value in update.items() if not bool(torch.isfinite(value).all())]
    if bad:
        raise NonFiniteError(f"the update to be masked has non-finite values in {len(bad)} tensor(s), first {bad[0]!r}",
                             site=site, category="non_finite_update")
    norm = math.sqrt(sum(float(value.pow(2).sum()) for value in update.values()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {key: (value * scale).to(torch.float32) for key, value in update.items()}, norm


def apply_update(sent: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``sent`` moved by ``update`` (floating-point tensors; the others stay as sent)."""
    out = {}
    for key, value in sent.items():
        if key in update:
            out[key] = (value.double() + update[key].double().reshape(value.shape)).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


NORM_SLACK = 1.05
"""The secure mean may exceed the clipping bound by this factor: the quantisation's rounding (see
:func:`arkfed.federation.coordinator.secure.quantisation_tolerance`), never a site's doing."""


def mean_update(sent: Mapping[str, Tensor], arrays, max_norm: float) -> tuple[dict[str, Tensor], float]:
    """The unmasked mean update (``arrays`` in :func:`float_keys` order) as tensors shaped like
    ``sent``, and its norm; :class:`ValueError` when it cannot be the mean of clipped updates of
    this model (count, sizes, a NaN/Inf, a norm above ``max_norm`` x :data:`NORM_SLACK`)."""
    import torch

    keys = float_keys(sent)
    if len(arrays) != len(keys):
        raise ValueError(f"{len(arrays)} arrays for the model's {len(keys)} floating-point tensors")
    update = {}
    for key, array in zip(keys, arrays):
        value = torch.as_tensor(array, dtype=torch.float64)
        if value.numel() != sent[key].numel():
            raise ValueError(f"tensor {key!r} has {value.numel()} values, the model has {sent[key].numel()}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {key!r} has non-finite values")
        update[key] = value.reshape(sent[key].shape)
    norm = math.sqrt(sum(float(value.pow(2).sum()) for value in update.values()))
    if norm > max_norm * NORM_SLACK:
        raise ValueError(f"its norm {norm:.4g} exceeds the sites' clipping bound {max_norm:g}")
    return update, norm


def check_secure_reply(result, plan, examples: int | None) -> str | None:
    """What the coordinator can still check of one secure visit (its update stays masked): the
    reported metrics (:func:`arkfed.ark.updates.check_visit_metrics`) and the examples it claims,
    which weight the mean (positive, at most what its declared training split allows)."""
    from arkfed.ark.updates import check_visit_metrics

    count = result.num_examples
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0 or (examples is not None and count > examples):
        return f"num_examples {count!r} is not within 1..{examples}"
    return check_visit_metrics(result, plan)
