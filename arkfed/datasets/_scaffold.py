"""``arkfed add-dataset``: turn a user's label CSV into a readable plugin file and a site config.

The plugin written is a thin subclass of :class:`arkfed.datasets._csv.CsvDatasetPlugin` whose
options default to the columns and schema inferred here, so the site YAML needs no options and
the plugin can be read, edited, reviewed and shipped like any hand-written one. Classes are
inferred from the CSV's values: a column is a label column when every non-blank value is 1, 0
or -1 (uncertain); for a multiclass task a single text column holds the class names.
"""

from __future__ import annotations

import json
import keyword
import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, ValidationError

from arkfed.data.schema import LabelSchema, MissingPolicy, TaskType, UncertainPolicy
from arkfed.datasets._label_files import read_csv, require_columns
from arkfed.datasets._plugin import discover_plugins, forget_plugin_file
from arkfed.errors import ArkfedError

LABEL_VALUES = (0.0, 1.0, -1.0)


class DatasetRequest(BaseModel):
    """What the user told ``arkfed add-dataset``."""

    name: str
    labels: Path
    image_column: str
    label_columns: list[str] | None = None
    task: TaskType = "multilabel"
    uncertain: UncertainPolicy = "lsr-ones"
    missing: MissingPolicy = "zeros"
    patient_column: str | None = None
    sex_column: str | None = None
    age_column: str | None = None
    view_column: str | None = None
    split_column: str | None = None
    image_dir: str = ""
    root: Path | None = None
    plugins_dir: Path = Path("plugins")
    sites_dir: Path = Path("sites")
    force: bool = False

    @property
    def meta_columns(self) -> list[str]:
        named = [self.patient_column, self.sex_column, self.age_column, self.view_column, self.split_column]
        return [self.image_column, *(c for c in named if c)]


class InferredLabels(BaseModel):
    label_columns: list[str]
    classes: list[str] | None = None  # only for a multiclass column of class names
    skipped: dict[str, str] = Field(default_factory=dict)  # column -> why it is not a label column


class ScaffoldResult(BaseModel):
    plugin_file: Path
    site_file: Path
    site_name: str
    label_schema: LabelSchema
    inferred: InferredLabels


def check_name(name: str) -> None:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ArkfedError(f"dataset name {name!r} must be a Python identifier (letters, digits, '_'; not starting with a digit)")


def _label_values(series: pd.Series) -> tuple[bool, str]:
    """(usable as a 1/0/-1 label column, why not)."""
    values = series.dropna().astype(str).str.strip()
    values = values[values != ""]
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        return False, f"non-numeric value {values[numbers.isna()].iloc[0]!r}"
    outside = ~numbers.isin(LABEL_VALUES)
    if outside.any():
        return False, f"value {values[outside].iloc[0]!r} is not 1, 0 or -1"
    return True, ""


def infer_labels(frame: pd.DataFrame, request: DatasetRequest) -> InferredLabels:
    """The label columns (and for a class-name column, the classes) of the user's CSV."""
    file = request.labels
    require_columns(frame, request.meta_columns, file)
    if request.label_columns:
        require_columns(frame, request.label_columns, file)
        if request.task == "multiclass" and len(request.label_columns) == 1:
            column = frame[request.label_columns[0]].dropna().astype(str).str.strip()
            if not _label_values(column)[0]:
                classes = sorted(set(column) - {""})
                if len(classes) < 2:
                    raise ArkfedError(f"{file}: column {request.label_columns[0]!r} holds fewer than two class names")
                return InferredLabels(label_columns=list(request.label_columns), classes=classes)
        for column in request.label_columns:
            usable, why = _label_values(frame[column])
            if not usable:
                line = _first_bad_line(frame[column])
                raise ArkfedError(f"{file}: line {line}, column {column!r}: {why} (label columns hold 1, 0, -1 or blank)")
        return InferredLabels(label_columns=list(request.label_columns))
    candidates = [c for c in frame.columns if c not in request.meta_columns]
    chosen, skipped = [], {}
    for column in candidates:
        usable, why = _label_values(frame[column])
        if usable and frame[column].notna().any():
            chosen.append(column)
        else:
            skipped[column] = why or "empty"
    if not chosen:
        raise ArkfedError(f"{file}: no label columns found (columns holding only 1, 0, -1 or blank); give --label-columns")
    return InferredLabels(label_columns=chosen, skipped=skipped)


def _first_bad_line(series: pd.Series) -> int:
    text = series.astype(str).str.strip()
    numbers = pd.to_numeric(text.where(series.notna() & (text != "")), errors="coerce")
    bad = series.notna() & (text != "") & ~numbers.isin(LABEL_VALUES)
    return int(np.flatnonzero(bad.to_numpy())[0]) + 2 if bad.any() else 2


def _class_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Dataset"


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when possible (portable YAML/plugin), else absolute."""
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path.resolve())


OPTION_TYPES = {
    "file": "str", "image_column": "str", "image_dir": "str", "label_columns": "list[str]", "task": "TaskType",
    "classes": "list[str] | None", "uncertain": "UncertainPolicy", "missing": "MissingPolicy",
}


def plugin_options(request: DatasetRequest, inferred: InferredLabels, file_option: str) -> dict[str, object]:
    """The option defaults the plugin file declares (unset optional columns left out)."""
    options: dict[str, object] = {
        "file": file_option,
        "image_column": request.image_column,
        "image_dir": request.image_dir,
        "label_columns": inferred.label_columns,
        "task": request.task,
        "classes": inferred.classes,
        "patient_column": request.patient_column,
        "sex_column": request.sex_column,
        "age_column": request.age_column,
        "view_column": request.view_column,
        "split_column": request.split_column,
        "uncertain": request.uncertain,
        "missing": request.missing,
    }
    return {k: v for k, v in options.items() if v not in (None, "")}


def plugin_source(request: DatasetRequest, inferred: InferredLabels, file_option: str) -> str:
    """The text of plugins/NAME.py: an Options subclass with defaults and a registered plugin."""
    cls = _class_name(request.name)
    options = plugin_options(request, inferred, file_option)
    fields = "\n".join(f"    {key}: {OPTION_TYPES.get(key, 'str | None')} = {json.dumps(value)}" for key, value in options.items())
    n = len(inferred.classes or inferred.label_columns)
    description = f"{request.task} labels from {request.labels.name} (made by arkfed add-dataset)"
    return f'''"""{request.name}: a {request.task} dataset of {n} class(es) read from {request.labels.name}.

Written by `{_command_line(request)}`.
It is an ordinary plugin: edit the defaults below (columns and label schema) or override
``read`` for anything the generic CSV reader (arkfed.datasets.CsvDatasetPlugin) does not do. A site can still
override any option under ``options:`` in its YAML. Check it with `arkfed validate {request.name}`.
"""

from __future__ import annotations

from arkfed.datasets import CsvDatasetPlugin, CsvOptions, MissingPolicy, TaskType, UncertainPolicy, register_dataset


class {cls}Options(CsvOptions):
{fields}


@register_dataset
class {cls}(CsvDatasetPlugin):
    name = {json.dumps(request.name)}
    description = {json.dumps(description)}
    Options = {cls}Options
'''


def _command_line(request: DatasetRequest) -> str:
    """The add-dataset call that made the plugin (so it can be re-run after the CSV changes)."""
    parts = [f"arkfed add-dataset {request.name} --labels {request.labels}"]
    flags = {
        "--image-column": request.image_column,
        "--label-columns": ",".join(request.label_columns or []),
        "--task": request.task,
        "--uncertain": request.uncertain,
        "--missing": request.missing,
        "--patient-column": request.patient_column,
        "--sex-column": request.sex_column,
        "--age-column": request.age_column,
        "--split-column": request.split_column,
        "--image-dir": request.image_dir,
    }
    parts += [f"{flag} {shlex.quote(value)}" for flag, value in flags.items() if value]
    return " ".join(parts)


def site_yaml(name: str, root: str) -> str:
    return (
        f"# Site for the {name!r} dataset plugin (plugins/{name}.py), written by `arkfed add-dataset`.\n"
        f"# root is relative to this file. Validate with: arkfed validate {name}\n"
        f"name: {name}\n"
        f"dataset: {name}\n"
        f"root: {root}\n"
    )


def _refuse_overwrite(request: DatasetRequest, plugin_file: Path, site_file: Path) -> None:
    if request.force:
        return
    for path in (plugin_file, site_file):
        if path.exists():
            raise ArkfedError(f"{path} already exists; pass --force to overwrite it")
    catalog = discover_plugins([request.plugins_dir])
    if request.name in catalog.plugins or request.name in catalog.failures:
        raise ArkfedError(f"a dataset plugin named {request.name!r} already exists; choose another name or pass --force")


def scaffold_dataset(request: DatasetRequest) -> ScaffoldResult:
    """Infer the schema from the CSV, write plugins/NAME.py and sites/NAME.yaml; return what was made."""
    check_name(request.name)
    frame = read_csv(request.labels, dtype=str, keep_default_na=True)
    inferred = infer_labels(frame, request)
    root = request.root or request.labels.parent
    if not root.is_dir():
        raise ArkfedError(f"data folder not found: {root}")
    file_option = _relative(request.labels, root)
    if file_option.startswith(".."):
        file_option = str(request.labels.resolve())
    plugin_file = request.plugins_dir / f"{request.name}.py"
    site_file = request.sites_dir / f"{request.name}.yaml"
    _refuse_overwrite(request, plugin_file, site_file)

    schema = _schema(request, inferred)
    request.plugins_dir.mkdir(parents=True, exist_ok=True)
    request.sites_dir.mkdir(parents=True, exist_ok=True)
    plugin_file.write_text(plugin_source(request, inferred, file_option))
    site_file.write_text(site_yaml(request.name, _relative(root, request.sites_dir)))
    forget_plugin_file(plugin_file)  # a rewritten file (--force) is read again, not its cached module
    return ScaffoldResult(plugin_file=plugin_file, site_file=site_file, site_name=request.name, label_schema=schema, inferred=inferred)


def _schema(request: DatasetRequest, inferred: InferredLabels) -> LabelSchema:
    classes = tuple(inferred.classes or inferred.label_columns)
    if request.task == "binary" and len(classes) != 1:
        raise ArkfedError(
            f"a binary task has one label column (the positive finding); found {list(classes)}: pick one with --label-columns"
        )
    try:
        return LabelSchema(task=request.task, classes=classes, uncertain=request.uncertain, missing=request.missing)
    except ValidationError as exc:
        raise ArkfedError(f"{request.labels}: cannot make a {request.task} schema of {list(classes)}: {exc.errors()[0]['msg']}") from None

