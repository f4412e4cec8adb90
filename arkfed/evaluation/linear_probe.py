"""``arkfed linear-probe``: how much a frozen model's embedding already knows about a new site.

A linear classifier per the target schema (scikit-learn logistic regression: one per class for
multilabel/binary, multinomial for multiclass) is fitted on frozen embeddings of the training
split, few-shot if asked, and scored on the test split with the same metrics as training.

Few-shot selection (``shots=K``): for multiclass, K images of every class; for multilabel and
binary, for every class K images where it is positive and K where it is negative (a probe needs
both). ``fraction=F``: a random F of the training split. Each seed draws its own subset (and, for
``init="random"``, its own random backbone), so the spread over seeds is the few-shot noise.

:func:`probe_curve` runs the label-efficiency curve (:mod:`arkfed.evaluation.curves`): shots per
class at several sizes, for the model, a random init and any compared models, with the same
few-shot draw per seed for every model, compared by a paired t-test over seeds (Holm-corrected).
The score is the site mean AUC of training (:func:`arkfed.ark.metrics.mean_auc`); classes with
too few positives in the test split are listed (``too_few_positives``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from arkfed.ark.metrics import Predictions, score_predictions
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable
from arkfed.errors import ArkfedError
from arkfed.evaluation.embeddings import Embeddings, FeatureKind, embed_table
from arkfed.model.ark import ArkModel
from arkfed.spec import ModelSpec

InitKind = Literal["model", "random"]


def few_shot_rows(targets: np.ndarray, mask: np.ndarray, schema: LabelSchema, shots: int | None = None,
                  fraction: float | None = None, seed: int = 0) -> np.ndarray:
    """Row indices of the few-shot training subset (all rows when neither option is given)."""
    n = len(targets)
    rng = np.random.default_rng(seed)
    if shots is not None and fraction is not None:
        raise ArkfedError("give either --shots or --fraction, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ArkfedError(f"--fraction must be in (0, 1], got {fraction}")
        return np.sort(rng.choice(n, size=max(1, round(fraction * n)), replace=False))
    if shots is None:
        return np.arange(n)
    if shots < 1:
        raise ArkfedError(f"--shots must be at least 1, got {shots}")
    chosen: set[int] = set()
    counted = mask > 0
    for k in range(schema.num_classes):
        groups = [counted[:, k] & (targets[:, k] > 0.5)]
        if schema.task != "multiclass":
            groups.append(counted[:, k] & (targets[:, k] <= 0.5))
        for group in groups:
            rows = np.flatnonzero(group)
            chosen.update(rng.choice(rows, size=min(shots, len(rows)), replace=False).tolist())
    return np.array(sorted(chosen), dtype=int)


def _binary_probe(x: np.ndarray, y: np.ndarray, test: np.ndarray, c: float, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():  # nothing to separate: a constant score (chance AUC), not a crash
        return np.zeros(len(test), dtype=np.float32)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(x, y)
    return clf.decision_function(test).astype(np.float32)


def _multiclass_probe(x: np.ndarray, y: np.ndarray, test: np.ndarray, k: int, c: float, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    logits = np.full((len(test), k), -20.0, dtype=np.float32)  # classes never seen in training
    present = np.unique(y)
    if len(present) == 1:
        logits[:, present[0]] = 0.0
        return logits
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(x, y)
    logits[:, clf.classes_] = np.log(np.clip(clf.predict_proba(test), 1e-7, 1.0))
    return logits


def fit_probe_logits(train: Embeddings, test: Embeddings, schema: LabelSchema, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Fit the probe on ``train`` (counted labels only) and return its logits on ``test``."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train.features)
    x, xt = scaler.transform(train.features), scaler.transform(test.features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence notes on tiny few-shot sets
        if schema.task == "multiclass":
            rows = train.mask[:, 0] > 0
            return _multiclass_probe(x[rows], train.targets[rows].argmax(1), xt, schema.num_classes, c, seed)
        columns = []
        for k in range(schema.num_classes):
            rows = train.mask[:, k] > 0
            columns.append(_binary_probe(x[rows], (train.targets[rows, k] > 0.5).astype(int), xt, c, seed))
    return np.stack(columns, axis=1)


def subset(emb: Embeddings, rows: np.ndarray) -> Embeddings:
    return Embeddings(emb.features[rows], emb.targets[rows], emb.mask[rows])


def random_init_seed(seed: int) -> int:
    """The torch seed of a baseline's random init: derived, so that it never coincides with a
    model someone initialised with ``torch.manual_seed(seed)`` for the same small seed."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def random_model(spec: ModelSpec, seed: int) -> ArkModel:
    """A randomly initialised model of the same architecture: the probe's no-pretraining baseline."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_init_seed(seed))
        return ArkModel(spec).eval()


@dataclass
class ProbeSettings:
    shots: int | None = None
    fraction: float | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    features: FeatureKind = "projector"
    init: InitKind = "model"
    c: float = 1.0
    batch_size: int = 64
    device: str = "cpu"


def summarise_runs(runs: list[dict], schema: LabelSchema) -> dict:
    """Mean and spread over seeds of the mean AUC, and the per-class mean AUC (NaN for a class
    the test split cannot score)."""
    means = np.array([r["mean_auc"] for r in runs], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        out = {
            "mean_auc": float(np.nanmean(means)),
            "mean_auc_std": float(np.nanstd(means, ddof=1)) if len(means) > 1 else 0.0,
            "auc": {c: float(np.nanmean([r["auc"][c] for r in runs])) for c in schema.classes},
        }
        if schema.task == "multiclass":
            out["accuracy"] = float(np.nanmean([r["accuracy"] for r in runs]))
    return out


def probe_embeddings(train: Embeddings, test: Embeddings, schema: LabelSchema, shots: int | None = None,
                     fraction: float | None = None, seed: int = 0, c: float = 1.0, min_positives: int | None = None,
                     n_boot: int = 0) -> dict:
    """One probe on precomputed embeddings: the few-shot draw of ``seed``, fitted and scored.
    With ``min_positives`` the classes with fewer test positives are listed and
    ``mean_auc_min_positives`` leaves them out (see :func:`arkfed.evaluation.evaluate.evaluate_predictions`;
    ``mean_auc`` is the same either way); ``n_boot`` adds bootstrap CIs."""
    from arkfed.evaluation.evaluate import evaluate_predictions

    rows = few_shot_rows(train.targets, train.mask, schema, shots, fraction, seed)
    logits = fit_probe_logits(subset(train, rows), test, schema, c, seed)
    pred = Predictions(logits, test.targets, test.mask)
    if min_positives is None:
        scored = score_predictions(pred, schema)
    else:
        scored = evaluate_predictions(pred, schema, n_boot, seed, None, min_positives)
    keep = ("mean_auc", "auc", "loss", "accuracy", "too_few_positives", "mean_auc_min_positives", "mean_auc_ci", "auc_ci")
    return {"seed": seed, "train_size": int(len(rows)), **{k: scored[k] for k in keep if k in scored}}


def linear_probe(model: ArkModel, train: DatasetTable, test: DatasetTable, schema: LabelSchema, settings: ProbeSettings) -> dict:
    """Probe ``model`` (or, with ``init="random"``, random models of its architecture) per seed."""
    def embed(m: ArkModel, table: DatasetTable) -> Embeddings:
        return embed_table(m, table, schema, settings.features, settings.batch_size, settings.device)

    fixed = None if settings.init == "random" else (embed(model, train), embed(model, test))
    runs = []
    for seed in settings.seeds:
        if fixed is None:
            baseline = random_model(model.spec, seed)
            tr, te = embed(baseline, train), embed(baseline, test)
        else:
            tr, te = fixed
        runs.append(probe_embeddings(tr, te, schema, settings.shots, settings.fraction, seed, settings.c))
    return {"init": settings.init, "features": settings.features, "shots": settings.shots, "fraction": settings.fraction,
            "seeds": list(settings.seeds), "test_size": len(test), "runs": runs, **summarise_runs(runs, schema)}


@dataclass
class ProbeCurveSettings:
    train_sizes: tuple[int | None, ...] = (None,)  # shots per class; None: the whole training split
    seeds: tuple[int, ...] = (0, 1, 2)
    features: FeatureKind = "projector"
    c: float = 1.0
    random_baseline: bool = True
    min_positives: int = 10
    n_boot: int = 1000
    correction: str = "holm"
    batch_size: int = 64
    device: str = "cpu"


def probe_curve(models: dict[str, ArkModel], train: DatasetTable, test: DatasetTable, schema: LabelSchema,
                settings: ProbeCurveSettings) -> dict:
    """Test mean AUC of linear probes per model, shots per class and seed, as curves.

    ``models["model"]`` is the model under test; a random init of its architecture is added
    (one per seed) unless ``random_baseline`` is off; other entries are compared models.
    """
    from arkfed.evaluation.curves import RANDOM, REFERENCE, size_label, summarise_curves

    def embed(m: ArkModel, table: DatasetTable) -> Embeddings:
        return embed_table(m, table, schema, settings.features, settings.batch_size, settings.device)

    inits = [REFERENCE, *([RANDOM] if settings.random_baseline else []), *(n for n in models if n != REFERENCE)]
    records, runs, per_class = [], [], {}
    for init in inits:
        fixed = None if init == RANDOM else (embed(models[init], train), embed(models[init], test))
        per_class[init] = {}
        for seed in settings.seeds:
            if fixed is None:
                baseline = random_model(models[REFERENCE].spec, seed)
                tr, te = embed(baseline, train), embed(baseline, test)
            else:
                tr, te = fixed
            for size in settings.train_sizes:
                first = seed == settings.seeds[0]
                run = probe_embeddings(tr, te, schema, size, None, seed, settings.c, settings.min_positives,
                                       settings.n_boot if first else 0)
                label = size_label(size)
                runs.append({"init": init, "size": label, **run})
                records.append({"init": init, "size": label, "seed": seed, "score": run["mean_auc"], "train_size": run["train_size"]})
    curve = summarise_curves(records, list(settings.train_sizes), "mean AUC", None, settings.correction,
                             unit="training images (K shots per class)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for init in inits:
            for size in settings.train_sizes:
                label = size_label(size)
                mine = [r for r in runs if r["init"] == init and r["size"] == label]
                per_class[init][label] = {c: float(np.nanmean([r["auc"][c] for r in mine])) for c in schema.classes}
                if mine[0].get("mean_auc_ci"):  # the first seed's run: shown when the seeds do not vary
                    curve["inits"][init][label]["bootstrap_ci"] = mine[0]["mean_auc_ci"]
    return {"features": settings.features, "shots": [size_label(s) for s in settings.train_sizes], "seeds": list(settings.seeds),
            "test_size": len(test), "min_positives": settings.min_positives,
            "too_few_positives": runs[0].get("too_few_positives", []), "curve": curve, "auc": per_class, "runs": runs}
