"""Robust by default against one bad site (issue 21): the adaptive norm bound, its warm-up, the
direction check, the returned teacher's bound and the range checks on reported metrics."""

from __future__ import annotations

import math

import pytest
import torch

from arkfed.ark.updates import (
    MIN_COSINE,
    NORM_FACTOR,
    WARMUP_FACTOR,
    Accepted,
    UpdateGuard,
    VisitReply,
    check_eval_metrics,
    check_visit_metrics,
    state_norm,
    update_norm,
)
from arkfed.ark.visit import VisitResult
from arkfed.config import TrainConfig, VisitPlan
from arkfed.model.ark import ArkModel
from arkfed.spec import ModelSpec

SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)


def plan(visit: int = 3, lr: float = 1e-3) -> VisitPlan:
    return VisitPlan(round=0, visit=visit, total_visits=9, site="a", consistency=0.1, momentum=0.9, lr=lr, seed=1)


def result(p: VisitPlan, **changes) -> VisitResult:
    values = dict(site=p.site, round=p.round, visit=p.visit, loss=0.5, task_loss=0.4, consistency_loss=0.1, num_examples=8,
                  steps=1, seconds=1.0, images_per_s=8.0, lr=p.lr, consistency=p.consistency, momentum=p.momentum)
    return VisitResult(**(values | changes))


@pytest.fixture(scope="module")
def sent() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return ArkModel(SPEC).state_dict()


@pytest.fixture(scope="module")
def direction(sent) -> dict[str, torch.Tensor]:
    """A fixed unit-norm update direction over the floating-point tensors."""
    gen = torch.Generator().manual_seed(1)
    raw = {k: torch.randn(v.shape, generator=gen) for k, v in sent.items() if v.dtype.is_floating_point}
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in raw.values()))
    return {k: t / norm for k, t in raw.items()}


def moved(sent, direction, scale: float) -> dict[str, torch.Tensor]:
    return {k: v + scale * direction[k] if k in direction else v.clone() for k, v in sent.items()}


def reply(sent, direction, scale: float, p: VisitPlan, teacher=None, **changes) -> VisitReply:
    return VisitReply(result(p, **changes), moved(sent, direction, scale), teacher)


def test_the_defaults_are_documented_constants():
    config = TrainConfig(sites=["a"])
    assert (config.update_norm_factor, config.min_update_cosine, config.aggregation) == (NORM_FACTOR, MIN_COSINE, "median")
    assert (NORM_FACTOR, WARMUP_FACTOR, MIN_COSINE) == (4.0, 10.0, -0.5)


def test_warm_up_bounds_the_first_update_by_the_models_own_norm(sent, direction):
    guard = UpdateGuard()
    p = plan(visit=0)
    model_norm = state_norm(sent)
    assert guard.bound(8, p.lr, sent) == pytest.approx(WARMUP_FACTOR * model_norm)
    assert guard.check(reply(sent, direction, 2.5 * model_norm, p), p, sent, sent, 8) is None  # the demo's first visit: 2.5x
    scaled = VisitReply(result(p), {k: v * 1e6 if v.dtype.is_floating_point else v for k, v in sent.items()})
    assert "update norm" in guard.check(scaled, p, sent, sent, 8) and "exceeds the bound" in guard.check(scaled, p, sent, sent, 8)
    assert UpdateGuard(factor=0).bound(8, p.lr, sent) is None  # off: no bound at all
    assert UpdateGuard(factor=0, max_norm=5.0).bound(8, p.lr, sent) == 5.0  # only the absolute one


def test_the_bound_is_the_factor_times_the_median_accepted_norm(sent, direction):
    guard = UpdateGuard()
    for norm in (2.0, 3.0, 100.0):  # one huge accepted update cannot raise the median
        guard.remember(Accepted(norm, 8, 1e-3))
    p = plan()
    assert guard.bound(8, p.lr, sent) == pytest.approx(NORM_FACTOR * 3.0)
    assert guard.check(reply(sent, direction, 11.9, p), p, sent, sent, 8) is None
    assert guard.check(reply(sent, direction, 12.1, p), p, sent, sent, 8).startswith("returned student: update norm 12.1 exceeds")
    assert UpdateGuard(max_norm=5.0).bound(8, p.lr, sent) == 5.0  # with history or not, the absolute bound also holds
    guard.max_norm = 5.0
    assert guard.bound(8, p.lr, sent) == 5.0


def test_the_bound_grows_for_visits_with_more_examples_or_a_higher_lr_and_never_shrinks(sent):
    guard = UpdateGuard()
    guard.remember(Accepted(2.0, 8, 1e-3))
    base = NORM_FACTOR * 2.0
    assert guard.bound(8, 1e-3, sent) == pytest.approx(base)
    assert guard.bound(32, 1e-3, sent) == pytest.approx(4 * base)  # four times the examples (a larger site)
    assert guard.bound(8, 3e-3, sent) == pytest.approx(3 * base)  # lr warm-up
    assert guard.bound(2, 1e-4, sent) == pytest.approx(base)  # a smaller site, a decayed lr: not tighter


def test_an_update_pointing_against_its_sites_accepted_ones_is_refused(sent, direction):
    guard = UpdateGuard()
    p = plan()  # site "a"
    for visit in range(3):
        honest = reply(sent, direction, 2.0, plan(visit))
        assert guard.check(honest, plan(visit), sent, sent, 8) is None
        assert guard.accept(honest, plan(visit), sent, 8) == pytest.approx(2.0)
    assert guard.cosine("a", sent, moved(sent, direction, 1.0)) == pytest.approx(1.0)
    flipped = reply(sent, direction, -2.4 * 2.0, p)  # reversed x 2.4: within the norm bound (8), caught by direction
    assert update_norm(sent, flipped.student) < guard.bound(8, p.lr, sent)
    problem = guard.check(flipped, p, sent, sent, 8)
    assert problem.startswith("returned student: its update points against the site's accepted updates (cosine -1.000")
    orthogonal = {k: v.roll(1, 0) if v.ndim else v for k, v in direction.items()}  # unrelated to the accepted direction
    assert abs(guard.cosine("a", sent, moved(sent, orthogonal, 1.0))) < 0.1
    assert guard.check(reply(sent, orthogonal, 2.0, p), p, sent, sent, 8) is None
    other = plan().model_copy(update={"site": "b"})  # another site: compared with its own updates only (none yet)
    assert guard.cosine("b", sent, flipped.student) is None
    assert guard.check(VisitReply(result(other), flipped.student), other, sent, sent, 8) is None
    guard.accept(VisitReply(result(other), flipped.student), other, sent, 8)
    assert guard.cosine("b", sent, flipped.student) == pytest.approx(1.0) and guard.cosine("a", sent, flipped.student) < -0.99
    assert UpdateGuard(min_cosine=-1).min_cosine is None  # off


def test_the_returned_teacher_may_move_at_most_the_students_bound_plus_the_student_teacher_gap(sent, direction):
    guard = UpdateGuard()
    guard.remember(Accepted(2.0, 8, 1e-3))
    p = plan()
    teacher = moved(sent, direction, 3.0)  # the teacher sent, 3 away from the student sent
    bound = guard.bound(8, p.lr, sent)  # 8
    near = moved(teacher, direction, bound + 3.0 - 0.1)
    far = moved(teacher, direction, bound + 3.0 + 0.1)
    assert guard.check(reply(sent, direction, 1.0, p, teacher=near), p, sent, teacher, 8) is None
    assert guard.check(reply(sent, direction, 1.0, p, teacher=far), p, sent, teacher, 8).startswith("returned teacher: update norm")
    scaled = {k: v * 1e6 if v.dtype.is_floating_point else v for k, v in teacher.items()}
    assert guard.check(reply(sent, direction, 1.0, p, teacher=scaled), p, sent, teacher, 8).startswith("returned teacher")


def test_reported_visit_metrics_must_be_in_range_and_match_the_plan():
    p = plan()
    assert check_visit_metrics(result(p), p) is None
    for changes, reason in (({"loss": -5.0}, "'loss' is -5.0"), ({"task_loss": math.inf}, "'task_loss' is inf"),
                            ({"consistency_loss": math.nan}, "'consistency_loss' is nan"), ({"seconds": -1.0}, "'seconds'"),
                            ({"images_per_s": -3.0}, "'images_per_s'"), ({"steps": -1}, "'steps'"),
                            ({"lr": 1e9}, "'lr' is 1000000000.0, the plan says 0.001"), ({"momentum": 0.5}, "'momentum'")):
        assert reason in check_visit_metrics(result(p, **changes), p), changes


def test_reported_evaluation_metrics_must_be_in_their_valid_range():
    good = {"loss": 0.3, "mean_auc": 0.7, "auc": {"A": 0.7, "B": math.nan, "C": None}, "num_examples": 8, "bn_recalibrated": True}
    assert check_eval_metrics(good) is None
    assert check_eval_metrics(good | {"mean_auc": math.nan, "accuracy": 1.0}) is None  # undefined: no class with both labels
    for changes, reason in (({"mean_auc": 1e9}, "mean_auc 1000000000.0 is outside [0, 1]"), ({"loss": -5.0}, "loss -5.0 is not"),
                            ({"loss": math.inf}, "loss inf"), ({"loss": math.nan}, "loss nan"),
                            ({"auc": {"A": 1.5}}, "AUC of 'A' is 1.5, outside [0, 1]"), ({"auc": {"A": -0.1}}, "AUC of 'A'"),
                            ({"accuracy": 2.0}, "accuracy 2.0"), ({"num_examples": -1}, "num_examples -1"),
                            ({"num_examples": 2.5}, "num_examples 2.5"), ({"speed": math.inf}, "metric 'speed' is inf")):
        assert reason in check_eval_metrics(good | changes), changes
