"""MedMNIST chest sets (PneumoniaMNIST, ChestMNIST): small pre-split images in one ``.npz``.

Read as the ``medmnist`` package caches them: ``root/{flag}.npz`` (``root/{flag}_{size}.npz`` for
the larger MedMNIST+ sizes) with ``train_images``/``val_images``/``test_images`` (N x H x W uint8)
and matching ``*_labels`` (N x K). The official splits are kept. Nothing is downloaded: put the
file in ``root``. MedMNIST ships no patient ids, so ``patient_id`` is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from arkfed.datasets import (
    CHESTXRAY14_CLASSES,
    SPLITS,
    ArkfedError,
    ArrayImages,
    DatasetPlugin,
    DatasetTable,
    LabelSchema,
    SplitConfig,
    check_label_values,
    make_meta,
    register_dataset,
    require_list_format,
)

SCHEMAS: dict[str, LabelSchema] = {
    "pneumoniamnist": LabelSchema(task="binary", classes=("Pneumonia",), uncertain="lsr-ones", missing="zeros"),
    "chestmnist": LabelSchema(task="multilabel", classes=CHESTXRAY14_CLASSES, uncertain="lsr-ones", missing="zeros"),
}


class MedMnistOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flag: str = "pneumoniamnist"
    size: Literal[28, 64, 128, 224] = 28

    @field_validator("flag")
    @classmethod
    def _supported(cls, flag: str) -> str:
        if flag not in SCHEMAS:
            raise ValueError(f"unknown MedMNIST flag {flag!r}; supported: {', '.join(sorted(SCHEMAS))}")
        return flag


def npz_path(root: Path, options: MedMnistOptions) -> Path:
    return root / (f"{options.flag}.npz" if options.size == 28 else f"{options.flag}_{options.size}.npz")


def read_split(archive: np.lib.npyio.NpzFile, file: Path, split: str, classes: tuple[str, ...]) -> DatasetTable:
    """One official split: images as ArrayImages, labels checked to be 0/1 with one column per class."""
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in archive.files:
            raise ArkfedError(f"{file}: array {key!r} missing (found {', '.join(archive.files)})")
    images = archive[f"{split}_images"]
    labels = np.asarray(archive[f"{split}_labels"]).reshape(len(images), -1)
    if labels.shape[1] != len(classes):
        raise ArkfedError(f"{file}: {split}_labels has {labels.shape[1]} columns, the schema has {len(classes)} ({', '.join(classes)})")
    check_label_values(labels, {0.0, 1.0}, f"{file}:{split}_labels", classes, row_offset=0)
    return DatasetTable(
        images=ArrayImages(images, f"{file.name}:{split}"),
        labels=labels.astype(np.float32),
        meta=make_meta(len(images)),
        classes=classes,
    )


@register_dataset
class MedMnist(DatasetPlugin):
    name = "medmnist"
    description = "MedMNIST chest sets ({flag}.npz, official splits): pneumoniamnist (binary) or chestmnist (14 findings)"
    Options = MedMnistOptions

    def label_schema(self) -> LabelSchema:
        return SCHEMAS[self.options.flag]

    def read(self, root: Path, split: SplitConfig) -> dict[str, DatasetTable]:
        """The official train/val/test arrays (``split`` fractions do not apply: MedMNIST is pre-split)."""
        require_list_format(self.name, None, split)
        file = npz_path(root, self.options)
        if not file.is_file():
            raise ArkfedError(f"MedMNIST file not found: {file} (copy {file.name} from the medmnist cache into {root})")
        classes = self.label_schema().classes
        try:
            with np.load(file) as archive:
                return {name: read_split(archive, file, name, classes) for name in SPLITS}
        except (OSError, ValueError) as exc:
            raise ArkfedError(f"cannot read {file}: {type(exc).__name__}: {exc}") from exc
