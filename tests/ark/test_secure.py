"""A site's own checks before its update is masked (secure aggregation), and the coordinator's
checks of the unmasked mean; plus the configuration's rules for secure aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from arkfed.ark.secure import NORM_SLACK, apply_update, clipped_update, float_keys, mean_update
from arkfed.config import TrainConfig
from arkfed.errors import NonFiniteError


def _states():
    sent = {"w": torch.zeros(3, 4), "bn.num_batches_tracked": torch.tensor(5), "bn.running_var": torch.ones(4)}
    trained = {"w": torch.full((3, 4), 1.5), "bn.num_batches_tracked": torch.tensor(7), "bn.running_var": torch.full((4,), 2.5)}
    return sent, trained  # update norm: sqrt(12 * 1.5^2 + 4 * 1.5^2) = 6


def test_an_update_within_the_bound_is_kept_as_it_is():
    sent, trained = _states()
    update, norm = clipped_update(sent, trained, max_norm=10.0)
    assert math.isclose(norm, 6.0, rel_tol=1e-9)
    assert list(update) == ["w", "bn.running_var"] == float_keys(sent)  # integer buffers do not travel
    assert torch.equal(update["w"], torch.full((3, 4), 1.5)) and torch.equal(update["bn.running_var"], torch.full((4,), 1.5))


def test_a_longer_update_is_scaled_onto_the_bound_keeping_its_direction():
    sent, trained = _states()
    update, norm = clipped_update(sent, trained, max_norm=1.5)
    assert math.isclose(norm, 6.0, rel_tol=1e-9)  # the norm before clipping, for the site's own log
    clipped = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    assert math.isclose(clipped, 1.5, rel_tol=1e-6)
    assert torch.allclose(update["w"], torch.full((3, 4), 0.375)) and torch.allclose(update["bn.running_var"], torch.full((4,), 0.375))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_update_is_refused_before_masking(bad):
    sent, trained = _states()
    trained["bn.running_var"][2] = bad
    with pytest.raises(NonFiniteError, match="'bn.running_var'") as info:
        clipped_update(sent, trained, max_norm=10.0, site="a")
    assert info.value.category == "non_finite_update"  # what the coordinator is told, as for a plain visit


@pytest.mark.parametrize("bound", [0.0, -1.0, float("inf"), float("nan")])
def test_the_bound_must_be_a_positive_number(bound):
    sent, trained = _states()
    with pytest.raises(ValueError, match="positive"):
        clipped_update(sent, trained, max_norm=bound)


def test_the_mean_moves_the_student_and_leaves_integer_buffers_as_sent():
    sent, trained = _states()
    update, _ = clipped_update(sent, trained, max_norm=10.0)
    arrays = [value.numpy() for value in update.values()]
    mean, norm = mean_update(sent, arrays, max_norm=6.0)
    assert math.isclose(norm, 6.0, rel_tol=1e-6)
    moved = apply_update(sent, mean)
    assert torch.allclose(moved["w"], trained["w"]) and torch.allclose(moved["bn.running_var"], trained["bn.running_var"])
    assert int(moved["bn.num_batches_tracked"]) == 5 and moved["w"].dtype == torch.float32


def test_a_mean_that_clipped_updates_cannot_give_is_refused():
    sent, trained = _states()
    arrays = [value.numpy() for value in clipped_update(sent, trained, max_norm=10.0)[0].values()]
    with pytest.raises(ValueError, match="1 arrays for the model's 2"):
        mean_update(sent, arrays[:1], 10.0)
    with pytest.raises(ValueError, match="has 3 values, the model has 4"):
        mean_update(sent, [arrays[0], arrays[1][:3]], 10.0)
    with pytest.raises(ValueError, match="non-finite"):
        mean_update(sent, [arrays[0] * float("nan"), arrays[1]], 10.0)
    with pytest.raises(ValueError, match="exceeds the sites' clipping bound 5"):
        mean_update(sent, arrays, 5.0)  # norm 6 > 5 x 1.05
    mean_update(sent, arrays, 6.0 / NORM_SLACK)  # the quantisation's slack


def _config(**fields) -> TrainConfig:
    return TrainConfig.model_validate({"sites": ["a", "b"], "secure_aggregation": True, **fields})


def test_secure_aggregation_is_parallel_mode_with_the_mean():
    assert _config(mode="parallel").aggregation == "mean"  # the default (median) gives way
    assert _config(mode="parallel", aggregation="mean", weighting="samples").weighting == "samples"
    with pytest.raises(ValueError, match="needs mode 'parallel': in cyclic mode the coordinator receives each site's whole student"):
        _config(mode="cyclic")
    for rule in ("median", "trimmed-mean", "krum"):
        with pytest.raises(ValueError, match=f"cannot be combined with aggregation '{rule}': robust rules need every single update"):
            _config(mode="parallel", aggregation=rule)
    with pytest.raises(ValueError, match="needs at least two sites"):
        TrainConfig.model_validate({"sites": ["a"], "mode": "parallel", "secure_aggregation": True})
    with pytest.raises(ValueError, match="needs settings.ema 'visit'"):
        _config(mode="parallel", settings={"ema": "iteration"})
