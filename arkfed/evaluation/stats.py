"""The statistics every evaluation table uses: multiple-comparison corrections, intervals over
seeds, and the paired tests of the label-efficiency curves.

Kept in one place so that every command names its test and its correction the same way, and
a reviewer finds them in one file. SciPy only (no statsmodels).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from arkfed.errors import ArkfedError

Correction = Literal["holm", "bh"]
CORRECTION_NAMES = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}
PAIRED_T = "paired t-test over seeds (each seed draws the same training subset for every initialisation)"
WILCOXON = "Wilcoxon signed-rank test over test images (per-image Dice averaged over seeds)"


def adjust_pvalues(pvalues, method: Correction = "holm") -> np.ndarray:
    """Adjusted p-values of a family of tests; NaN entries (tests not run) stay NaN and are not
    counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return out
    q = p[ok]
    if method == "holm":
        m = len(q)
        order = np.argsort(q, kind="mergesort")
        adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
        res = np.empty(m)
        res[order] = adjusted
    elif method == "bh":
        from scipy.stats import false_discovery_control

        res = false_discovery_control(q, method="bh")
    else:
        raise ArkfedError(f"unknown multiple-comparison correction {method!r}: use holm or bh")
    out[ok] = res
    return out


def mean_ci(values, level: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, list[float] | None]:
    """Mean over seeds and its Student-t interval, clipped to the score's range ``bounds`` (AUC
    and Dice live in [0, 1]); None with fewer than two finite values."""
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), None
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None
    half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, [max(bounds[0], mean - half), min(bounds[1], mean + half)]


def paired_t(a, b) -> float:
    """Two-sided paired t-test p-value of ``a`` vs ``b`` (pairs with a NaN dropped); NaN with
    fewer than two pairs or when every difference is the same (no variation over seeds, as for
    a deterministic fit on the whole training split: the seeds then carry no evidence)."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    d = a[ok] - b[ok]
    if np.allclose(d, d[0], rtol=0, atol=1e-12):
        return float("nan")
    return float(ttest_rel(a[ok], b[ok]).pvalue)


def wilcoxon_p(a, b) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; 1.0 when they are identical."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    if np.allclose(a[ok], b[ok]):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(wilcoxon(a[ok], b[ok]).pvalue)
