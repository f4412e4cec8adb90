"""Reading publishers' label files and image folders: the helpers dataset plugins share.

A plugin turns its dataset's official files into :class:`LabelRecords` (paths, raw labels,
metadata, official split per row), then :func:`assemble_splits` checks the images exist and cuts
the train/val/test :class:`~arkfed.data.tables.DatasetTable` objects. Errors name the file, line and
column, so a user can find the bad row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from arkfed.data.tables import DatasetTable, FileImages, patient_split, split_table
from arkfed.errors import ArkfedError


class SplitConfig(BaseModel):
    """How to split a dataset that ships no official split (always patient-wise), or the folder of
    split lists (Ark's ``dataset/*.txt``) that name each image's split instead."""

    model_config = ConfigDict(extra="forbid")

    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    use_official: bool = True
    lists: Path | None = Field(
        default=None,
        description="folder of split lists in the format of Ark's repository (Ark_MICCAI2023/dataset/*.txt, e.g. "
        "RSNAPneumonia_{train,val,test}.txt): the listed images, in the listed splits, are the dataset "
        "(see arkfed.datasets._split_lists); a site YAML sets it with `split_lists: DIR`",
    )

    @model_validator(mode="after")
    def _lists_are_the_split(self) -> "SplitConfig":
        if self.lists is not None and not self.use_official:
            raise ValueError("split lists name each image's split: `use_official: false` contradicts them")
        return self


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


LABEL_FILE_SUFFIXES = ("", ".gz", ".zip")
MissingImagesPolicy = Literal["error", "drop"]
# A plugin's ``protocol`` option: ``arkfed`` reads a dataset arkfed's way; ``ark`` reads it as Ark's
# reference code does (github.com/jlianglab/Ark, Ark_MICCAI2023/dataloader.py and its dataset/ lists),
# where the two differ in what is read (each plugin's option description says how).
ReadingProtocol = Literal["arkfed", "ark"]


class FileDatasetOptions(BaseModel):
    """Options every plugin over image files shares; plugin ``Options`` models extend it.

    ``missing_images: drop`` trains on the rows whose image exists (e.g. a partial download);
    the default ``error`` stops with the first missing file named, so nothing is silently lost.
    """

    model_config = ConfigDict(extra="forbid")

    missing_images: MissingImagesPolicy = "error"


def find_label_file(directory: Path, *names: str, required: bool = True) -> Path | None:
    """The first of ``names`` present as ``X.csv``, ``X.csv.gz`` or ``X.csv.zip``.

    Publishers and mirrors ship the same file plain or compressed (MIMIC ``.csv.gz``, Kaggle
    ``.csv.zip``); pandas reads all three, so a plugin should accept whichever is there.
    """
    for name in names:
        for suffix in LABEL_FILE_SUFFIXES:
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    if not required:
        return None
    tried = " or ".join(names)
    raise ArkfedError(f"label file not found: {directory / names[0]} (looked for {tried}, plain, .gz or .zip, in {directory})")


def list_files(*directories: Path | str) -> dict[str, str]:
    """File name -> path for the files directly inside ``directories`` (absent folders give none).

    One ``os.scandir`` per folder instead of one ``stat`` per image keeps checking 100k+ images
    to a fraction of a second. A name found in two folders keeps the first folder's file.
    """
    found: dict[str, str] = {}
    for directory in directories:
        base = os.fspath(directory)
        try:
            with os.scandir(base) as entries:
                for entry in entries:
                    if entry.name not in found and entry.is_file():
                        found[entry.name] = os.path.join(base, entry.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found


def locate_images(names: pd.Series, found: Mapping[str, str], expected_dir: Path, suffix: str = "") -> np.ndarray:
    """Each name's file from a :func:`list_files` listing, else the path it should have had.

    The fallback path is what a missing-image error then names.
    """
    keys = names.astype(str).reset_index(drop=True)
    located = keys.map(dict(found)).astype(object).to_numpy()
    expected = (str(expected_dir) + os.sep + keys + suffix).to_numpy(dtype=object)
    return np.where(pd.isna(located), expected, located)


def existing_files(paths: Sequence[str]) -> np.ndarray:
    """Which of ``paths`` exist: one listing per folder, or one stat per file in deep layouts.

    Flat folders of many images (ChestX-ray14) are listed once each; where folders hold one or
    two images each (CheXpert's and MIMIC's study folders) a stat per file is ~4x cheaper.
    """
    series = pd.Series(list(paths), dtype=object).astype(str)
    if series.empty:
        return np.zeros(0, dtype=bool)
    parts = series.str.rpartition(os.sep)
    parents = pd.unique(parts[0])
    if len(parents) * 8 > len(series):
        return np.fromiter((os.path.isfile(p) for p in series), dtype=bool, count=len(series))
    present: set[str] = set()
    for parent in parents:
        try:
            with os.scandir(parent or ".") as entries:
                present.update(f"{parent}{os.sep}{e.name}" for e in entries if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            continue
    return series.isin(present).to_numpy()


def present_images(paths: Sequence[str], policy: MissingImagesPolicy, source: Path | str | Sequence[Path]) -> np.ndarray:
    """Row mask of the images that exist; with ``policy="error"`` any missing image is an error.

    The error names the first missing file, how many are missing and the label file listing
    them (``source``: one file, or one per row when the rows come from several files).
    """
    exists = existing_files(paths)
    if policy == "error" and not exists.all():
        first = int(np.argmin(exists))
        listed_in = source if isinstance(source, (str, Path)) else source[first]
        raise ArkfedError(
            f"{listed_in}: {int((~exists).sum())} of {len(exists)} listed image files are missing, first {paths[first]}; "
            "add them, or set `missing_images: drop` under the site's options to use only the images present"
        )
    return exists


def label_matrix(
    frame: pd.DataFrame, columns: Sequence[str], file: Path | str, allowed: Iterable[float] = (0.0, 1.0, -1.0), row_offset: int = 2
) -> np.ndarray:
    """The label columns of a publisher's CSV as an ``N x K`` float32 matrix (blank = NaN).

    Text and numbers outside ``allowed`` raise an error naming file, line and column, so the
    frame must still be row-aligned with the file (validate before filtering rows).
    """
    columns = list(columns)
    require_columns(frame, columns, file)
    block = frame[columns]
    numeric = block.apply(pd.to_numeric, errors="coerce")
    text = (numeric.isna() & block.notna()).to_numpy()
    if text.any():
        r, c = np.argwhere(text)[0]
        raise ArkfedError(
            f"{file}: line {r + row_offset}, column {columns[c]!r}: label value {block.iat[r, c]!r} is not a number "
            f"(allowed: {sorted(allowed)} or blank)"
        )
    values = numeric.to_numpy(dtype=np.float64)
    check_label_values(values, set(allowed), file, columns, row_offset)
    return values.astype(np.float32)


@dataclass(frozen=True)
class LabelRecords:
    """A dataset's rows as its label files give them, before images are checked and splits cut.

    Plugins build one from the official files (``read_records``) and finish it with
    :func:`assemble_splits`; tests read a full-size real label file this way without its images.
    ``official`` holds each row's official split ("train", "val", "test", or "trainval" for an
    official train pool that is cut into train/val by patient); None when the dataset has none.
    ``source`` is the label file the rows come from, or one file per row (see :func:`concat_records`).
    """

    paths: np.ndarray
    labels: np.ndarray
    meta: pd.DataFrame
    classes: tuple[str, ...]
    source: Path | np.ndarray
    official: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.labels.shape != (n, len(self.classes)) or len(self.meta) != n:
            raise ValueError(f"records are not row-aligned: {n} paths, labels {self.labels.shape}, {len(self.meta)} metadata rows")
        if self.official is not None and len(self.official) != n:
            raise ValueError(f"official split has {len(self.official)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray) -> "LabelRecords":
        """The rows selected by a boolean mask or an index array."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=int)
        return LabelRecords(
            paths=self.paths[idx],
            labels=self.labels[idx],
            meta=self.meta.iloc[idx].reset_index(drop=True),
            classes=self.classes,
            source=self.source if isinstance(self.source, Path) else self.source[idx],
            official=None if self.official is None else self.official[idx],
        )


def concat_records(parts: Sequence[LabelRecords]) -> LabelRecords:
    """Rows of several label files of one dataset (e.g. CheXpert's train.csv and valid.csv)."""
    if len({p.classes for p in parts}) != 1:
        raise ValueError("records to concatenate have different classes")

    def per_row(p: LabelRecords) -> np.ndarray:
        return np.full(len(p), p.source, dtype=object) if isinstance(p.source, Path) else np.asarray(p.source, dtype=object)

    officials = [p.official for p in parts]
    return LabelRecords(
        paths=np.concatenate([np.asarray(p.paths, dtype=object) for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        meta=pd.concat([p.meta for p in parts], ignore_index=True),
        classes=parts[0].classes,
        source=np.concatenate([per_row(p) for p in parts]),
        official=None if any(o is None for o in officials) else np.concatenate(officials).astype(object),
    )


def split_assignment(records: LabelRecords, split: SplitConfig) -> np.ndarray:
    """Each row's split: the official one where the dataset ships it, else by patient.

    An official train pool ("trainval") is cut into train/val by patient with ``val_fraction``.
    """
    patients = records.meta["patient_id"].to_numpy(dtype=object)
    if records.official is None or not split.use_official:
        return patient_split(patients, split.val_fraction, split.test_fraction, split.seed)
    out = np.asarray(records.official, dtype=object).copy()
    pool = out == "trainval"
    if pool.any():
        out[pool] = patient_split(patients[pool], split.val_fraction, 0.0, split.seed)
    return out


def assemble_splits(records: LabelRecords, split: SplitConfig, missing_images: MissingImagesPolicy = "error") -> dict[str, DatasetTable]:
    """Check the images exist (per ``missing_images``), then cut the records into train/val/test."""
    keep = present_images(records.paths, missing_images, records.source)
    return split_records(records if keep.all() else records.subset(keep), split)


def split_records(records: LabelRecords, split: SplitConfig) -> dict[str, DatasetTable]:
    """Cut records whose images are known to exist into train/val/test tables."""
    table = DatasetTable(
        images=FileImages(tuple(records.paths)),
        labels=records.labels,
        meta=records.meta,
        classes=records.classes,
    )
    return split_table(table, split_assignment(records, split))
