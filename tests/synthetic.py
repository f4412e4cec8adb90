"""Tiny learnable datasets built in memory (ArrayImages), for the training-area tests.

Class ``k`` positive -> a bright square in region ``k`` of the image, so a small CNN learns it in
a few steps and AUCs are meaningful.
"""

from __future__ import annotations

import numpy as np

from arkfed.data.schema import UNCERTAIN, LabelSchema
from arkfed.data.tables import ArrayImages, DatasetTable, make_meta


def synthetic_table(n: int, classes: tuple[str, ...], size: int = 32, seed: int = 0, uncertain: float = 0.0,
                    missing: float = 0.0, multiclass: bool = False) -> DatasetTable:
    rng = np.random.default_rng(seed)
    k = len(classes)
    if multiclass:
        labels = np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
    else:
        labels = (rng.random((n, k)) < 0.4).astype(np.float32)
    images = rng.integers(0, 90, size=(n, size, size)).astype(np.uint8)
    cells = int(np.ceil(np.sqrt(k)))
    step = size // cells
    for i in range(n):
        for c in range(k):
            if labels[i, c] == 1:
                r, q = divmod(c, cells)
                images[i, r * step + 2 : (r + 1) * step - 2, q * step + 2 : (q + 1) * step - 2] = 220
    raw = labels.copy()
    if uncertain:
        raw[rng.random((n, k)) < uncertain] = UNCERTAIN
    if missing:
        raw[rng.random((n, k)) < missing] = np.nan
    meta = make_meta(n, patient_id=[f"p{i}" for i in range(n)])
    return DatasetTable(ArrayImages(images, f"synthetic{seed}"), raw, meta, tuple(classes))


def multilabel_schema(classes=("a", "b", "c"), **kw) -> LabelSchema:
    return LabelSchema(task="multilabel", classes=tuple(classes), **kw)
