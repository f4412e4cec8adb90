"""The benchmark's statistics: per-seed paired differences, a 95% t-interval and a paired t-test.

Every arm of a seed shares that seed's initialisation, data order, few-shot draws and fine-tuning
seed, so arms are compared *paired by seed*: the spread of the per-seed difference is the noise
that matters, not the spread of each arm on its own. With n seeds the interval uses Student's t
with n - 1 degrees of freedom; the test is scipy's two-sided paired t-test (``ttest_rel``), the
same hypothesis (mean difference 0) as the interval. Fewer than 2 seeds give NaN, never a claim.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

TEST_NAME = "two-sided paired t-test over seeds (scipy.stats.ttest_rel)"


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def mean_ci(values: Sequence[float]) -> dict:
    """Mean, sd and 95% t-interval of the mean of ``values`` (NaN entries dropped)."""
    from scipy.stats import t

    x = _finite(values)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "sd": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "sd": float("nan"), "ci95": [float("nan")] * 2, "n": 1}
    sd = float(x.std(ddof=1))
    half = float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "n": n}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """The per-seed differences ``a - b``: mean, 95% CI, paired t-test p-value, and whether the
    interval excludes 0 ("resolved"). Pairs where either side is NaN are dropped together."""
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
    return {**diff, "p": p, "test": TEST_NAME, "resolved": resolved}
