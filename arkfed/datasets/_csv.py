"""A dataset described by one CSV: an image-path column plus label columns, declared in YAML.

This is how a site brings a dataset arkfed has no plugin for. The generic ``csv`` plugin reads
it from a site's ``options:``; ``arkfed add-dataset`` writes plugins that subclass
:class:`CsvDatasetPlugin` with their options as defaults::

    class Options(CsvOptions):
        file: str = "labels.csv"
        image_column: str = "path"
        label_columns: list[str] = ["Pneumonia"]
        task: TaskType = "binary"

    @register_dataset
    class MyData(CsvDatasetPlugin):
        name = "mydata"
        Options = Options

Labels: one column per class holding the values listed in ``positive_values`` /
``negative_values`` / ``uncertain_values`` (blank = not labelled), or, for a multiclass task, a
single column holding class names. Rows are split by ``split_column`` (train/val/test) when
given, else by patient (``patient_column``; without it each image is its own patient).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from arkfed.data.schema import UNCERTAIN, LabelSchema, MissingPolicy, TaskType, UncertainPolicy
from arkfed.data.tables import DatasetTable, make_meta
from arkfed.datasets._label_files import FileDatasetOptions, LabelRecords, SplitConfig, assemble_splits, read_csv, require_columns
from arkfed.datasets._plugin import DatasetPlugin
from arkfed.errors import ArkfedError

LabelValue = str | int | float
SPLIT_SPELLINGS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "validate": "val",
    "test": "test", "testing": "test",
}


class CsvOptions(FileDatasetOptions):
    """Where the CSV is, which columns mean what, and the label schema (options of the csv plugin)."""

    file: str = Field(description="label CSV, relative to the site root (.csv, .csv.gz or .csv.zip)")
    image_column: str
    image_dir: str = Field("", description="folder the image paths are relative to, under the site root")
    label_columns: list[str] = Field(min_length=1)
    task: TaskType = "multilabel"
    classes: list[str] | None = Field(None, description="class names; default: the label column names")
    positive_values: list[LabelValue] = [1]
    negative_values: list[LabelValue] = [0]
    uncertain_values: list[LabelValue] = [-1]
    patient_column: str | None = None
    sex_column: str | None = None
    age_column: str | None = None
    view_column: str | None = None
    split_column: str | None = None
    uncertain: UncertainPolicy = "lsr-ones"
    missing: MissingPolicy = "zeros"
    eval_classes: list[str] | None = None
    aliases: dict[str, str] = {}

    @model_validator(mode="after")
    def _consistent(self) -> "CsvOptions":
        if self.class_names_column and (not self.classes or len(self.classes) < 2):
            raise ValueError("a multiclass label column holding class names needs `classes` (at least two)")
        if not self.class_names_column and self.classes is not None and len(self.classes) != len(self.label_columns):
            raise ValueError(f"`classes` has {len(self.classes)} names for {len(self.label_columns)} label columns")
        if self.task == "binary" and len(self.label_columns) != 1:
            raise ValueError("a binary task has exactly one label column (the positive finding)")
        groups = [{value_key(v) for v in values} for values in (self.positive_values, self.negative_values, self.uncertain_values)]
        if len(set.union(*groups)) != sum(map(len, groups)):
            raise ValueError("positive_values, negative_values and uncertain_values overlap")
        return self

    @property
    def class_names_column(self) -> bool:
        """True when a multiclass task's single label column holds class names, not 1/0 values."""
        return self.task == "multiclass" and len(self.label_columns) == 1 and bool(self.classes) and len(self.classes) > 1

    @property
    def class_list(self) -> tuple[str, ...]:
        return tuple(self.classes or self.label_columns)


def value_key(value: object) -> str:
    """One spelling per label value: numbers by value ("1", "1.0", 1 alike), text case-insensitively."""
    text = str(value).strip()
    try:
        return repr(float(text))
    except ValueError:
        return text.lower()


def csv_schema(options: CsvOptions) -> LabelSchema:
    """The label schema a CSV dataset's options declare."""
    return LabelSchema(
        task=options.task,
        classes=options.class_list,
        uncertain=options.uncertain,
        missing=options.missing,
        eval_classes=tuple(options.eval_classes) if options.eval_classes else None,
        aliases=options.aliases,
    )


def coded_labels(frame: pd.DataFrame, options: CsvOptions, file: Path) -> np.ndarray:
    """Label columns mapped through the options' value lists; anything else names line and column."""
    codes = {value_key(v): 1.0 for v in options.positive_values}
    codes.update({value_key(v): 0.0 for v in options.negative_values})
    codes.update({value_key(v): UNCERTAIN for v in options.uncertain_values})
    allowed = ", ".join(map(str, [*options.positive_values, *options.negative_values, *options.uncertain_values]))
    out = np.full((len(frame), len(options.label_columns)), np.nan, dtype=np.float32)
    for j, column in enumerate(options.label_columns):
        raw = frame[column]
        index, spellings = pd.factorize(raw)  # code each distinct spelling once; -1 = blank
        values = np.array([codes.get(value_key(v), np.inf) for v in spellings] + [np.nan], dtype=np.float32)[index]
        unknown = np.isinf(values)
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise ArkfedError(
                f"{file}: line {row + 2}, column {column!r}: label value {raw.iloc[row]!r} is outside the schema "
                f"(allowed: {allowed} or blank)"
            )
        out[:, j] = values
    return out


def class_name_labels(frame: pd.DataFrame, options: CsvOptions, file: Path) -> np.ndarray:
    """A single column of class names -> one-hot rows (blank = not labelled)."""
    column = options.label_columns[0]
    classes = options.class_list
    raw = frame[column]
    lookup = {c.strip().lower(): i for i, c in enumerate(classes)}
    index = raw.str.strip().str.lower().map(lookup)
    unknown = (raw.notna() & index.isna()).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ArkfedError(f"{file}: line {row + 2}, column {column!r}: {raw.iloc[row]!r} is not one of the classes {list(classes)}")
    out = np.full((len(frame), len(classes)), np.nan, dtype=np.float32)
    labelled = index.notna().to_numpy()
    out[labelled] = np.eye(len(classes), dtype=np.float32)[index[labelled].astype(int).to_numpy()]
    return out


def official_split(frame: pd.DataFrame, column: str, file: Path) -> np.ndarray:
    values = frame[column].str.strip().str.lower().map(SPLIT_SPELLINGS)
    bad = values.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ArkfedError(f"{file}: line {row + 2}, column {column!r}: {frame[column].iloc[row]!r} is not train, val or test")
    return values.to_numpy(dtype=object)


def read_csv_records(root: Path, options: CsvOptions) -> LabelRecords:
    """The CSV's rows as records: labels coded, metadata and (optional) official split attached."""
    file = root / options.file
    frame = read_csv(file, dtype=str)
    optional = [options.patient_column, options.sex_column, options.age_column, options.view_column, options.split_column]
    require_columns(frame, [options.image_column, *options.label_columns, *(c for c in optional if c)], file)
    if frame[options.image_column].isna().any():
        row = int(np.flatnonzero(frame[options.image_column].isna().to_numpy())[0])
        raise ArkfedError(f"{file}: line {row + 2}, column {options.image_column!r}: no image path")
    labels = class_name_labels(frame, options, file) if options.class_names_column else coded_labels(frame, options, file)
    image_root = str(root / options.image_dir if options.image_dir else root)
    names = frame[options.image_column].str.strip()
    paths = names.where(names.str.startswith(os.sep), image_root + os.sep + names)  # absolute paths stay

    def column(name: str | None) -> pd.Series | None:
        return frame[name] if name else None

    patients = column(options.patient_column)
    return LabelRecords(
        paths=paths.to_numpy(dtype=object),
        labels=labels,
        meta=make_meta(
            len(frame),
            patient_id=patients if patients is not None else paths,
            sex=column(options.sex_column),
            age=column(options.age_column),
            view=column(options.view_column),
        ),
        classes=options.class_list,
        source=file,
        official=official_split(frame, options.split_column, file) if options.split_column else None,
    )


def read_csv_dataset(root: Path, split: SplitConfig, options: CsvOptions) -> dict[str, DatasetTable]:
    """Read a CSV-described dataset into train/val/test tables."""
    return assemble_splits(read_csv_records(root, options), split, options.missing_images)


class CsvDatasetPlugin(DatasetPlugin):
    """Base of the generic ``csv`` plugin and of the plugins ``arkfed add-dataset`` writes.

    The schema comes from the options (a subclass sets defaults by subclassing ``CsvOptions``).
    """

    Options: ClassVar[type[CsvOptions]] = CsvOptions
    options: CsvOptions

    def label_schema(self) -> LabelSchema:
        return self.schema or csv_schema(self.options)

    def read_records(self, root: Path) -> LabelRecords:
        return read_csv_records(root, self.options)

