"""Updates checked before use (issue 8 item 5): check_update, the reply parsers on real Flower
records of a real model, the declared-size bound, and the checkpoint that falls back to the
previous one."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from arkfed.ark.updates import NonFiniteError, check_finite, check_reply, check_update, max_examples, update_norm
from arkfed.config import TrainSettings, VisitPlan
from arkfed.data.loaders import visit_draws
from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.model.ark import ArkModel
from arkfed.run.folder import RunFolder, RunState
from arkfed.spec import ModelSpec

SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)
PLAN = VisitPlan(round=1, visit=4, total_visits=6, site="a", consistency=0.1, momentum=0.9, lr=1e-3, seed=5)


@pytest.fixture(scope="module")
def model() -> ArkModel:
    torch.manual_seed(0)
    return ArkModel(SPEC)


def _trained(model: ArkModel) -> dict:
    """A plausible returned state: every float tensor moved a little."""
    return {k: v + 0.01 if v.dtype.is_floating_point else v.clone() for k, v in model.state_dict().items()}


def test_check_update_accepts_a_good_update_and_names_every_kind_of_bad_one(model):
    ref = model.state_dict()
    good = _trained(model)
    assert check_update(ref, good, 16, 32, None) is None
    key = next(k for k, v in ref.items() if v.dtype.is_floating_point and v.ndim == 4)
    assert "missing tensor" in check_update(ref, {k: v for k, v in good.items() if k != key}, 16, 32, None)
    assert "unexpected tensor 'extra'" in check_update(ref, good | {"extra": torch.zeros(1)}, 16, 32, None)
    assert "dtype torch.float64" in check_update(ref, good | {key: good[key].double()}, 16, 32, None)
    assert "shape" in check_update(ref, good | {key: good[key].flatten()}, 16, 32, None)
    for bad in (math.nan, math.inf, -math.inf):
        broken = good[key].clone()
        broken.view(-1)[3] = bad
        assert f"first {key!r}" in check_update(ref, good | {key: broken}, 16, 32, None)
    assert "positive integer" in check_update(ref, good, 0, 32, None)
    assert "positive integer" in check_update(ref, good, True, 32, None)
    assert "exceeds what the site declared (at most 32)" in check_update(ref, good, 33, 32, None)
    assert check_update(ref, good, 10**9, None, None) is None  # no declared size: no bound
    norm = update_norm(ref, good)
    floats = sum(v.numel() for v in ref.values() if v.dtype.is_floating_point)
    assert norm == pytest.approx(0.01 * math.sqrt(floats), rel=1e-4)
    assert check_update(ref, good, 16, 32, norm * 1.01) is None
    assert "update norm" in check_update(ref, good, 16, 32, norm * 0.99)


@pytest.mark.parametrize("n,batch,epochs,max_steps", [(5, 8, 1, None), (13, 8, 1, 2), (100, 16, 3, None), (100, 16, 3, 7), (1, 4, 2, None)])
def test_max_examples_bounds_what_a_visit_really_draws(n, batch, epochs, max_steps):
    settings = TrainSettings(batch_size=batch, local_epochs=epochs, max_steps_per_visit=max_steps)
    drawn = len(visit_draws(n, batch, epochs, seed=0, max_steps=max_steps))
    bound = max_examples(n, settings)
    assert drawn <= bound < drawn + min(batch, n) * epochs


def test_check_finite_raises_a_categorised_error(model):
    check_finite(model.state_dict(), "student")
    state = _trained(model)
    next(v for v in state.values() if v.dtype.is_floating_point).view(-1)[0] = math.nan
    with pytest.raises(NonFiniteError, match="student has non-finite values in 1 tensor") as info:
        check_finite(state, "student")
    assert info.value.category == "non_finite_update"


def _visit_content(model: ArkModel, **metric_changes) -> RecordDict:
    trained = copy.deepcopy(model)
    trained.load_state_dict(_trained(model))
    metrics = {"round": PLAN.round, "visit": PLAN.visit, "loss": 0.5, "task_loss": 0.4, "consistency_loss": 0.1,
               "num_examples": 16, "steps": 2, "seconds": 1.0, "images_per_s": 16.0, "lr": PLAN.lr,
               "consistency": PLAN.consistency, "momentum": PLAN.momentum} | metric_changes
    return RecordDict({m.STUDENT: m.model_record(trained), m.METRICS: MetricRecord({k: v for k, v in metrics.items() if v is not None})})


def _read(content, model, bound=32, norm=None):
    """Decoded (messages), then through the loop's one gate (check_reply), as the coordinator does."""
    reply = m.read_visit_reply(content, PLAN, model, model, False)
    problem = check_reply(reply, model.state_dict(), model.state_dict(), bound, norm)
    if problem is not None:
        raise m.BadReply(problem)
    return reply


def test_a_good_visit_reply_is_parsed_into_the_result_and_the_returned_state(model):
    reply = _read(_visit_content(model), model)
    assert reply.result.site == "a" and reply.result.num_examples == 16 and reply.teacher is None
    expected = _trained(model)
    assert all(torch.equal(reply.student[k], expected[k]) for k in expected)


def test_the_one_gate_checks_the_returned_teacher_too_and_bounds_only_the_students_norm(model):
    reply = _read(_visit_content(model), model)
    ref = model.state_dict()
    norm = update_norm(ref, reply.student)
    assert check_reply(reply, ref, ref, 32, norm * 1.01) is None
    assert check_reply(reply, ref, ref, 32, norm * 0.99).startswith("returned student: update norm")
    reply.teacher = {k: v.clone() for k, v in _trained(_trained_model(model, 100.0)).items()}
    assert check_reply(reply, ref, ref, 32, norm * 1.01) is None  # far from the sent teacher: no norm bound on it
    next(v for v in reply.teacher.values() if v.dtype.is_floating_point).view(-1)[0] = math.nan
    assert check_reply(reply, ref, ref, 32, None).startswith("returned teacher: non-finite values")


def _trained_model(model: ArkModel, shift: float) -> ArkModel:
    moved = copy.deepcopy(model)
    moved.load_state_dict({k: v + shift if v.dtype.is_floating_point else v for k, v in model.state_dict().items()})
    return moved


def _replace(record: ArrayRecord, dtype: str, array: np.ndarray) -> ArrayRecord:
    out = ArrayRecord()
    for key in record:
        out[key] = Array(array) if key == dtype else record[key]
    return out


@pytest.mark.parametrize("fault,reason", [
    ("nan", "returned student: non-finite values"),
    ("extra_value", "returned student arrays do not match the model"),
    ("float64", "holds float64"),
    ("two_dim", "of shape [2,"),
    ("no_student", "visit reply lacks 'student'"),
    ("no_metrics", "visit reply lacks 'metrics'"),
    ("metrics_as_arrays", "'metrics' is a ArrayRecord, expected a MetricRecord"),
    ("site_metric", "metric 'site' is reserved"),
    ("list_metric", "metric 'loss' is a list, not a number"),
    ("missing_metric", "metric 'num_examples': Field required"),
    ("unknown_metric", "unexpected metric 'patient'"),
    ("other_visit", "is for round 1 visit 3, not visit 4"),
    ("nan_loss", "metric 'loss' is not finite"),
    ("absurd_examples", "num_examples 1000000000 exceeds what the site declared (at most 32)"),
])
def test_malformed_visit_replies_are_rejected_with_a_reason(model, fault, reason):
    changes = {"site_metric": {"site": 1.0}, "list_metric": {"loss": [0.5, 0.1]}, "missing_metric": {"num_examples": None},
               "unknown_metric": {"patient": 3.0}, "other_visit": {"visit": 3}, "nan_loss": {"loss": math.nan},
               "absurd_examples": {"num_examples": 10**9}}.get(fault, {})
    content = _visit_content(model, **changes)
    student = content[m.STUDENT]
    flat = student["float32"].numpy().copy()
    if fault == "nan":
        flat[7] = np.nan
        content[m.STUDENT] = _replace(student, "float32", flat)
    elif fault == "extra_value":
        content[m.STUDENT] = _replace(student, "float32", np.append(flat, np.float32(1)))
    elif fault == "float64":
        content[m.STUDENT] = _replace(student, "float32", flat.astype(np.float64))
    elif fault == "two_dim":
        content[m.STUDENT] = _replace(student, "float32", flat.reshape(2, -1))
    elif fault == "no_student":
        del content[m.STUDENT]
    elif fault == "no_metrics":
        del content[m.METRICS]
    elif fault == "metrics_as_arrays":
        content[m.METRICS] = ArrayRecord({"x": Array(np.zeros(1))})
    with pytest.raises(m.BadReply) as info:
        _read(content, model)
    assert reason in str(info.value)


def test_evaluation_and_hello_replies_are_checked(model):
    classes = ("A", "B")
    good = RecordDict({m.STUDENT: MetricRecord({"loss": 0.3, "auc.A": 0.7, "auc.B": math.nan, "mean_auc": 0.7, "num_examples": 8})})
    assert m.read_eval_reply(good, classes, 8)[m.STUDENT]["auc"] == {"A": 0.7, "B": pytest.approx(math.nan, nan_ok=True)}
    for content, reason in (
        (RecordDict({m.STUDENT: MetricRecord({"loss": 0.3, "num_examples": 8, "model": 1.0})}), "metric 'model' is reserved"),
        (RecordDict({m.STUDENT: MetricRecord({"loss": 0.3, "num_examples": 9})}), "not within the split size 8"),
        (RecordDict({m.STUDENT: MetricRecord({"loss": 0.3})}), "num_examples None"),
        (RecordDict({"patients": MetricRecord({"loss": 0.3})}), "unexpected record 'patients'"),
    ):
        with pytest.raises(m.BadReply, match=reason):
            m.read_eval_reply(content, classes, 8)

    from arkfed.data.schema import LabelSchema

    schema = LabelSchema(task="multilabel", classes=classes)
    hello = RecordDict({m.SITE: m.json_record(name="a", schema=schema, member=True),
                        m.METRICS: MetricRecord({"train_size": 12, "val_size": 4})})
    name, member, parsed, sizes = m.read_hello_reply(hello)
    assert (name, member, parsed, sizes) == ("a", True, schema, {"train": 12, "val": 4})
    with pytest.raises(m.BadReply, match="hello reply lacks 'site'"):
        m.read_hello_reply(RecordDict({m.METRICS: MetricRecord({"train_size": 1})}))
    with pytest.raises(m.BadReply, match="'name' must be a string"):
        m.read_hello_reply(RecordDict({m.SITE: m.json_record(name=3, schema=schema, member=True), m.METRICS: MetricRecord({})}))
    with pytest.raises(m.BadReply, match="'train_size' is not a split size"):
        m.read_hello_reply(RecordDict({m.SITE: hello[m.SITE], m.METRICS: MetricRecord({"train_size": -1})}))
    with pytest.raises(m.BadReply, match="hello reply: message lacks 'schema'"):
        m.read_hello_reply(RecordDict({m.SITE: ConfigRecord({"name": '"a"', "member": "true"}), m.METRICS: MetricRecord({})}))


def test_the_previous_checkpoint_is_kept_and_used_when_the_latest_cannot_be_read(tmp_path, model):
    run = RunFolder(tmp_path)
    first = RunState(copy.deepcopy(model), copy.deepcopy(model), {}, visits_done=3)
    run.save_checkpoint(first)
    assert not run.previous_checkpoint_path.exists()
    second = RunState(copy.deepcopy(model), copy.deepcopy(model), {}, visits_done=4)
    second.teacher.load_state_dict(_trained(model))
    run.save_checkpoint(second)
    assert run.previous_checkpoint_path.is_file() and run.load_checkpoint().visits_done == 4
    data = run.checkpoint_path.read_bytes()
    run.checkpoint_path.write_bytes(data[: len(data) // 2])  # cut short (disk full, bad copy)
    with pytest.warns(RuntimeWarning, match="cannot be read .* using the previous checkpoint checkpoint.prev.safetensors"):
        state = run.load_checkpoint()
    assert state.visits_done == 3
    assert all(torch.equal(state.teacher.state_dict()[k], v) for k, v in model.state_dict().items())
    run.checkpoint_path.unlink()  # a crash between the rotation and the new write
    assert run.has_checkpoint()
    with pytest.warns(RuntimeWarning):
        assert run.load_checkpoint().visits_done == 3
    run.previous_checkpoint_path.unlink()
    run.checkpoint_path.write_bytes(data[:100])
    with pytest.raises(ArkfedError, match="checkpoint.safetensors"):  # no previous one: a clear error
        run.load_checkpoint()
