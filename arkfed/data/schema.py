"""Label schemas: what a dataset's labels mean and how uncertain/missing values become targets.

A plugin's label matrix keeps four kinds of values apart until training applies the policy:
``1`` positive, ``0`` negative, ``UNCERTAIN`` (-1, CheXpert/MIMIC's "uncertain") and ``NaN``
(not labelled). :func:`label_targets` turns a batch of them into float targets plus a mask of
the entries that count in the loss.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from arkfed.data.findings import CHEXPERT_CLASSES, CHEXPERT_EVAL_CLASSES, canonical_finding, is_canonical

UNCERTAIN = -1.0
TaskType = Literal["multilabel", "multiclass", "binary"]
UncertainPolicy = Literal["ones", "zeros", "lsr-ones", "lsr-zeros", "ignore"]
MissingPolicy = Literal["zeros", "ignore"]

# Label-smoothing ranges of Ark's reference code. The reference draws each uncertain entry once,
# when the dataset is built (``random.uniform`` in ``CheXpert.__init__``), so an image keeps one soft
# target for the whole run; arkfed draws again at every access (seeded per visit and draw), a
# departure that averages the smoothing over the run instead of fixing one draw per image.
LSR_ONES = (0.55, 0.85)
LSR_ZEROS = (0.0, 0.3)


class LabelSchema(BaseModel):
    """The label contract of one dataset: task type, ordered classes and label policies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: TaskType
    classes: tuple[str, ...] = Field(min_length=1)
    uncertain: UncertainPolicy = "lsr-ones"
    missing: MissingPolicy = "zeros"
    eval_classes: tuple[str, ...] | None = None
    aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "LabelSchema":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {list(self.classes)}")
        if self.task == "binary" and len(self.classes) != 1:
            raise ValueError("a binary schema has exactly one class (the positive finding)")
        if self.task == "multiclass" and len(self.classes) < 2:
            raise ValueError("a multiclass schema needs at least two classes")
        for name in self.eval_classes or ():
            if name not in self.classes:
                raise ValueError(f"eval class {name!r} is not one of the classes {list(self.classes)}")
        for name, target in self.aliases.items():
            if name not in self.classes:
                raise ValueError(f"alias for {name!r}, which is not one of the classes")
            if not is_canonical(target):
                raise ValueError(f"alias target {target!r} is not in arkfed's canonical finding vocabulary")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def reported_classes(self) -> tuple[str, ...]:
        """The classes whose AUCs are averaged into a site's mean AUC."""
        return self.eval_classes or self.classes

    def canonical(self, name: str) -> str | None:
        """The canonical finding a class stands for (explicit alias first, then the vocabulary)."""
        return self.aliases.get(name) or canonical_finding(name)

    def with_policies(self, uncertain: UncertainPolicy | None = None, missing: MissingPolicy | None = None) -> "LabelSchema":
        update = {k: v for k, v in {"uncertain": uncertain, "missing": missing}.items() if v is not None}
        return LabelSchema.model_validate({**self.model_dump(), **update})

    def describe(self) -> str:
        """A one-line summary, used in tables and in schema-mismatch errors."""
        return f"{self.task}[{', '.join(self.classes)}] uncertain={self.uncertain} missing={self.missing}"


# The CheXpert labeler's 14 observations with Ark's policies: CheXpert and MIMIC-CXR (labelled by
# the same tool) both use it, and report the CheXpert competition's five classes.
CHEXPERT_LABELER_SCHEMA = LabelSchema(
    task="multilabel",
    classes=CHEXPERT_CLASSES,
    uncertain="lsr-ones",
    missing="zeros",
    eval_classes=CHEXPERT_EVAL_CLASSES,
)


def label_targets(
    labels: np.ndarray, schema: LabelSchema, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the schema's policies to raw labels (B x K) -> (targets, mask), both float32 B x K.

    ``mask`` is 0 where an entry must not count in the loss (ignored uncertain or missing values).
    With ``rng`` the label-smoothing policies draw uniform soft targets as Ark does during
    training; without it (evaluation) they resolve to hard 1 / 0.
    For multiclass schemas a row that is not fully labelled is masked out as a whole.
    """
    raw = np.asarray(labels, dtype=np.float32)
    targets = np.where(np.isnan(raw), 0.0, raw).astype(np.float32)
    mask = np.ones_like(targets)

    missing = np.isnan(raw)
    if schema.missing == "ignore":
        mask[missing] = 0.0

    uncertain = raw == UNCERTAIN
    policy = schema.uncertain
    if policy == "ones":
        targets[uncertain] = 1.0
    elif policy == "zeros" or policy == "ignore":
        targets[uncertain] = 0.0
        if policy == "ignore":
            mask[uncertain] = 0.0
    else:
        low, high = LSR_ONES if policy == "lsr-ones" else LSR_ZEROS
        n = int(uncertain.sum())
        if rng is None:
            targets[uncertain] = 1.0 if policy == "lsr-ones" else 0.0
        elif n:
            targets[uncertain] = rng.uniform(low, high, size=n).astype(np.float32)

    if schema.task == "multiclass":
        row_ok = (~missing).all(axis=1) & (~uncertain).all(axis=1)
        mask = np.repeat(row_ok[:, None], raw.shape[1], axis=1).astype(np.float32)
    return targets, mask
