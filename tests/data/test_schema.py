"""Label schemas: validation, label policies (label_targets) and canonical finding names."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from arkfed.data.findings import canonical_finding, is_canonical
from arkfed.data.schema import LSR_ONES, LSR_ZEROS, UNCERTAIN, LabelSchema, label_targets

NAN = np.nan


def schema(**kw) -> LabelSchema:
    base = {"task": "multilabel", "classes": ("Atelectasis", "Effusion", "Nodule")}
    return LabelSchema(**{**base, **kw})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": ("A", "A")}, "unique"),
        ({"task": "binary", "classes": ("A", "B")}, "exactly one class"),
        ({"task": "multiclass", "classes": ("A",)}, "at least two"),
        ({"classes": ()}, "at least 1"),
        ({"eval_classes": ("Pneumonia",)}, "eval class 'Pneumonia'"),
        ({"aliases": {"Mass": "Nodule"}}, "alias for 'Mass'"),
        ({"aliases": {"Nodule": "Lump"}}, "alias target 'Lump'"),
        ({"uncertain": "maybe"}, "uncertain"),
        ({"missing": "ones"}, "missing"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_schemas_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        schema(**kwargs)


def test_schema_is_frozen_and_with_policies_returns_a_copy():
    s = schema()
    with pytest.raises(ValidationError):
        s.task = "binary"
    changed = s.with_policies(uncertain="ignore", missing="ignore")
    assert (changed.uncertain, changed.missing) == ("ignore", "ignore")
    assert (s.uncertain, s.missing) == ("lsr-ones", "zeros")  # Ark's defaults, untouched
    assert s.with_policies() == s


def test_reported_classes_are_the_eval_classes_when_given():
    assert schema().reported_classes == ("Atelectasis", "Effusion", "Nodule")
    assert schema(eval_classes=("Effusion",)).reported_classes == ("Effusion",)
    assert schema().num_classes == 3


RAW = np.array([[1.0, 0.0, UNCERTAIN], [NAN, UNCERTAIN, 1.0]], dtype=np.float32)


@pytest.mark.parametrize(
    "uncertain, targets, mask",
    [
        ("ones", [[1, 0, 1], [0, 1, 1]], [[1, 1, 1], [1, 1, 1]]),
        ("zeros", [[1, 0, 0], [0, 0, 1]], [[1, 1, 1], [1, 1, 1]]),
        ("ignore", [[1, 0, 0], [0, 0, 1]], [[1, 1, 0], [1, 0, 1]]),
    ],
)
def test_hard_uncertain_policies(uncertain, targets, mask):
    t, m = label_targets(RAW, schema(uncertain=uncertain))
    np.testing.assert_array_equal(t, targets)
    np.testing.assert_array_equal(m, mask)
    assert t.dtype == np.float32 and m.dtype == np.float32


def test_missing_ignore_masks_unlabelled_entries_only():
    _, mask = label_targets(RAW, schema(uncertain="ones", missing="ignore"))
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 1, 1]])
    targets, mask = label_targets(RAW, schema(uncertain="ones", missing="zeros"))
    assert targets[1, 0] == 0 and mask[1, 0] == 1


@pytest.mark.parametrize("policy, bounds, hard", [("lsr-ones", LSR_ONES, 1.0), ("lsr-zeros", LSR_ZEROS, 0.0)])
def test_label_smoothing_draws_within_ark_ranges_and_is_hard_without_rng(policy, bounds, hard):
    raw = np.full((500, 2), UNCERTAIN, dtype=np.float32)
    raw[:, 1] = 1.0
    targets, mask = label_targets(raw, schema(classes=("A", "B"), uncertain=policy), rng=np.random.default_rng(0))
    soft = targets[:, 0]
    assert bounds[0] <= soft.min() and soft.max() <= bounds[1]
    assert soft.std() > 0.05  # drawn per entry, not one constant
    assert np.all(targets[:, 1] == 1.0) and np.all(mask == 1)
    evaluation, _ = label_targets(raw, schema(classes=("A", "B"), uncertain=policy))
    assert np.all(evaluation[:, 0] == hard)


def test_multiclass_rows_not_fully_labelled_are_masked_as_a_whole():
    s = LabelSchema(task="multiclass", classes=("Normal", "Opacity", "Other"))
    raw = np.array([[0, 1, 0], [NAN, 0, 0], [UNCERTAIN, 1, 0], [1, 0, 0]], dtype=np.float32)
    targets, mask = label_targets(raw, s)
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(targets[[0, 3]], [[0, 1, 0], [1, 0, 0]])


def test_canonical_names_match_spellings_and_explicit_aliases_win():
    assert canonical_finding("Effusion") == "Pleural Effusion"
    assert canonical_finding("pleural-effusion") == "Pleural Effusion"
    assert canonical_finding("Pleural_Thickening") == "Pleural Thickening"
    assert canonical_finding("TB") == "Tuberculosis"
    assert canonical_finding("Lump") is None
    assert is_canonical("Pleural Effusion") and not is_canonical("Effusion")
    s = schema(aliases={"Nodule": "Nodule/Mass"})
    assert s.canonical("Effusion") == "Pleural Effusion"
    assert s.canonical("Nodule") == "Nodule/Mass"
    assert s.canonical("Atelectasis") == "Atelectasis"
