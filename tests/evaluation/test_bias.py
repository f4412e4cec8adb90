"""arkfed bias: DeLong's test, and the male/female probe protocol on data with a planted bias."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from arkfed.ark.metrics import roc_auc
from arkfed.cli import app
from arkfed.errors import ArkfedError
from arkfed.evaluation.bias import balanced_train_rows, delong_test
from arkfed.evaluation.stats import adjust_pvalues
from eval_fixtures import make_run_folder, schemas, synthetic_table, write_site


def test_delong_aucs_match_sklearn_and_identical_scores_are_not_different():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    a, b = y + rng.normal(0, 1, 300), y + rng.normal(0, 1.5, 300)
    auc_a, auc_b, p = delong_test(y, a, b)
    assert auc_a == pytest.approx(roc_auc_score(y, a)) and auc_b == pytest.approx(roc_auc_score(y, b))
    assert 0 < p < 1
    assert delong_test(y, a, a)[2] == 1.0
    assert np.isnan(delong_test(np.zeros(10, bool), a[:10], b[:10])[2])


def test_delong_variance_agrees_with_a_paired_bootstrap():
    """The test's z uses DeLong's variance of AUC_a - AUC_b; a bootstrap of the same pairs
    must give about the same spread (the p-values then agree too)."""
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    n = 400
    y = rng.random(n) < 0.4
    common = rng.normal(0, 1, n)
    a, b = 0.9 * y + common + rng.normal(0, 0.6, n), 0.6 * y + common + rng.normal(0, 0.6, n)
    auc_a, auc_b, p = delong_test(y, a, b)
    diffs = []
    for _ in range(1000):
        i = rng.integers(0, n, n)
        if y[i].all() or not y[i].any():
            continue
        diffs.append(roc_auc(y[i], a[i]) - roc_auc(y[i], b[i]))
    sd_delong = abs(auc_a - auc_b) / norm.isf(p / 2)
    assert sd_delong == pytest.approx(np.std(diffs), rel=0.15)


def test_balanced_rows_and_missing_sex_error():
    schema = schemas()["alpha"]
    table = synthetic_table(schema, 101, 0)
    rows = balanced_train_rows(table, seed=0)
    assert len(rows["M"]) == len(rows["F"]) == min((table.meta["sex"] == s).sum() for s in ("M", "F"))
    assert set(table.meta["sex"].iloc[rows["F"]]) == {"F"}
    males = table.subset(np.flatnonzero(table.meta["sex"] == "M"))
    with pytest.raises(ArkfedError, match="sex 'F'"):
        balanced_train_rows(males, seed=0)


def test_holm_and_benjamini_hochberg_adjustments():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    holm = adjust_pvalues(p, "holm")  # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, monotone
    assert holm[[4, 0, 2, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert np.isnan(holm[3])
    bh = adjust_pvalues(p, "bh")  # p * m / rank, monotone from the top: 0.04 for the three largest
    assert bh[[4, 0, 2, 1]] == pytest.approx([0.02, 0.02, 0.04, 0.04])
    with pytest.raises(ArkfedError, match="holm or bh"):
        adjust_pvalues(p, "bonferroni")


def test_bias_cli_finds_the_planted_bias_and_only_it(tmp_path):
    schema = schemas()["alpha"]  # Effusion is drawn dark in women and bright in men; the others alike; Nodule is rare
    run = make_run_folder(tmp_path / "run", sites={"alpha": schema})
    site = write_site(tmp_path, "alpha", schema, {"train": 200, "val": 8, "test": 160}, seed=2, biased=(0,), rare=(2,))
    out = tmp_path / "bias"
    result = CliRunner().invoke(app, ["bias", str(run), "--site", str(site), "--plugins-dir", str(tmp_path / "plugins"),
                                      "--features", "backbone", "--bootstrap", "300", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["train_sizes"]["M"] == data["train_sizes"]["F"]
    effusion = data["findings"]["Effusion"]
    for sex in ("M", "F"):
        assert effusion[f"gap_on_{sex}"] > 0.3 and effusion[f"p_on_{sex}"] < 1e-6 and effusion[f"significant_on_{sex}"], effusion
        # findings drawn alike in both sexes transfer: small gaps (a little spill-over from the
        # shifted Effusion blobs in the other sex's training images is real and allowed)
        assert abs(data["findings"]["Cardiomegaly"][f"gap_on_{sex}"]) < 0.1, data["findings"]["Cardiomegaly"]
        # raw and Holm-adjusted p-values both recorded; the adjusted one is never smaller
        assert effusion[f"p_adjusted_on_{sex}"] >= effusion[f"p_on_{sex}"]
        low, high = effusion[f"{sex}->{sex}_ci"]
        assert low <= effusion[f"{sex}->{sex}"] <= high
        nodule = data["findings"]["Nodule"]  # a handful of positives: reported, marked, never starred
        assert nodule[f"too_few_on_{sex}"] and nodule[f"positives_on_{sex}"] < 10 and not nodule[f"significant_on_{sex}"]
        assert np.isnan(nodule[f"p_adjusted_on_{sex}"] or np.nan)
    assert effusion["M->F"] < 0.7 < effusion["F->F"]
    assert data["correction"] == "holm" and data["tests_in_family"] == 4 and data["too_few_positives"] == ["Nodule"]
    assert data["bootstrap"]["unit"] == "patient"
    assert "Holm" in result.output and "too few positives" in result.output
    png = (out / "bias.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert data["chart"] == "bias.png"
