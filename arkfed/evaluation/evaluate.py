"""``arkfed evaluate``: a trained head on a split, per-class AUC with bootstrap 95% CIs.

The point estimates are the training area's metrics (:func:`arkfed.metrics.score_predictions`),
so numbers match the validation lines of ``metrics.jsonl``. The CIs come from a row bootstrap:
the same resampled rows for every class, so the mean AUC's interval accounts for the classes'
correlation. Test sets in chest X-ray work are often a few hundred images, where a single AUC
without an interval says little.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from arkfed.metrics import Predictions, multiclass_accuracy, score_predictions, scores_from_logits
from arkfed.schema import LabelSchema

if TYPE_CHECKING:
    from arkfed.site import Site


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney statistic (ties count one half); NaN with a single class."""
    from scipy.stats import rankdata

    pos = labels.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_intervals(pred: Predictions, schema: LabelSchema, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of each class AUC, the mean AUC (and accuracy for multiclass)."""
    scores = scores_from_logits(pred.logits, schema.task)
    n = len(scores)
    rng = np.random.default_rng(seed)
    reported = [schema.classes.index(c) for c in schema.reported_classes]
    aucs = np.full((n_boot, schema.num_classes), np.nan)
    accuracy = np.full(n_boot, np.nan)
    for b in range(n_boot):
        rows = rng.integers(0, n, n)
        s, t, m = scores[rows], pred.targets[rows], pred.mask[rows]
        for k in range(schema.num_classes):
            keep = m[:, k] > 0
            aucs[b, k] = rank_auc(t[keep, k] > 0.5, s[keep, k])
        if schema.task == "multiclass":
            accuracy[b] = multiclass_accuracy(pred.logits[rows], t, m)
    with warnings.catch_warnings():  # a replicate where no reported class has both labels
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(aucs[:, reported], axis=1)
    tail = (1 - level) / 2 * 100

    def interval(values: np.ndarray) -> list[float] | None:
        values = values[~np.isnan(values)]
        if len(values) < max(10, n_boot // 10):
            return None
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]

    out = {
        "auc_ci": {c: interval(aucs[:, k]) for k, c in enumerate(schema.classes)},
        "mean_auc_ci": interval(means),
    }
    if schema.task == "multiclass":
        out["accuracy_ci"] = interval(accuracy)
    return out


def evaluate_predictions(pred: Predictions, schema: LabelSchema, n_boot: int = 1000, seed: int = 0) -> dict:
    """Point metrics (loss, per-class AUC, mean AUC, accuracy) plus their bootstrap CIs."""
    result = score_predictions(pred, schema)
    if n_boot > 0:
        result.update(bootstrap_intervals(pred, schema, n_boot, seed))
    return result


def evaluate_source(
    source: str | Path, site: "Site", split: str = "test", ten_crop: bool | None = None, n_boot: int = 1000,
    batch_size: int = 64, device: str = "cpu", seed: int = 0,
) -> dict:
    """Every model of ``source`` (teacher and student of a run) with ``site``'s own head on a split.

    ``ten_crop=None``: ten-crop on the test split when the model's spec asks for it (``--recipe ark``)."""
    from arkfed.evaluation.embeddings import head_predictions
    from arkfed.evaluation.sources import head_for_site, load_models, load_source_heads

    models = load_models(source)
    head = head_for_site(load_source_heads(source), site.name, source)
    if head.schema.classes != site.schema.classes:
        from arkfed.errors import ArkfedError

        raise ArkfedError(f"{source}: head {site.name!r} predicts {list(head.classes)} but the site's schema has {list(site.schema.classes)}")
    table = site.split(split)
    if ten_crop is None:
        ten_crop = split == "test" and all(m.spec.test_ten_crop for m in models.values())
    out = {"source": str(source), "site": site.name, "split": split, "ten_crop": ten_crop, "n_boot": n_boot,
           "reported_classes": list(site.schema.reported_classes), "models": {}}
    for name, model in models.items():
        pred = head_predictions(model, head, table, site.schema, ten_crop=ten_crop, batch_size=batch_size, device=device)
        out["models"][name] = evaluate_predictions(pred, site.schema, n_boot, seed)
    return out
