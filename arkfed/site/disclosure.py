"""What of an evaluation may leave a site: metrics rounded, per-class AUCs only when allowed and
only for classes with enough positives and negatives (the site's ``policy:``).

Why: an AUC is the Mann-Whitney count ``U`` over ``p * q`` (positive, negative) pairs, so sent at
full precision ``AUC * p * q`` is an integer only for the right ``p`` (untied scores); trying every
``p`` for a split of ``n = p + q`` pinned the positive count of 8 of 9 classes from one honest
evaluation, and a NaN AUC said a class had no positive at all. So, at the site, before a reply
is built (:func:`released_metrics`):

- every float metric (loss, mean AUC, accuracy, each class's AUC) is rounded to
  ``metric_decimals`` (default 2);
- per-class AUCs leave only with ``per_class_metrics: true`` (default false), and then only for a
  class with at least ``min_class_positives`` positive and ``min_class_negatives`` negative counted
  labels in the evaluated split (default 10 and 10); a class below either, or without an AUC (NaN),
  is left out, never sent as NaN.

With ``min_class_positives * min_class_negatives >= 10 ** metric_decimals`` (the defaults: 10 * 10
= 100) a rounded AUC is consistent with *every* positive count the minimums allow: for each such
``p`` the ``U / (p * q)`` grid is finer than the rounding step. What remains is in SECURITY.md.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arkfed.data.schema import LabelSchema
    from arkfed.data.tables import DatasetTable
    from arkfed.site.policy import SitePolicy

ClassCounts = dict[str, tuple[int, int]]


def class_counts(table: "DatasetTable", schema: "LabelSchema") -> ClassCounts:
    """Per class, (positives, negatives) among the labels an evaluation counts (its mask): what
    :func:`arkfed.ark.metrics.class_auc` ranks. Never sent; the site checks its minimums with it."""
    from arkfed.data.loaders import evaluation_schema
    from arkfed.data.schema import label_targets

    targets, mask = label_targets(table.labels, evaluation_schema(schema))
    counted = mask > 0
    positives = (counted & (targets > 0.5)).sum(axis=0)
    negatives = (counted & (targets <= 0.5)).sum(axis=0)
    return {name: (int(positives[k]), int(negatives[k])) for k, name in enumerate(schema.classes)}


def rounded(value: Any, decimals: int) -> Any:
    """A float metric rounded to ``decimals``; integers, flags and everything else unchanged."""
    if isinstance(value, (bool, numbers.Integral)) or not isinstance(value, numbers.Real):
        return value
    return round(float(value), decimals)


def class_released(auc: float, counts: tuple[int, int], policy: "SitePolicy") -> bool:
    """Whether one class's AUC may leave: it exists and the class has the policy's minimum counts."""
    positives, negatives = counts
    return math.isfinite(auc) and positives >= policy.min_class_positives and negatives >= policy.min_class_negatives


def released_metrics(result: dict, policy: "SitePolicy", counts: ClassCounts) -> dict:
    """One evaluation result (:func:`arkfed.ark.metrics.evaluate_site`) as the site's policy lets it
    leave: float metrics rounded, ``auc`` (per class) only as :func:`class_released` allows; nothing
    with ``send_metrics: none``."""
    out: dict[str, Any] = {}
    if policy.released_metrics == "none":
        return out
    for key, value in result.items():
        if key != "auc":
            out[key] = rounded(value, policy.metric_decimals)
        elif policy.released_metrics == "per_class":
            out[key] = {name: rounded(auc, policy.metric_decimals) for name, auc in value.items()
                        if name in counts and class_released(float(auc), counts[name], policy)}
    return out
