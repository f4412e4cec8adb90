"""The statistics every evaluation table and the benchmarks use: multiple-comparison
corrections, intervals over seeds, and the paired tests of the label-efficiency curves and of the
benchmark's arms.

Kept in one place so that every command names its test and its correction the same way, and
a reviewer finds them in one file. SciPy only (no statsmodels).

Seeds pair the arms: every arm of a seed shares that seed's initialisation, data order, few-shot
draws and fine-tuning seed, so the spread of the per-seed difference is the noise that matters,
not the spread of each arm on its own. With n seeds an interval uses Student's t with n - 1
degrees of freedom; fewer than 2 seeds give NaN, never a claim.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence

import numpy as np

from arkfed.errors import ArkfedError

Correction = Literal["holm", "bh"]
CORRECTION_NAMES = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}
PAIRED_T = "paired t-test over seeds (each seed draws the same training subset for every initialisation)"
WILCOXON = "Wilcoxon signed-rank test over test images (per-image Dice averaged over seeds)"
PAIRED_DIFFERENCE_TEST = "two-sided paired t-test over seeds (scipy.stats.ttest_rel)"


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


def mean_ci(values: Sequence[float | None], bounds: tuple[float, float] | None = None) -> dict:
    """Mean over seeds, its sd and its Student-t 95% interval: ``{"mean", "sd", "ci95", "n"}``.

    None and non-finite entries are dropped. With fewer than two values ``sd`` and both ends of
    ``ci95`` are NaN: no interval, never a claim. ``bounds`` clips the interval to the score's
    range (AUC and Dice live in [0, 1]); differences are left unclipped (the default)."""
    from scipy.stats import t

    v = np.asarray([np.nan if x is None else x for x in values], dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "sd": float("nan"), "ci95": [float("nan")] * 2, "n": n}
    sd = float(v.std(ddof=1))
    half = float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return {"mean": mean, "sd": sd, "ci95": [low, high], "n": n}


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]) -> dict:
    """The per-seed differences ``a - b`` (the benchmark's arms share each seed's initialisation,
    data order and draws): :func:`mean_ci` of them, the two-sided paired t-test p-value, and
    whether the interval excludes 0 ("resolved"). Pairs where either side is NaN are dropped
    together; identical differences give p = 1 when they are all 0, else p = 0."""
    from scipy.stats import ttest_rel

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    diff = mean_ci([x - y for x, y in pairs])
    p = float("nan")
    if len(pairs) >= 2:
        xs, ys = zip(*pairs)
        if np.ptp(np.subtract(xs, ys)) > 0:
            p = float(ttest_rel(xs, ys).pvalue)
        else:  # identical differences: t is infinite (or undefined when they are all 0)
            p = 1.0 if xs[0] == ys[0] else 0.0
    low, high = diff["ci95"]
    resolved = bool(diff["n"] >= 2 and (low > 0 or high < 0))
    return {**diff, "p": p, "test": PAIRED_DIFFERENCE_TEST, "resolved": resolved}


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


def bootstrap_two_sample(a: np.ndarray, b: np.ndarray, statistic, n_boot: int = 1000, seed: int = 0) -> dict:
    """``statistic(a, b)`` and its percentile-bootstrap 95% interval, ``a`` and ``b`` resampled
    separately (with replacement, their sizes kept): ``{"estimate", "ci95"}``; ``n_boot = 0`` gives
    NaN ends (no interval, never a claim)."""
    a, b = np.asarray(a), np.asarray(b)
    estimate = float(statistic(a, b))
    if n_boot <= 0:
        return {"estimate": estimate, "ci95": [float("nan")] * 2}
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(n_boot)])
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {"estimate": estimate, "ci95": [float(low), float(high)]}
