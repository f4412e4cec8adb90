"""arkfed evaluate: the site's own head, teacher and student, bootstrap CIs, ten-crop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from arkfed.ark.metrics import Predictions
from arkfed.cli import app
from arkfed.errors import ArkfedError
from arkfed.evaluation.embeddings import ten_crops
from arkfed.evaluation.evaluate import bootstrap_groups, bootstrap_intervals, evaluate_predictions, evaluate_source
from arkfed.evaluation.export import export_model
from arkfed.site.load import load_site
from eval_fixtures import make_run_folder, pretrained_alpha, schemas, write_site


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run whose teacher+head learnt site alpha (the student is random), and alpha's site."""
    root = tmp_path_factory.mktemp("evaluate")
    schema = schemas()["alpha"]
    teacher, head = pretrained_alpha()
    run = make_run_folder(root / "run", teacher=teacher, heads={"alpha": head}, sites={"alpha": schema, "gamma": schemas()["gamma"]})
    site_yaml = write_site(root, "alpha", schema, {"train": 16, "val": 16, "test": 120}, seed=5, rare=(2,))  # few Nodules
    return run, site_yaml, root / "plugins"


def test_patient_bootstrap_resamples_whole_patients_and_widens_the_interval():
    """Ten images per patient that share one score: an image bootstrap pretends there are 10x more
    independent cases than there are; the patient bootstrap (stated in the result) does not."""
    from arkfed.data.tables import make_meta

    schema = schemas()["beta"]
    rng = np.random.default_rng(3)
    patients = 40
    y = np.repeat((rng.random((patients, 2)) < 0.5).astype(np.float32), 10, axis=0)
    logits = np.repeat((rng.normal(0, 1, (patients, 2)) + y[::10]).astype(np.float32), 10, axis=0)
    pred = Predictions(logits, y, np.ones_like(y))

    class Table:
        meta = make_meta(len(y), patient_id=[f"p{i // 10}" for i in range(len(y))])

    groups, unit = bootstrap_groups(Table, len(y))
    assert unit == "patient" and len(np.unique(groups)) == patients
    by_patient = evaluate_predictions(pred, schema, n_boot=300, table=Table, min_positives=1)
    by_image = evaluate_predictions(pred, schema, n_boot=300, table=None, min_positives=1)
    assert by_patient["bootstrap"]["unit"] == "patient" and by_image["bootstrap"]["unit"] == "image"
    width = {k: r["mean_auc_ci"][1] - r["mean_auc_ci"][0] for k, r in (("p", by_patient), ("i", by_image))}
    assert width["p"] > 2 * width["i"]


def test_class_with_too_few_positives_is_reported_but_left_out_of_the_mean():
    schema = schemas()["beta"]
    rng = np.random.default_rng(4)
    y = np.zeros((200, 2), np.float32)
    y[:100, 0] = 1
    y[:3, 1] = 1  # three positives only
    logits = (y * 2 + rng.normal(0, 1, y.shape)).astype(np.float32)
    logits[:3, 1] = -5  # a terrible AUC on the rare class
    result = evaluate_predictions(Predictions(logits, y, np.ones_like(y)), schema, n_boot=100, min_positives=10)
    assert result["too_few_positives"] == ["Cardiomegaly"] and result["positives"]["Cardiomegaly"] == 3
    assert result["mean_auc_min_positives"] == pytest.approx(result["auc"]["Pleural Effusion"])
    assert result["mean_auc"] < result["mean_auc_min_positives"] - 0.3
    assert result["auc_ci"]["Cardiomegaly"] is not None  # still reported, with its interval


def test_bootstrap_interval_contains_estimate_and_shrinks_with_more_data():
    schema = schemas()["beta"]
    rng = np.random.default_rng(1)

    def preds(n):
        y = (rng.random((n, 2)) < 0.4).astype(np.float32)
        return Predictions((y * 1.5 + rng.normal(0, 1, (n, 2))).astype(np.float32), y, np.ones_like(y))

    small, large = preds(60), preds(1200)
    ci_small = bootstrap_intervals(small, schema, n_boot=300)["mean_auc_ci"]
    ci_large = bootstrap_intervals(large, schema, n_boot=300)["mean_auc_ci"]
    point = np.mean([roc_auc_score(large.targets[:, k], large.logits[:, k]) for k in range(2)])
    assert ci_large[0] < point < ci_large[1]
    assert (ci_large[1] - ci_large[0]) < 0.5 * (ci_small[1] - ci_small[0])


def test_ten_crops_are_ten_views_at_input_size():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    crops = ten_crops(x)
    assert len(crops) == 10 and all(c.shape == x.shape for c in crops)
    assert torch.allclose(crops[5], crops[1].flip(-1))  # mirrored top-left = flipped top-right
    assert not torch.allclose(crops[0], crops[3])


def test_evaluate_cli_teacher_and_student_with_cis(trained, tmp_path):
    run, site_yaml, plugins = trained
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(run), "--site", str(site_yaml), "--plugins-dir", str(plugins),
                                      "--bootstrap", "200", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "mean AUC" in result.output and "Nodule (too few positives)" in result.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["models"]) == {"teacher", "student"}
    teacher, student = data["models"]["teacher"], data["models"]["student"]
    assert teacher["mean_auc"] > 0.9  # the trained teacher with its trained head
    assert teacher["mean_auc"] > student["mean_auc"] + 0.2  # the student is an untrained model
    for name in ("Effusion", "Cardiomegaly", "Nodule"):
        low, high = teacher["auc_ci"][name]
        assert low <= teacher["auc"][name] <= high
    assert teacher["num_examples"] == 120
    assert teacher["too_few_positives"] == ["Nodule"] and teacher["mean_auc_min_positives_classes"] == ["Effusion", "Cardiomegaly"]
    assert teacher["bootstrap"]["unit"] == "patient" and teacher["bn_recalibrated"] is True


def test_evaluate_export_equals_run_teacher_and_ten_crop_option(trained, tmp_path):
    run, site_yaml, plugins = trained
    site = load_site(site_yaml, [plugins])
    export_model(run, tmp_path / "export")
    from_run = evaluate_source(run, site, n_boot=0)
    from_export = evaluate_source(tmp_path / "export", site, n_boot=0)
    assert list(from_export["models"]) == ["teacher"]
    assert from_export["models"]["teacher"]["auc"] == pytest.approx(from_run["models"]["teacher"]["auc"])
    crops = evaluate_source(tmp_path / "export", site, n_boot=0, ten_crop=True)
    assert crops["ten_crop"] is True
    assert crops["models"]["teacher"]["mean_auc"] > 0.85
    assert crops["models"]["teacher"]["loss"] != pytest.approx(from_export["models"]["teacher"]["loss"])


def test_evaluate_site_without_head_is_a_clear_error(trained, tmp_path):
    run, _, plugins = trained
    other = write_site(tmp_path, "delta", schemas()["beta"], {"train": 4, "val": 4, "test": 8})
    with pytest.raises(ArkfedError, match=r"no head for site 'delta' \(heads: alpha, gamma\).*linear-probe"):
        evaluate_source(run, load_site(other, [plugins]), n_boot=0)


def test_evaluate_reproduces_the_last_validation_line_of_a_finished_run(tmp_path):
    """One truth: `evaluate --split val` on a run equals its metrics.jsonl (BatchNorm recalibrated
    on the site's training images in both; the teacher with its own RUN/teacher-heads), for
    teacher and student."""
    from arkfed.config import TrainConfig, TrainSettings
    from arkfed.run.folder import read_metrics
    from arkfed.run.local import train_local
    from eval_fixtures import tiny_spec

    schema = schemas()["alpha"]
    site = load_site(write_site(tmp_path, "alpha", schema, {"train": 40, "val": 48, "test": 8}, seed=2), [tmp_path / "plugins"])
    config = TrainConfig(sites=["alpha"], rounds=1, seed=1, model=tiny_spec(),
                         settings=TrainSettings(batch_size=8, max_steps_per_visit=3, lr=3e-3, crop_scale=(0.5, 1.0)))
    train_local(config, tmp_path / "run", sites={"alpha": site})
    last = {r["model"]: r for r in read_metrics(tmp_path / "run") if r.get("kind") == "eval"}
    result = evaluate_source(tmp_path / "run", site, split="val", n_boot=0, batch_size=13, min_positives=1)
    assert (tmp_path / "run" / "teacher-heads" / "alpha.safetensors").is_file()
    assert result["heads"] == {"teacher": "teacher-heads", "student": "heads"} and not result["notes"]
    for model in ("teacher", "student"):
        assert last[model]["bn_recalibrated"] is True and result["models"][model]["bn_recalibrated"] is True
        assert result["models"][model]["mean_auc"] == pytest.approx(last[model]["mean_auc"], abs=1e-6)
        for c, value in last[model]["auc"].items():
            assert result["models"][model]["auc"][c] == pytest.approx(value, abs=1e-6)
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert "- 0.5\n" in recorded and "0.485" not in recorded  # test_resnet normalises with timm's 0.5


def test_teacher_is_scored_with_the_teacher_heads_when_the_run_has_them(trained, tmp_path):
    import shutil

    from arkfed.model.ark import SiteHead
    from arkfed.model.weights import save_head

    run, site_yaml, plugins = trained
    site = load_site(site_yaml, [plugins])
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = evaluate_source(copy, site, n_boot=0)
    assert before["heads"]["teacher"] == "heads" and "student's heads" in before["notes"][0]
    _, trained_head = pretrained_alpha()
    inverted = SiteHead("alpha", trained_head.schema, trained_head.in_features)
    with torch.no_grad():  # the trained head with its sign flipped: AUC becomes 1 - AUC
        inverted.weight.copy_(-trained_head.weight)
        inverted.bias.copy_(-trained_head.bias)
    save_head(copy / "teacher-heads" / "alpha.safetensors", inverted)
    after = evaluate_source(copy, site, n_boot=0)
    assert after["heads"] == {"teacher": "teacher-heads", "student": "heads"} and not after["notes"]
    for c, auc in before["models"]["teacher"]["auc"].items():
        assert after["models"]["teacher"]["auc"][c] == pytest.approx(1 - auc, abs=1e-6)
    assert after["models"]["student"]["auc"] == pytest.approx(before["models"]["student"]["auc"])
