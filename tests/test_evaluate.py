"""arkfed evaluate: the site's own head, teacher and student, bootstrap CIs, ten-crop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.errors import ArkfedError
from arkfed.evaluation.embeddings import ten_crops
from arkfed.evaluation.evaluate import bootstrap_intervals, evaluate_source, rank_auc
from arkfed.evaluation.export import export_model
from arkfed.metrics import Predictions
from arkfed.site import load_site
from eval_fixtures import make_run_folder, pretrained_alpha, schemas, write_site


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run whose teacher+head learnt site alpha (the student is random), and alpha's site."""
    root = tmp_path_factory.mktemp("evaluate")
    schema = schemas()["alpha"]
    teacher, head = pretrained_alpha()
    run = make_run_folder(root / "run", teacher=teacher, heads={"alpha": head}, sites={"alpha": schema, "gamma": schemas()["gamma"]})
    site_yaml = write_site(root, "alpha", schema, {"train": 16, "val": 16, "test": 120}, seed=5)
    return run, site_yaml, root / "plugins"


def test_rank_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(y + rng.normal(0, 1, 200), 1)  # rounding creates ties
    assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(rank_auc(np.ones(5, bool), s[:5]))


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
    assert "mean AUC" in result.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["models"]) == {"teacher", "student"}
    teacher, student = data["models"]["teacher"], data["models"]["student"]
    assert teacher["mean_auc"] > 0.9  # the trained teacher with its trained head
    assert teacher["mean_auc"] > student["mean_auc"] + 0.2  # the student is an untrained model
    for name in ("Effusion", "Cardiomegaly", "Nodule"):
        low, high = teacher["auc_ci"][name]
        assert low <= teacher["auc"][name] <= high
    assert teacher["num_examples"] == 120


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
