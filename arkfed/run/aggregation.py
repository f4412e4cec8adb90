"""Parallel mode's aggregation rules, computed by Flower's own functions (``flwr.server.strategy.aggregate``).

Every accepted reply of a round (:func:`arkfed.ark.updates.check_reply` let it through) is a
student state that started from the same student; the round's new student is one of:

- ``median`` (the default): the coordinate-wise median (Flower's ``aggregate_median``). One bad
  site among three or more cannot move any coordinate past the honest sites' values, and its
  claimed number of examples plays no part. With two sites it is their plain mean.
- ``trimmed-mean``: the coordinate-wise mean after cutting :data:`TRIM_FRACTION` of the values at
  each end (``aggregate_trimmed_avg``, Flower's FedTrimmedAvg default). ``int(0.2 * n)`` values are
  cut, so nothing is cut below five sites: use ``median`` for smaller federations.
- ``krum``: the one state with the smallest sum of squared distances to its ``n - f - 2`` nearest
  others (``aggregate_krum``, plain Krum), with ``f = (n - 3) // 2`` (the most it tolerates, n > 2f + 2).
- ``mean``: the mean weighted by ``weighting`` (``aggregate``: FedAvg with the sites' numbers of
  examples, or equal weights as in Ark+). Not robust: one site's update moves it without limit.

Floating-point tensors are aggregated in float64 and cast back; integer buffers (BatchNorm's
``num_batches_tracked``) take the largest value, as before.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from arkfed.config import Aggregation

TRIM_FRACTION = 0.2


def krum_malicious(n: int) -> int:
    """Krum's ``f`` for ``n`` states: the most bad ones it tolerates (n > 2f + 2), at least 0."""
    return max(0, (n - 3) // 2)


def aggregate_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rule: Aggregation) -> dict[str, torch.Tensor]:
    """The round's new state from ``states`` by ``rule`` (``weights`` count for ``mean`` only)."""
    from flwr.server.strategy import aggregate as flower

    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state, and at least one state")
    floats = [key for key, value in states[0].items() if value.dtype.is_floating_point]
    results = [([state[key].detach().to(torch.float64).cpu().numpy() for key in floats], weight) for state, weight in zip(states, weights)]
    if rule == "mean":
        if float(sum(weights)) <= 0:
            raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
        arrays = flower.aggregate(results)
    elif rule == "median":
        arrays = flower.aggregate_median(results)
    elif rule == "trimmed-mean":
        arrays = flower.aggregate_trimmed_avg(results, TRIM_FRACTION)
    elif rule == "krum":
        arrays = flower.aggregate_krum(results, krum_malicious(len(states)), 0)
    else:
        raise ValueError(f"unknown aggregation {rule!r}")
    out = dict(zip(floats, (torch.as_tensor(a) for a in arrays)))
    merged = {}
    for key, first in states[0].items():
        if key in out:
            merged[key] = out[key].to(first.dtype).reshape(first.shape)
        else:
            merged[key] = torch.stack([s[key] for s in states]).max(dim=0).values
    return merged
