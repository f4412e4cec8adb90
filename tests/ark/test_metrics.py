"""Per-class AUC over counted entries, NaN for one-valued classes, mean over reported classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from arkfed.ark.metrics import Predictions, class_auc, evaluate_site, mean_auc, multiclass_accuracy, score_predictions
from arkfed.config import TrainSettings
from arkfed.data.schema import LabelSchema
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.spec import ModelSpec
from synthetic import multilabel_schema, synthetic_table


def test_class_auc_uses_counted_entries_only():
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.95])
    targets = np.array([0, 1, 1, 0, 0], dtype=np.float32)
    mask = np.array([1, 1, 1, 1, 0], dtype=np.float32)  # the last one (a confident false positive) is ignored
    assert class_auc(scores, targets, mask) == 1.0
    assert class_auc(scores, targets, np.ones(5)) == pytest.approx(roc_auc_score(targets, scores))
    assert class_auc(scores, targets, np.ones(5)) < 1.0


def test_one_valued_class_has_nan_auc_and_is_left_out_of_the_mean():
    assert np.isnan(class_auc(np.array([0.2, 0.3]), np.array([1.0, 1.0]), np.ones(2)))
    aucs = {"a": 0.8, "b": float("nan"), "c": 0.6}
    assert mean_auc(aucs, ("a", "b", "c")) == pytest.approx(0.7)
    assert mean_auc(aucs, ("a",)) == pytest.approx(0.8)
    assert np.isnan(mean_auc({"b": float("nan")}, ("b",)))


def test_score_predictions_mean_over_eval_classes_and_loss():
    schema = LabelSchema(task="multilabel", classes=("a", "b"), eval_classes=("b",))
    logits = np.array([[2.0, -1.0], [-2.0, 1.0], [0.5, 0.2]], dtype=np.float32)
    targets = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    result = score_predictions(Predictions(logits, targets, np.ones_like(targets)), schema)
    assert result["auc"]["a"] == 1.0
    assert result["mean_auc"] == result["auc"]["b"] == 1.0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(targets))
    assert result["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert "accuracy" not in result


def test_multiclass_accuracy_and_auc():
    schema = LabelSchema(task="multiclass", classes=("x", "y", "z"))
    logits = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]], dtype=np.float32)
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    mask = np.ones_like(targets)
    assert multiclass_accuracy(logits, targets, mask) == 0.75
    mask[3] = 0  # the wrong row is not labelled
    result = score_predictions(Predictions(logits, targets, mask), schema)
    assert result["accuracy"] == 1.0 and result["mean_auc"] == 1.0


def test_evaluate_site_runs_model_and_head_over_the_table():
    torch.manual_seed(0)
    table = synthetic_table(24, ("a", "b", "c"), size=32, uncertain=0.2)
    schema = multilabel_schema()
    model = ArkModel(ModelSpec(model="test_resnet", img_size=32, projector_dim=16))
    head = SiteHead("s", schema, 16)
    result = evaluate_site(model, head, table, schema, TrainSettings(batch_size=10))
    assert set(result["auc"]) == {"a", "b", "c"}
    assert result["num_examples"] == 24
    assert np.isfinite(result["loss"]) and 0.0 <= result["mean_auc"] <= 1.0
    assert model.training  # evaluation restores the training flag


def test_batchnorm_recalibration_uses_the_sites_images_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = ArkModel(ModelSpec(model="test_resnet", img_size=32, projector_dim=16)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bright = synthetic_table(20, ("a", "b", "c"), size=32, seed=4)
    from arkfed.ark.metrics import has_batchnorm, recalibrate_batchnorm
    from arkfed.data.loaders import make_eval_loader

    loader = make_eval_loader(bright, multilabel_schema(), model.spec, batch_size=8)
    seen = []
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    calibrated = recalibrate_batchnorm(model, loader, torch.device("cpu"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    # the calibrated statistics average the layer's input over all calibration batches
    name = next(n for n, m in model.named_modules() if m is first_bn)
    layer = dict(calibrated.named_modules())[name]
    handle = dict(calibrated.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for batch in loader:
            calibrated(batch.images)
    handle.remove()
    batch_means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])  # a cumulative average over batches
    assert torch.allclose(layer.running_mean, batch_means.mean(0), atol=1e-5)
    assert not torch.allclose(layer.running_mean, before[name + ".running_mean"])
    assert has_batchnorm(model)
    head = SiteHead("s", multilabel_schema(), 16)
    table = synthetic_table(12, ("a", "b", "c"), size=32, seed=5)
    settings = TrainSettings(batch_size=8)
    assert evaluate_site(model, head, table, multilabel_schema(), settings, calibration=bright)["bn_recalibrated"]
    assert not evaluate_site(model, head, table, multilabel_schema(), settings)["bn_recalibrated"]


def test_the_one_auc_matches_scikit_learn_with_ties_and_bootstrap_weights():
    from sklearn.metrics import roc_auc_score

    from arkfed.ark.metrics import roc_auc

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(y + rng.normal(0, 1, 200), 1)  # rounding creates ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    weights = rng.integers(0, 3, (5, 200))  # bootstrap multiplicities: row i counted w[b, i] times
    expected = [roc_auc_score(np.repeat(y, w), np.repeat(s, w)) for w in weights]
    assert roc_auc(y, s, weights) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(roc_auc(np.ones(5, bool), s[:5]))
    assert np.isnan(roc_auc(y, s, np.where(y, 0, 1)[None])[0])  # a replicate without positives
