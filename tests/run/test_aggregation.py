"""Parallel mode's aggregation rules (issue 21): each is Flower's own function, on real model states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy import aggregate as flower

from arkfed.model.ark import ArkModel
from arkfed.run.aggregation import TRIM_FRACTION, aggregate_states, krum_malicious
from arkfed.spec import ModelSpec

SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)


@pytest.fixture(scope="module")
def states() -> list[dict[str, torch.Tensor]]:
    """Five sites' returned students: the same student, each moved by its own small update."""
    torch.manual_seed(0)
    base = ArkModel(SPEC).state_dict()
    out = []
    for i in range(5):
        gen = torch.Generator().manual_seed(i)
        moved = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.dtype.is_floating_point else v + i for k, v in base.items()}
        out.append(moved)
    return out


def _flower(states, weights, rule) -> list[np.ndarray]:
    floats = [k for k, v in states[0].items() if v.dtype.is_floating_point]
    results = [([s[k].double().numpy() for k in floats], w) for s, w in zip(states, weights)]
    if rule == "mean":
        return flower.aggregate(results)
    if rule == "median":
        return flower.aggregate_median(results)
    if rule == "trimmed-mean":
        return flower.aggregate_trimmed_avg(results, TRIM_FRACTION)
    return flower.aggregate_krum(results, krum_malicious(len(states)), 0)


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean", "krum"])
def test_each_rule_is_flowers_function(states, rule):
    weights = [3, 1, 4, 1, 5]
    got = aggregate_states(states, weights, rule)
    expected = _flower(states, weights, rule)
    floats = [k for k, v in states[0].items() if v.dtype.is_floating_point]
    assert len(floats) == len(expected)
    for key, want in zip(floats, expected):
        assert got[key].dtype == states[0][key].dtype and got[key].shape == states[0][key].shape
        assert torch.equal(got[key], torch.as_tensor(want).to(got[key].dtype)), (rule, key)
    ints = [k for k, v in states[0].items() if not v.dtype.is_floating_point]
    assert ints and all(torch.equal(got[k], states[-1][k]) for k in ints)  # integer buffers: the largest, as before


def test_krum_tolerates_the_most_bad_sites_it_can():
    assert [krum_malicious(n) for n in range(1, 9)] == [0, 0, 0, 0, 1, 1, 2, 2]  # n > 2f + 2


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_one_site_scaled_by_a_million_does_not_move_the_robust_rules(states, rule):
    base = states[0]
    bad = {k: v * 1e6 if v.dtype.is_floating_point else v for k, v in states[1].items()}
    got = aggregate_states([states[0], bad, *states[2:]], [1, 10**9, 1, 1, 1], rule)
    honest = [s for i, s in enumerate(states) if i != 1]
    for key, value in got.items():
        if value.dtype.is_floating_point:
            stacked = torch.stack([s[key] for s in honest])
            assert bool((value >= stacked.min(0).values - 1e-6).all() and (value <= stacked.max(0).values + 1e-6).all()), (rule, key)
    mean = aggregate_states([states[0], bad, *states[2:]], [1, 10**9, 1, 1, 1], "mean")
    key = next(k for k, v in base.items() if v.dtype.is_floating_point and v.ndim == 4)
    assert float((mean[key] - base[key]).norm()) > 1e3 * float(base[key].norm())  # the mean is not robust


def test_rules_reject_bad_input(states):
    with pytest.raises(ValueError, match="one weight per state"):
        aggregate_states(states, [1], "median")
    with pytest.raises(ValueError, match="positive"):
        aggregate_states(states[:2], [0, 0], "mean")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_states(states, [1] * 5, "mode")
