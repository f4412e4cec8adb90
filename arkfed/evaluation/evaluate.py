"""``arkfed evaluate``: a trained head on a split, per-class AUC with bootstrap 95% CIs.

One truth for a model's numbers: the model is scored exactly as training-time evaluation scores
it (:func:`arkfed.ark.metrics.site_predictions`): BatchNorm statistics re-estimated on the first
images of the site's training split, the same eval pipeline, the same metrics. So ``evaluate
--split val`` on a finished run reproduces the last validation lines of ``metrics.jsonl``.
The teacher is scored with the teacher's own heads (``RUN/teacher-heads/``) when the run has
them; otherwise with the student's heads, and the result says so.

The CIs come from a bootstrap over patients when the split records patient ids (all images of a
resampled patient come along, so a patient with many images does not narrow the interval), over
images otherwise; the unit is stated in the result. The same resampled rows serve every class,
so the mean AUC's interval accounts for the classes' correlation.

``mean_auc`` is the one site mean AUC of arkfed (:func:`arkfed.ark.metrics.mean_auc`: every
reported class with both labels in the split), the number ``metrics.jsonl`` holds. Classes with
fewer than ``min_positives`` positive test images are reported and marked "too few positives";
``mean_auc_min_positives`` is the mean over the other classes (``mean_auc_min_positives_classes``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from arkfed.ark.metrics import Predictions, class_auc, mean_auc, score_predictions, scores_from_logits
from arkfed.data.schema import LabelSchema

if TYPE_CHECKING:
    from arkfed.data.tables import DatasetTable
    from arkfed.site.load import Site

MIN_POSITIVES = 10
TOO_FEW = "too few positives"


def bootstrap_groups(table: "DatasetTable | None", n: int) -> tuple[np.ndarray, str]:
    """Row -> resampling unit: the patient when the table records patient ids, else the image."""
    if table is not None and "patient_id" in table.meta:
        ids = table.meta["patient_id"]
        if ids.notna().all() and ids.astype(str).str.len().gt(0).all():
            return np.unique(ids.astype(str).to_numpy(), return_inverse=True)[1], "patient"
    return np.arange(n), "image"


def bootstrap_weights(groups: np.ndarray, n_boot: int, seed: int, chunk: int = 200):
    """Yield B x N multiplicity matrices (``n_boot`` replicates in all, ``chunk`` at a time):
    the units (patients or images) are drawn with replacement and each row counts as often as
    its unit was drawn. Weights, not index lists, so :func:`arkfed.ark.metrics.roc_auc` scores all
    replicates of a chunk at once."""
    rng = np.random.default_rng(seed)
    units = int(groups.max()) + 1 if len(groups) else 0
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = rng.multinomial(units, np.full(units, 1.0 / units), size=b) if units else np.zeros((b, 0))
        yield counts[:, groups].astype(np.float64)
        done += b


def percentile_interval(values: np.ndarray, n_boot: int, level: float = 0.95) -> list[float] | None:
    """Percentile interval of the finite replicates; None when too few replicates were defined."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < max(10, n_boot // 10):
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def positives(pred: Predictions, schema: LabelSchema) -> dict[str, int]:
    """Counted positive test images per class."""
    return {c: int(((pred.mask[:, k] > 0) & (pred.targets[:, k] > 0.5)).sum()) for k, c in enumerate(schema.classes)}


def _replicate_means(aucs: np.ndarray, schema: LabelSchema, classes: list[str], n_boot: int) -> np.ndarray:
    """Each replicate's mean AUC over ``classes`` (those it can score, as :func:`mean_auc` does)."""
    in_mean = [schema.classes.index(c) for c in classes]
    with warnings.catch_warnings():  # a replicate where no class of the mean has both labels
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(aucs[:, in_mean], axis=1) if in_mean else np.full(n_boot, np.nan)


def bootstrap_intervals(pred: Predictions, schema: LabelSchema, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                        groups: np.ndarray | None = None, min_positives_classes: list[str] | None = None) -> dict:
    """Percentile intervals of each class AUC, of the mean AUC (``mean_auc_ci``), with
    ``min_positives_classes`` of the mean over those (``mean_auc_min_positives_ci``) and, for
    multiclass, of the accuracy."""
    scores = scores_from_logits(pred.logits, schema.task)
    n = len(scores)
    groups = np.arange(n) if groups is None else groups
    aucs, accuracy = [], []
    correct = (pred.logits.argmax(1) == pred.targets.argmax(1)).astype(np.float64) if schema.task == "multiclass" else None
    for w in bootstrap_weights(groups, n_boot, seed):
        aucs.append(np.stack([class_auc(scores[:, k], pred.targets[:, k], pred.mask[:, k], w) for k in range(schema.num_classes)], axis=1))
        if correct is not None:
            counted = w * (pred.mask[:, 0] > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                accuracy.append((counted * correct).sum(1) / counted.sum(1))
    aucs = np.concatenate(aucs)
    out = {
        "auc_ci": {c: percentile_interval(aucs[:, k], n_boot, level) for k, c in enumerate(schema.classes)},
        "mean_auc_ci": percentile_interval(_replicate_means(aucs, schema, list(schema.reported_classes), n_boot), n_boot, level),
    }
    if min_positives_classes is not None:
        means = _replicate_means(aucs, schema, min_positives_classes, n_boot)
        out["mean_auc_min_positives_ci"] = percentile_interval(means, n_boot, level)
    if correct is not None:
        out["accuracy_ci"] = percentile_interval(np.concatenate(accuracy), n_boot, level)
    return out


def evaluate_predictions(pred: Predictions, schema: LabelSchema, n_boot: int = 1000, seed: int = 0,
                         table: "DatasetTable | None" = None, min_positives: int = MIN_POSITIVES) -> dict:
    """Point metrics (loss, per-class AUC, the mean AUC as in training, accuracy), the mean AUC
    over the classes with at least ``min_positives`` positives (``mean_auc_min_positives``),
    with bootstrap CIs."""
    result = score_predictions(pred, schema)
    count = positives(pred, schema)
    enough = [c for c in schema.reported_classes if count[c] >= min_positives and np.isfinite(result["auc"][c])]
    result["mean_auc_min_positives"] = mean_auc(result["auc"], enough)
    result["mean_auc_min_positives_classes"] = enough
    result["positives"] = count
    result["too_few_positives"] = [c for c in schema.classes if count[c] < min_positives]
    result["min_positives"] = min_positives
    if n_boot > 0:
        groups, unit = bootstrap_groups(table, len(pred.logits))
        result.update(bootstrap_intervals(pred, schema, n_boot, seed, groups=groups, min_positives_classes=enough))
        result["bootstrap"] = {"resamples": n_boot, "unit": unit, "level": 0.95, "method": "percentile"}
    return result


def evaluate_source(
    source: str | Path, site: "Site", split: str = "test", ten_crop: bool | None = None, n_boot: int = 1000,
    batch_size: int = 64, device: str = "cpu", seed: int = 0, min_positives: int = MIN_POSITIVES,
) -> dict:
    """Every model of ``source`` (teacher and student of a run) with its own head for ``site``
    on a split, BatchNorm recalibrated on the site's training split as in training.

    ``ten_crop=None``: ten-crop on the test split when the model's spec asks for it (``--recipe ark``)."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.sources import head_for_site, load_models, model_heads

    models = load_models(source)
    if ten_crop is None:
        ten_crop = split == "test" and all(m.spec.test_ten_crop for m in models.values())
    out = {"source": str(source), "site": site.name, "split": split, "protocol": getattr(site, "protocol", "arkfed"),
           "ten_crop": ten_crop, "n_boot": n_boot,
           "reported_classes": list(site.schema.reported_classes), "models": {}, "heads": {}, "notes": []}
    for name, model in models.items():
        heads, note = model_heads(source, name)
        head = head_for_site(heads, site.name, source)
        if head.schema.classes != site.schema.classes:
            raise ArkfedError(f"{source}: head {site.name!r} predicts {list(head.classes)} "
                              f"but the site's schema has {list(site.schema.classes)}")
        if note:
            out["notes"].append(note)
        out["models"][name] = score_with_head(model, head, site, split, ten_crop, n_boot, batch_size, device, seed, min_positives)
        out["heads"][name] = heads_label(source, name, note)
    return out


def score_with_head(model, head, site: "Site", split: str = "test", ten_crop: bool = False, n_boot: int = 1000, batch_size: int = 64,
                    device: str = "cpu", seed: int = 0, min_positives: int = MIN_POSITIVES) -> dict:
    """``head(model(x))`` on a split of ``site``, BatchNorm recalibrated on its training split as
    training-time evaluation does, with the metrics and CIs of :func:`evaluate_predictions`."""
    from arkfed.ark.metrics import calibrated_model
    from arkfed.evaluation.embeddings import head_predictions

    table = site.split(split)
    model, recalibrated = calibrated_model(model.to(device), site.schema, site.splits.get("train"), device)
    pred = head_predictions(model, head, table, site.schema, ten_crop=ten_crop, batch_size=batch_size, device=device)
    result = evaluate_predictions(pred, site.schema, n_boot, seed, table, min_positives)
    result["bn_recalibrated"] = recalibrated
    return result


def heads_label(source: str | Path, which: str, note: str | None) -> str:
    """Which heads scored ``which``: ``teacher-heads`` or ``heads`` (the student's)."""
    from arkfed.evaluation.sources import source_kind

    if source_kind(source) != "run":
        return "heads"
    return "teacher-heads" if which == "teacher" and not note else "heads"
