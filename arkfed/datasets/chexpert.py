"""Stanford CheXpert: 224k X-rays of 65k patients, 14 observations labelled 1 / 0 / -1 (uncertain) / blank.

Read as Stanford distributes it: ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``) holding
``train.csv`` and ``valid.csv`` whose ``Path`` column is relative to the folder above it. The
official test set is hidden, so (as Ark does) ``valid.csv`` is the test split and ``train.csv`` is
cut into train/val by patient. ``root`` may be the folder holding ``CheXpert-v1.0-small/`` or
that folder itself. Frontal views only by default; ``protocol: ark`` tests on all 234 images of
valid.csv, laterals included, as Ark does.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from arkfed.datasets import (
    CHEXPERT_CLASSES,
    CHEXPERT_LABELER_SCHEMA,
    UNCERTAIN,
    ArkfedError,
    DatasetPlugin,
    FileDatasetOptions,
    LabelRecords,
    ReadingProtocol,
    concat_records,
    find_label_file,
    label_matrix,
    make_meta,
    read_csv,
    register_dataset,
    require_columns,
)

DATASET_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
LABEL_VALUES = (0.0, 1.0, UNCERTAIN)


class CheXpertOptions(FileDatasetOptions):
    views: Literal["frontal", "all"] = Field(
        default="frontal",
        description="frontal: only the Frontal rows of train.csv and valid.csv (arkfed's choice); all: laterals too",
    )
    protocol: ReadingProtocol = Field(
        default="arkfed",
        description="ark: the test split is valid.csv in full, laterals included (all 234 images), as Ark tests "
        "CheXpert (Ark_MICCAI2023/datasets_config.yaml test_list dataset/CheXpert-v1.0_valid.csv, every row read by "
        "CheXpert.__init__ in dataloader.py); `views` then applies to train.csv only. arkfed: `views` applies to both",
    )


def dataset_folder(root: Path) -> Path:
    """The folder holding train.csv: ``root`` itself or ``root/CheXpert-v1.0[-small]``."""
    for folder in (root, *(root / name for name in DATASET_FOLDERS)):
        if find_label_file(folder, "train.csv", required=False):
            return folder
    raise ArkfedError(f"CheXpert train.csv not found in {root} or in {root}/{{{','.join(DATASET_FOLDERS)}}}")


def read_chexpert_csv(file: Path, folder: Path, official: str, frontal_only: bool) -> LabelRecords:
    """One of train.csv / valid.csv: labels checked against 1/0/-1/blank (on every line, before
    lateral views are dropped, so errors name the right line), patient from the path."""
    frame = read_csv(file)
    require_columns(frame, (*META_COLUMNS, *CHEXPERT_CLASSES), file)
    labels = label_matrix(frame, CHEXPERT_CLASSES, file, LABEL_VALUES)
    rel = frame["Path"].astype(str)
    patient = rel.str.extract(r"(patient\d+)", expand=False)
    if patient.isna().any():
        line = int(np.flatnonzero(patient.isna().to_numpy())[0]) + 2
        raise ArkfedError(f"{file}: line {line}, column 'Path': no patientNNNNN folder in {rel.iloc[line - 2]!r}")
    paths = str(folder) + os.sep + rel.str.replace(r"^CheXpert-v1\.0[^/]*/", "", regex=True)
    meta = make_meta(
        len(frame),
        patient_id=patient,
        sex=frame["Sex"],
        age=frame["Age"],
        view=frame["AP/PA"].fillna(frame["Frontal/Lateral"]),
    )
    records = LabelRecords(
        paths=paths.to_numpy(dtype=object),
        labels=labels,
        meta=meta,
        classes=CHEXPERT_CLASSES,
        source=file,
        official=np.full(len(frame), official, dtype=object),
    )
    if not frontal_only:
        return records
    return records.subset((frame["Frontal/Lateral"].astype(str).str.lower() == "frontal").to_numpy())


@register_dataset
class CheXpert(DatasetPlugin):
    name = "chexpert"
    description = "Stanford CheXpert (train.csv -> train/val by patient, valid.csv -> test), 14 observations, -1 = uncertain"
    schema = CHEXPERT_LABELER_SCHEMA
    Options = CheXpertOptions

    def read_records(self, root: Path) -> LabelRecords:
        """Rows of train.csv (train pool) and valid.csv (test), frontal views unless ``views: all``
        (valid.csv whole under ``protocol: ark``)."""
        folder = dataset_folder(root)
        frontal_only = self.options.views == "frontal"
        parts = [read_chexpert_csv(find_label_file(folder, "train.csv"), folder, "trainval", frontal_only)]
        valid = find_label_file(folder, "valid.csv", required=False)
        if valid is not None:  # Ark's test list is valid.csv whole (Ark_MICCAI2023/datasets_config.yaml)
            whole = self.options.protocol == "ark"
            parts.append(read_chexpert_csv(valid, folder, "test", frontal_only and not whole))
        records = concat_records(parts)
        if valid is None:  # no held-out file: split everything by patient
            records = replace(records, official=None)
        return records
