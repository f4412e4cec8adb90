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

from arkfed.errors import ArkfedError
from arkfed.imageio import read_image

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
    paths: tuple[Path, ...]

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
    frame = pd.DataFrame({k: (list(v) if v is not None else [None] * n) for k, v in columns.items()})
    frame["sex"] = frame["sex"].map(normalise_sex)
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    frame["patient_id"] = frame["patient_id"].astype("string")
    for key, values in extra.items():
        frame[key] = list(values)
    return frame


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
    out = np.empty(len(patient_ids), dtype=object)
    for i, pid in enumerate(patient_ids):
        digest = hashlib.sha1(f"{seed}:{pid}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        out[i] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return out


def split_table(table: DatasetTable, assignment: np.ndarray) -> dict[str, DatasetTable]:
    """Cut one table into the named splits given a per-row assignment."""
    return {name: table.subset(np.flatnonzero(assignment == name)) for name in SPLITS}


def require_columns(frame: pd.DataFrame, columns: Sequence[str], file: Path | str) -> None:
    """Raise a one-line error naming the file and the columns it lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ArkfedError(
            f"{file}: missing column(s) {missing}; found {list(frame.columns)[:20]}"
        )


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with a one-line error naming the file when it is absent or unparsable."""
    if not path.is_file():
        raise ArkfedError(f"label file not found: {path}")
    try:
        return pd.read_csv(path, **kwargs)
    except Exception as exc:
        raise ArkfedError(f"cannot parse {path}: {type(exc).__name__}: {exc}") from exc


def check_label_values(values: np.ndarray, allowed: set[float], file: Path | str, columns: Sequence[str], row_offset: int = 2) -> None:
    """Raise naming file, row and column for the first value outside ``allowed`` (NaN always allowed).

    ``row_offset`` converts a 0-based data index into the file's line number (header = line 1).
    """
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isnan(arr) & ~np.isin(arr, sorted(allowed))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ArkfedError(
            f"{file}: line {r + row_offset}, column {columns[c]!r}: label value {arr[r, c]:g} is outside "
            f"the schema (allowed: {sorted(allowed)} or blank)"
        )
