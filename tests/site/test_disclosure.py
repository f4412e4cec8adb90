"""What of an evaluation leaves a site (issue 21, problem 6): per-class AUCs off by default, and
when on, rounded and suppressed below the policy's minimum counts, so that the positive count of
a class cannot be read off its AUC (``AUC * p * (n - p)`` is an integer for the right ``p``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arkfed.ark.metrics import Predictions, score_predictions
from arkfed.data.loaders import EvalDataset, evaluation_schema
from arkfed.data.schema import LabelSchema, label_targets
from arkfed.data.tables import ArrayImages, DatasetTable, make_meta
from arkfed.federation import messages as m
from arkfed.site.disclosure import class_counts, released_metrics
from arkfed.site.policy import SitePolicy
from synthetic import multilabel_schema, synthetic_table

N = 240  # a validation split
POSITIVES = (0, 4, 13, 17, 31, 58, 83, 120, 236)  # 9 classes: none, too few, ..., too few negatives
CLASSES = tuple(f"c{k}" for k in range(len(POSITIVES)))


def _table(positives=POSITIVES, n=N, seed=0) -> DatasetTable:
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, len(positives)), np.float32)
    for k, p in enumerate(positives):
        labels[rng.choice(n, p, replace=False), k] = 1.0
    images = np.zeros((n, 8, 8), np.uint8)
    return DatasetTable(ArrayImages(images, "disclosure"), labels, make_meta(n, patient_id=[f"p{i}" for i in range(n)]), CLASSES)


def _evaluation(table: DatasetTable, schema: LabelSchema, seed=1) -> dict:
    """One honest evaluation: a model whose scores follow the labels, with noise (no tied scores)."""
    targets, mask = label_targets(table.labels, evaluation_schema(schema))
    logits = targets * 1.5 + np.random.default_rng(seed).normal(size=targets.shape)
    return score_predictions(Predictions(logits.astype(np.float32), targets, mask), schema)


def _candidates(auc: float, n: int) -> set[int]:
    """The attack: every positive count p (up to p <-> n - p, which it cannot tell apart) for which
    AUC * p * (n - p) is an integer, as it is for the true p when scores are untied."""
    found = set()
    for p in range(1, n):
        value = auc * p * (n - p)
        if abs(value - round(value)) < 1e-9:
            found.add(min(p, n - p))
    return found


def _consistent(auc: float, n: int, decimals: int) -> set[int]:
    """The same attack, aware of the rounding: every p for which some U / (p * (n - p)) rounds to ``auc``."""
    found = set()
    for p in range(1, n):
        pairs = p * (n - p)
        u = round(auc * pairs)
        if abs(u / pairs - auc) <= 0.5 * 10**-decimals + 1e-12:
            found.add(min(p, n - p))
    return found


def _attack(aucs: dict[str, float], n: int) -> dict[str, set[int]]:
    return {name: _candidates(auc, n) for name, auc in aucs.items()}


def test_positive_counts_cannot_be_recovered_from_one_evaluation_at_the_default_settings():
    table, schema = _table(), multilabel_schema(CLASSES)
    truth = {name: min(p, N - p) for name, p in zip(CLASSES, POSITIVES)}
    result = _evaluation(table, schema)

    # full precision, as sent before: the integer argument pins the counts
    full = {name: auc for name, auc in result["auc"].items() if math.isfinite(auc)}
    pinned_full = sorted(name for name, found in _attack(full, N).items() if found == {truth[name]})
    print(f"\nfull precision: {len(pinned_full)} of {len(full)} classes with an AUC pinned: "
          + ", ".join(f"{name} p={truth[name]}" for name in pinned_full))
    assert len(pinned_full) > len(full) // 2  # the attack works (so the check below means something)
    assert math.isnan(result["auc"]["c0"])  # and a NaN would say "no positive"

    policy = SitePolicy(per_class_metrics=True)  # switched on, everything else at its defaults
    sent = released_metrics(result, policy, class_counts(table, schema))
    released = sent["auc"]
    attacked = _attack(released, N)
    for name in CLASSES:
        if name not in released:
            print(f"{name}: suppressed ({POSITIVES[CLASSES.index(name)]} positives)")
            continue
        consistent = _consistent(released[name], N, policy.metric_decimals)
        print(f"{name}: sent {released[name]}, integer candidates {len(attacked[name])}, consistent with rounding {len(consistent)}")
        found = attacked[name]
        assert len(found) != 1, f"{name}: the count is pinned to {found}"
        assert truth[name] in consistent and len(consistent) >= 2
        # every count the minimums allow stays possible (min_class_positives * min_class_negatives >= 10 ** decimals)
        assert set(range(policy.min_class_positives, N // 2 + 1)) <= consistent
    assert set(released) == {"c2", "c3", "c4", "c5", "c6", "c7"}  # 0 and 4 positives, 4 negatives: suppressed
    assert all(math.isfinite(v) and round(v, 2) == v for v in released.values())  # no NaN, two decimals
    assert round(sent["mean_auc"], 2) == sent["mean_auc"] and round(sent["loss"], 2) == sent["loss"]
    assert sent["num_examples"] == N


def test_by_default_only_rounded_summary_metrics_leave():
    table, schema = _table(), multilabel_schema(CLASSES)
    result = _evaluation(table, schema) | {"bn_recalibrated": True}
    sent = released_metrics(result, SitePolicy(), class_counts(table, schema))
    assert set(sent) == {"loss", "mean_auc", "num_examples", "bn_recalibrated"}
    assert sent["mean_auc"] == round(result["mean_auc"], 2) != result["mean_auc"]
    assert sent["loss"] == round(result["loss"], 2) and sent["bn_recalibrated"] is True and sent["num_examples"] == N
    record = m.evaluation_content({m.STUDENT: sent})[m.STUDENT]
    assert not any(key.startswith(m.AUC_PREFIX) for key in record.keys())
    finer = released_metrics(result, SitePolicy(metric_decimals=6), class_counts(table, schema))
    assert finer["loss"] == pytest.approx(result["loss"], abs=5e-7)


def test_the_minimum_counts_suppress_and_are_both_policy_keys():
    table, schema = _table(), multilabel_schema(CLASSES)
    result, counts = _evaluation(table, schema), class_counts(table, schema)
    assert counts["c1"] == (4, N - 4) and counts["c8"] == (236, 4)

    def sent(**policy):
        return set(released_metrics(result, SitePolicy(per_class_metrics=True, **policy), counts)["auc"])

    assert sent(min_class_positives=1, min_class_negatives=1) == set(CLASSES) - {"c0"}  # a NaN is never sent
    assert sent(min_class_positives=1) == set(CLASSES) - {"c0", "c8"}
    assert sent(min_class_negatives=1) == set(CLASSES) - {"c0", "c1"}
    assert sent(min_class_positives=50) == {"c5", "c6", "c7"}
    assert sent(min_class_negatives=200) == {"c2", "c3", "c4"}


def test_class_counts_are_the_labels_an_evaluation_counts():
    schema = multilabel_schema(("a", "b", "c"), uncertain="ones", missing="ignore")
    table = synthetic_table(60, schema.classes, size=8, seed=4, uncertain=0.2, missing=0.1)
    dataset = EvalDataset(table, schema, 8)
    counted, positive = dataset.mask > 0, dataset.targets > 0.5
    expected = {name: (int((counted[:, k] & positive[:, k]).sum()), int((counted[:, k] & ~positive[:, k]).sum()))
                for k, name in enumerate(schema.classes)}
    assert class_counts(table, schema) == expected
    assert all(p + q < 60 for p, q in expected.values())  # uncertain and missing labels are not counted
