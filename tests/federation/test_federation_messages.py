"""Records on the wire: packed model arrays, scalar metrics, redaction, parallel-mode plans and averaging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arkfed.config import TrainConfig, TrainSettings
from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.describe import describe_content, redact_paths
from arkfed.federation.protocol import FederationSettings
from arkfed.model.ark import ArkModel
from arkfed.run.loop import weighted_average
from arkfed.run.plan import plan_groups
from arkfed.spec import ModelSpec

SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=8)


def _perturbed_model(seed: int) -> ArkModel:
    torch.manual_seed(seed)
    model = ArkModel(SPEC)
    with torch.no_grad():
        for _, buf in model.named_buffers():
            if buf.dtype.is_floating_point:
                buf.uniform_(0.5, 1.5)  # BatchNorm statistics must travel too
            else:
                buf.fill_(seed + 3)
    return model


def test_model_record_round_trip_is_bit_exact_including_buffers():
    source, target = _perturbed_model(1), _perturbed_model(2)
    record = m.model_record(source)
    assert set(record.keys()) == {"float32", "int64"}  # one flat array per dtype, not one per tensor
    assert sum(a.numpy().size for a in record.values()) == sum(t.numel() for t in source.state_dict().values())
    m.load_model_record(target, record)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def test_model_record_of_another_architecture_is_refused_with_sizes():
    other = ArkModel(SPEC.model_copy(update={"projector_dim": 9}))
    with pytest.raises(ArkfedError, match=r"student arrays do not match the model: values per dtype"):
        m.load_model_record(other, m.model_record(_perturbed_model(1)), "student")


def test_unpack_state_leaves_the_template_untouched():
    template, source = _perturbed_model(1), _perturbed_model(2)
    before = {k: v.clone() for k, v in template.state_dict().items()}
    state = m.unpack_state(template, m.model_record(source))
    assert all(torch.equal(state[k], source.state_dict()[k]) for k in state)
    assert all(torch.equal(before[k], template.state_dict()[k]) for k in before)


def test_eval_metrics_round_trip_keeps_nan_aucs_and_class_order():
    result = {"loss": 0.5, "mean_auc": 0.75, "auc": {"b": 0.75, "a": float("nan")}, "num_examples": 12, "accuracy": 0.5,
              "bn_recalibrated": np.bool_(True)}
    record = m.metrics_record(result)
    assert all(isinstance(v, (int, float)) for v in record.values())
    back = m.eval_result(record, ("b", "a"))
    assert list(back) == list(result)  # same keys, same order as evaluate_site's dict
    assert list(back["auc"]) == ["b", "a"] and math.isnan(back["auc"]["a"]) and back["auc"]["b"] == 0.75
    assert back["num_examples"] == 12 and back["accuracy"] == 0.5 and back["loss"] == 0.5
    assert back["bn_recalibrated"] is True


def test_only_numbers_can_become_metrics():
    with pytest.raises(TypeError, match="only scalars leave a site"):
        m.metrics_record({"loss": 0.1, "file": "/data/nih/images/00001.png"})


def test_error_text_leaving_a_site_has_no_local_paths():
    text = "site 'nih': cannot read image /mnt/pacs/nih/images/000123_001.png: truncated; see C:\\data\\x.csv"
    redacted = redact_paths(text)
    assert "/mnt" not in redacted and "000123" not in redacted and "C:\\" not in redacted
    assert redacted.startswith("site 'nih': cannot read image <local path>")


def test_weighted_average_matches_sample_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = weighted_average([a, b], [30, 10])
    assert torch.allclose(out["w"], torch.tensor([1.5, 3.0]))
    assert out["w"].dtype == torch.float32 and int(out["n"]) == 5


def test_parallel_plans_share_schedule_values_within_a_round():
    config = TrainConfig(sites=["a", "b", "c"], rounds=3, mode="parallel", settings=TrainSettings(lr=0.01, warmup_visits=0))
    rounds = plan_groups(config)
    assert [[p.visit for p in r] for r in rounds] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    for plans in rounds:
        assert len({(p.lr, p.consistency, p.momentum) for p in plans}) == 1
    assert rounds[0][0].consistency == 0.0 and rounds[0][0].momentum == pytest.approx(0.9)
    assert rounds[2][0].consistency > rounds[1][0].consistency > 0
    assert len({p.seed for r in rounds for p in r}) == 9


def test_federation_settings_round_trip(tmp_path):
    settings = FederationSettings(log=["tensorboard"], schemas={"a": {"task": "binary", "classes": ["x"]}})
    settings.write(tmp_path)
    assert FederationSettings.read(tmp_path) == settings
    with pytest.raises(ArkfedError, match="not a federated run folder"):
        FederationSettings.read(tmp_path / "nothing")


def test_describe_content_lists_array_shapes_and_metric_values():
    from flwr.app import MetricRecord, RecordDict

    content = RecordDict({"student": m.model_record(_perturbed_model(1)), "metrics": MetricRecord({"loss": 0.25})})
    described = describe_content(content)
    assert described["student"]["kind"] == "arrays"
    assert set(described["student"]["arrays"]) == {"float32", "int64"}
    assert described["metrics"] == {"kind": "metrics", "values": {"loss": 0.25}}
    assert np.isclose(described["student"]["bytes"], content["student"].count_bytes())


def test_a_site_request_is_decoded_once_and_a_bad_field_is_refused_by_name():
    settings = TrainSettings()
    source = _perturbed_model(1)
    record = m.json_record(run_uid="r1", spec=SPEC, settings=settings, head_from=m.NO_HEAD, schemas={}, pending=1, split="val")
    content = m.request_content(record, **{m.STUDENT: m.model_record(source), m.TEACHER: m.model_record(source)})
    request = m.read_site_request(content, m.EVALUATE)
    assert (request.run_uid, request.split, request.head_from, request.pending, request.plan) == ("r1", "val", m.NO_HEAD, 1.0, None)
    assert request.settings == settings and request.spec == SPEC
    student, teacher = request.models()
    assert torch.equal(next(iter(student.state_dict().values())), next(iter(source.state_dict().values())))
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ArkfedError, match="carries no initial head"):
        request.initial_head(ArkModel(SPEC), "a")
    for key, text, public in (("head_from", '"3"', "invalid_request: head_from: expected int"),
                              ("pending", "true", "invalid_request: pending: expected float"),
                              ("settings", '{"batch_size": 0}', "invalid_request: settings.batch_size: Input should be greater than"),
                              ("run_uid", "{not json", "invalid_request: run_uid: missing or malformed")):
        broken = m.json_record(run_uid="r1", spec=SPEC, settings=settings, head_from=0, schemas={}, pending=1.0, split="val")
        broken[key] = text
        with pytest.raises(m.BadRequest) as info:
            m.read_site_request(m.request_content(broken), m.EVALUATE)
        assert info.value.public.startswith(public)
    with pytest.raises(m.BadRequest, match="lacks 'plan'"):
        m.read_site_request(content, m.VISIT)
