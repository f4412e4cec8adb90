"""The generic dataset object every plugin produces, and patient-wise splitting.

Following TorchXRayVision, a dataset split is three row-aligned things: image references, an
``N x K`` float label matrix (1, 0, ``UNCERTAIN``, NaN = not labelled) and a metadata table
(``patient_id``, ``sex`` as "M"/"F", ``age``, ``view``). Everything downstream (training,
validation, evaluation) is generic over this object.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pandas as pd

from arkfed.data.imageio import read_image

SPLITS = ("train", "val", "test")
META_COLUMNS = ("patient_id", "sex", "age", "view")


class ImageSource(Protocol):
    """Row-addressable images: files on disk, or arrays held in memory (MedMNIST)."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> np.ndarray:
        """The image at ``index`` as an H x W uint8 array."""
        ...

    def describe(self, index: int) -> str:
        """Where the image at ``index`` comes from (a path), for error messages and reports."""
        ...

    def subset(self, indices: np.ndarray) -> "ImageSource": ...


@dataclass(frozen=True)
class FileImages:
    """Images on disk. Paths may be ``str``: plugins over 200k-image label files pass strings,
    because building as many ``Path`` objects alone costs about a second."""

    paths: tuple[str | Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def subset(self, indices: np.ndarray) -> "FileImages":
        return FileImages(tuple(self.paths[int(i)] for i in indices))


@dataclass(frozen=True)
class ArrayImages:
    """Images already in memory, e.g. a MedMNIST ``.npz`` array (N x H x W uint8)."""

    array: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.array)

    def read(self, index: int) -> np.ndarray:
        image = self.array[index]
        return image if image.ndim == 2 else np.asarray(image.mean(axis=-1), dtype=np.uint8)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def subset(self, indices: np.ndarray) -> "ArrayImages":
        return ArrayImages(self.array[np.asarray(indices, dtype=int)], self.name)


@dataclass(frozen=True)
class DatasetTable:
    """One split of one dataset: images, labels (N x K) and metadata, row-aligned."""

    images: ImageSource
    labels: np.ndarray
    meta: pd.DataFrame
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.labels.shape != (n, len(self.classes)):
            raise ValueError(f"labels have shape {self.labels.shape}, expected ({n}, {len(self.classes)})")
        if len(self.meta) != n:
            raise ValueError(f"metadata has {len(self.meta)} rows, expected {n}")
        missing = [c for c in META_COLUMNS if c not in self.meta.columns]
        if missing:
            raise ValueError(f"metadata lacks columns {missing}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "DatasetTable":
        idx = np.asarray(indices, dtype=int)
        return DatasetTable(
            images=self.images.subset(idx),
            labels=self.labels[idx],
            meta=self.meta.iloc[idx].reset_index(drop=True),
            classes=self.classes,
        )


def make_meta(
    n: int,
    patient_id: Sequence | None = None,
    sex: Sequence | None = None,
    age: Sequence | None = None,
    view: Sequence | None = None,
    **extra: Sequence,
) -> pd.DataFrame:
    """A metadata table with the standard columns (absent ones filled with missing values)."""
    columns = {"patient_id": patient_id, "sex": sex, "age": age, "view": view}
    frame = pd.DataFrame({k: _meta_column(v, n) for k, v in columns.items()})
    codes, spellings = pd.factorize(frame["sex"])  # normalise each spelling once, not each row
    frame["sex"] = np.array([normalise_sex(s) for s in spellings] + [None], dtype=object)[codes]
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    frame["patient_id"] = frame["patient_id"].astype("string")
    for key, values in extra.items():
        frame[key] = _meta_column(values, n)
    return frame


def _meta_column(values: Sequence | None, n: int) -> list | np.ndarray:
    if values is None:
        return [None] * n
    if isinstance(values, (pd.Series, pd.Index, np.ndarray)):
        return np.asarray(values, dtype=object)  # positional; avoids a slow per-item Python iteration
    return list(values)


def normalise_sex(value: object) -> str | None:
    """'M'/'F' from the spellings datasets use (M, Male, male, F, Female, ...); else None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in ("m", "male", "man"):
        return "M"
    if text in ("f", "female", "woman"):
        return "F"
    return None


def patient_split(
    patient_ids: Sequence, val_fraction: float, test_fraction: float, seed: int = 0
) -> np.ndarray:
    """Assign each row to train/val/test by a hash of its patient id.

    The assignment depends only on (seed, patient id), not on row order or dataset size, so it is
    stable across machines and file versions, and a patient never appears in two splits.
    """
    codes, uniques = pd.factorize(pd.Series(list(patient_ids), dtype=object), use_na_sentinel=False)
    names = np.empty(len(uniques), dtype=object)
    for i, pid in enumerate(uniques):  # hash each patient once: 65k patients, not 223k rows (CheXpert)
        digest = hashlib.sha1(f"{seed}:{pid}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        names[i] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return names[codes] if len(codes) else np.empty(0, dtype=object)


def split_table(table: DatasetTable, assignment: np.ndarray) -> dict[str, DatasetTable]:
    """Cut one table into the named splits given a per-row assignment."""
    return {name: table.subset(np.flatnonzero(assignment == name)) for name in SPLITS}
