"""``arkfed bias``: the Ark paper's gender-bias protocol on a site with recorded sex.

Linear probes on the frozen embedding are trained on male-only and on female-only training
images (subsampled to equal size, so neither wins by having more data) and each is tested on the
male and on the female test images. For every finding and every test group the AUC gap between
the probe trained on the same sex and the one trained on the other sex is tested with DeLong's
test for two correlated ROC curves (both probes score the same test images). A model whose
embedding encodes a finding the same way in both sexes shows no significant gaps.

Statistics a reviewer asks for: the 2 x findings DeLong tests are one family, corrected for
multiple comparisons (Holm by default, Benjamini-Hochberg on request; both raw and adjusted
p-values are in results.json) and only adjusted p-values earn a star. Every AUC has a 95%
percentile-bootstrap interval over the test group's patients (images when no patient ids are
recorded). A finding with fewer than ``min_positives`` positives in a test group is reported but
marked "too few positives": its tests are left out of the family, of the stars and of the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arkfed.ark.metrics import roc_auc, scores_from_logits
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable
from arkfed.errors import ArkfedError
from arkfed.evaluation.embeddings import FeatureKind, embed_table
from arkfed.evaluation.evaluate import MIN_POSITIVES, TOO_FEW, bootstrap_groups, bootstrap_weights, percentile_interval
from arkfed.evaluation.linear_probe import fit_probe_logits, subset
from arkfed.evaluation.plots import as_floats, draw_intervals, interval_bounds
from arkfed.evaluation.stats import CORRECTION_NAMES, Correction, adjust_pvalues
from arkfed.io import atomic_write
from arkfed.model.ark import ArkModel

SEXES = ("M", "F")


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[float, float, float]:
    """DeLong's test of two correlated AUCs on the same cases -> (auc_a, auc_b, two-sided p).

    Fast form of Sun & Xu (2014) with mid-ranks; NaNs when one label value is absent.
    """
    from scipy.stats import norm, rankdata

    pos = np.asarray(labels).astype(bool)
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        return float("nan"), float("nan"), float("nan")
    scores = np.stack([scores_a, scores_b]).astype(np.float64)
    x, y = scores[:, pos], scores[:, ~pos]
    tx, ty = rankdata(x, axis=1), rankdata(y, axis=1)
    tz = rankdata(np.concatenate([x, y], axis=1), axis=1)
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.cov(v01) / m + np.cov(v10) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 1e-12:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
    else:
        p = float(2 * norm.sf(abs(diff) / np.sqrt(var)))
    return float(aucs[0]), float(aucs[1]), p


def sex_rows(table: DatasetTable, sex: str) -> np.ndarray:
    return np.flatnonzero(table.meta["sex"].to_numpy() == sex)


def balanced_train_rows(table: DatasetTable, seed: int, balance: bool = True) -> dict[str, np.ndarray]:
    """Training rows per sex; with ``balance`` the larger group is subsampled to the smaller's size."""
    rows = {s: sex_rows(table, s) for s in SEXES}
    for s, r in rows.items():
        if len(r) < 2:
            raise ArkfedError(f"the training split has {len(r)} images with sex {s!r}; the bias protocol needs both sexes recorded")
    if balance:
        size = min(len(r) for r in rows.values())
        rng = np.random.default_rng(seed)
        rows = {s: np.sort(rng.choice(r, size=size, replace=False)) for s, r in rows.items()}
    return rows


@dataclass
class BiasSettings:
    features: FeatureKind = "projector"
    balance: bool = True
    alpha: float = 0.05
    correction: Correction = "holm"
    min_positives: int = MIN_POSITIVES
    n_boot: int = 1000
    c: float = 1.0
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"


def bias_analysis(model: ArkModel, train: DatasetTable, test: DatasetTable, schema: LabelSchema, settings: BiasSettings) -> dict:
    """AUC of each (train sex, test sex) pair per finding, and the same-vs-other-sex gaps with p-values."""
    tr, te = (embed_table(model, t, schema, settings.features, settings.batch_size, settings.device) for t in (train, test))
    train_rows = balanced_train_rows(train, settings.seed, settings.balance)
    test_rows = _test_rows(test)
    scores = {s: scores_from_logits(fit_probe_logits(subset(tr, r), te, schema, settings.c, settings.seed), schema.task)
              for s, r in train_rows.items()}
    groups, unit = bootstrap_groups(test, len(test))
    findings = {}
    for k, name in enumerate(schema.classes):
        entry: dict = {}
        for test_sex, rows in test_rows.items():
            keep = rows[te.mask[rows, k] > 0]
            y = te.targets[keep, k] > 0.5
            entry.update(_gap_test(y, {s: scores[s][keep, k] for s in SEXES}, test_sex, settings.min_positives))
            if settings.n_boot > 0:
                entry.update(_bootstrap_cis(y, {s: scores[s][keep, k] for s in SEXES}, groups[keep], test_sex, settings))
        findings[name] = entry
    tests = _adjust_family(findings, settings)
    return {
        "features": settings.features, "balanced": settings.balance, "alpha": settings.alpha, "test": "DeLong",
        "correction": settings.correction, "correction_name": CORRECTION_NAMES[settings.correction],
        "tests_in_family": len(tests), "min_positives": settings.min_positives,
        "too_few_positives": sorted({n for n, e in findings.items() if any(e[f"too_few_on_{s}"] for s in SEXES)}),
        "bootstrap": {"resamples": settings.n_boot, "unit": unit, "level": 0.95, "method": "percentile"},
        "train_sizes": {s: int(len(r)) for s, r in train_rows.items()},
        "test_sizes": {s: int(len(r)) for s, r in test_rows.items()},
        "mean_auc": _mean_aucs(findings),
        "findings": findings,
    }


def _test_rows(test: DatasetTable) -> dict[str, np.ndarray]:
    """Test rows per sex; both sexes need at least two images."""
    rows = {s: sex_rows(test, s) for s in SEXES}
    for s, r in rows.items():
        if len(r) < 2:
            raise ArkfedError(f"the test split has {len(r)} images with sex {s!r}; the bias protocol needs both sexes recorded")
    return rows


def _gap_test(y: np.ndarray, scores: dict[str, np.ndarray], test_sex: str, min_positives: int) -> dict:
    """One finding on one test sex: the same-sex and other-sex probes' AUCs, their gap and DeLong's p."""
    other = "F" if test_sex == "M" else "M"
    same, cross, p = delong_test(y, scores[test_sex], scores[other])
    return {f"{test_sex}->{test_sex}": same, f"{other}->{test_sex}": cross, f"gap_on_{test_sex}": same - cross, f"p_on_{test_sex}": p,
            f"positives_on_{test_sex}": int(y.sum()), f"too_few_on_{test_sex}": int(y.sum()) < min_positives}


def _bootstrap_cis(y: np.ndarray, scores: dict[str, np.ndarray], groups: np.ndarray, test_sex: str, settings: BiasSettings) -> dict:
    """Percentile-bootstrap 95% CIs of both probes' AUCs on one test sex, resampling ``groups`` (patients or images)."""
    _, local = np.unique(groups, return_inverse=True)
    cis = {}
    for train_sex in SEXES:
        reps = np.concatenate([roc_auc(y, scores[train_sex], w) for w in bootstrap_weights(local, settings.n_boot, settings.seed)])
        cis[f"{train_sex}->{test_sex}_ci"] = percentile_interval(reps, settings.n_boot)
    return cis


def _adjust_family(findings: dict[str, dict], settings: BiasSettings) -> list[tuple[str, str]]:
    """Correct the p-values of every finding and test sex with enough positives together; mark the
    significant gaps. Returns the family of tests."""
    tests = [(name, sex) for name in findings for sex in SEXES if not findings[name][f"too_few_on_{sex}"]]
    adjusted = adjust_pvalues([findings[n][f"p_on_{s}"] for n, s in tests], settings.correction)
    for (name, sex), q in zip(tests, adjusted):
        findings[name][f"p_adjusted_on_{sex}"] = float(q)
    for entry in findings.values():
        for sex in SEXES:
            entry.setdefault(f"p_adjusted_on_{sex}", float("nan"))
            q = entry[f"p_adjusted_on_{sex}"]
            entry[f"significant_on_{sex}"] = bool(np.isfinite(q) and q < settings.alpha)
    return tests


def _mean_aucs(findings: dict[str, dict]) -> dict[str, float]:
    """Mean AUC per (train sex, test sex) over the findings with enough positives and a finite AUC."""
    means = {}
    for a in SEXES:
        for b in SEXES:
            values = [e[f"{a}->{b}"] for e in findings.values() if not e[f"too_few_on_{b}"] and np.isfinite(e[f"{a}->{b}"])]
            means[f"{a}->{b}"] = float(np.mean(values)) if values else float("nan")
    return means


def plot_bias(result: dict, path: Path, title: str = "") -> Path:
    """Grouped bars with 95% CIs, one panel per test sex: per finding, the AUC of the
    male-trained and the female-trained probe; '*' marks a gap significant after the
    multiple-comparison correction; findings with too few positives are drawn pale and labelled.
    Findings the test split cannot score (one label value only) are left out. A CI is drawn from
    its lower to its upper end: a percentile-bootstrap interval may exclude its AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    findings = result["findings"]
    names = [n for n, e in findings.items() if np.isfinite(as_floats(e[f"{a}->{b}"] for a in SEXES for b in SEXES)).any()]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.75 * len(names) + 2), 7.5), sharex=True)
    width = 0.38
    x = np.arange(len(names))
    for ax, test_sex in zip(axes, SEXES):
        for i, train_sex in enumerate(SEXES):
            key = f"{train_sex}->{test_sex}"
            values = as_floats(findings[n][key] for n in names)
            alphas = [0.35 if findings[n][f"too_few_on_{test_sex}"] else 1.0 for n in names]
            bars = ax.bar(x + (i - 0.5) * width, values, width,
                          label=f"trained on {'male' if train_sex == 'M' else 'female'} images", color=("#4477aa", "#cc6677")[i])
            for bar, a in zip(bars, alphas):
                bar.set_alpha(a)
            draw_intervals(ax, x + (i - 0.5) * width, *interval_bounds([findings[n].get(f"{key}_ci") for n in names]))
        for j, n in enumerate(names):
            e = findings[n]
            scored = as_floats([e[f"M->{test_sex}"], e[f"F->{test_sex}"]])
            top = float(np.max(scored[np.isfinite(scored)])) if np.isfinite(scored).any() else 0.5
            if e[f"significant_on_{test_sex}"]:
                ax.text(j, top + 0.08, "*", ha="center", fontsize=16)
            elif e[f"too_few_on_{test_sex}"]:
                ax.text(j, min(top + 0.08, 1.1), f"n+={e[f'positives_on_{test_sex}']}", ha="center", fontsize=7, color="grey")
        ax.set_title(f"tested on {'male' if test_sex == 'M' else 'female'} images", fontsize=10)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0.0, 1.2)
        ax.set_ylabel("AUC (95% CI)")
    axes[1].set_xticks(x, names, rotation=30, ha="right")
    axes[0].legend(loc="upper left", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title or f"Gender bias (linear probes; * DeLong, {result['correction']}-adjusted p < {result['alpha']})", fontsize=11)
    fig.text(0.01, 0.005, f"pale bars: fewer than {result['min_positives']} positives ({TOO_FEW}; not tested, not starred); "
             f"CIs: bootstrap over {result['bootstrap']['unit']}s", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
