"""MIMIC-CXR-JPG: 377k X-rays of 65k patients with CheXpert-labeler labels per study (1 / 0 / -1 / blank).

Read as PhysioNet distributes it: ``mimic-cxr-2.0.0-chexpert.csv`` (labels per study),
``mimic-cxr-2.0.0-split.csv`` (each DICOM's official train/validate/test split),
``mimic-cxr-2.0.0-metadata.csv`` (each DICOM's ``ViewPosition``), all plain or ``.gz``, and the
images ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``. A study's labels apply to all its images.
Sex and age come from MIMIC-IV's ``patients.csv`` (``gender``, ``anchor_age``) when it is there.

Labels follow Ark (``Ark_MICCAI2023/dataloader.py`` class ``MIMIC``, ``engine.py``): the CheXpert
labeler's 14 classes, uncertain (-1) as positive (``uncertain_label="Ones"``, where CheXpert uses
LSR-Ones), blank as negative, and the mean AUC over all 14 classes (Ark cuts only CheXpert to the
competition's 5). ``label_policy: chexpert`` gives CheXpert's policies instead (LSR-Ones, 5
reported classes). Where this departs from Ark: Ark reads its own CSV lists (frontal and lateral
images in its ``mimic-cxr-2.0.0-{train,validate,test}.csv``); arkfed reads PhysioNet's files,
frontal views by default (``views: all`` keeps laterals). Ark also turns uncertain labels into
positives as it reads them, so its test AUCs count them positive (its test list has 565 uncertain
and 539 positive Pneumonia labels), where arkfed's evaluation leaves uncertain labels out.
``protocol: ark`` reads as Ark does: uncertain labels become positives in every split and the test
split keeps its laterals.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from arkfed.datasets import (
    CHEXPERT_CLASSES,
    CHEXPERT_LABELER_SCHEMA,
    UNCERTAIN,
    ArkfedError,
    DatasetPlugin,
    FileDatasetOptions,
    LabelRecords,
    LabelSchema,
    ReadingProtocol,
    find_label_file,
    label_matrix,
    make_meta,
    read_csv,
    register_dataset,
    require_columns,
)

PREFIX = "mimic-cxr-2.0.0"
FRONTAL_VIEWS = ("PA", "AP")
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}
STUDY_KEY = ["subject_id", "study_id"]
# Ark's MIMIC: uncertain -> 1 ("Ones"), all 14 classes scored.
ARK_MIMIC_SCHEMA = LabelSchema.model_validate(
    {**CHEXPERT_LABELER_SCHEMA.model_dump(), "uncertain": "ones", "eval_classes": None}
)


class MimicCxrOptions(FileDatasetOptions):
    views: Literal["frontal", "all"] = Field(
        default="frontal", description="frontal: PA and AP images only (arkfed's choice); all: laterals too"
    )
    patients_file: str = Field(default="patients.csv", description="MIMIC-IV's patients.csv (sex, anchor age), read when in the root")
    label_policy: Literal["ark", "chexpert"] = Field(
        default="ark",
        description="ark: uncertain as positive in training and all 14 classes scored, as Ark's MIMIC "
        "(Ark_MICCAI2023/dataloader.py MIMIC, uncertain_label='Ones'); chexpert: CheXpert's LSR-Ones and 5 scored classes",
    )
    protocol: ReadingProtocol = Field(
        default="arkfed",
        description="ark: labels read as Ark's MIMIC loader reads them (MIMIC.__init__ in Ark_MICCAI2023/dataloader.py "
        "turns -1 into 1 while reading dataset/mimic-cxr-2.0.0-{train,validate,test}.csv): uncertain labels are "
        "positives in every split, so evaluation counts them positive instead of leaving them out; and the test "
        "split keeps laterals, as Ark's mimic-cxr-2.0.0-test.csv lists all 5,159 test images. arkfed: uncertain "
        "labels stay uncertain (the schema's policy in training, left out of evaluation)",
    )

    @model_validator(mode="after")
    def _ark_reads_uncertain_as_ones(self) -> "MimicCxrOptions":
        if self.protocol == "ark" and self.label_policy != "ark":
            raise ValueError(
                "protocol: ark reads uncertain MIMIC labels as positives (Ark's 'Ones'); it cannot train with label_policy: chexpert"
            )
        return self


def read_study_labels(root: Path) -> pd.DataFrame:
    """The per-study label table, checked against 1/0/-1/blank and for duplicate studies."""
    file = find_label_file(root, f"{PREFIX}-chexpert.csv")
    frame = read_csv(file)
    require_columns(frame, (*STUDY_KEY, *CHEXPERT_CLASSES), file)
    labels = label_matrix(frame, CHEXPERT_CLASSES, file, (0.0, 1.0, UNCERTAIN))
    duplicated = frame.duplicated(STUDY_KEY).to_numpy()
    if duplicated.any():
        line = int(np.flatnonzero(duplicated)[0]) + 2
        raise ArkfedError(f"{file}: line {line}: study {frame['study_id'].iloc[line - 2]} is listed twice")
    return pd.DataFrame(labels, columns=list(CHEXPERT_CLASSES)).assign(
        subject_id=frame["subject_id"].to_numpy(), study_id=frame["study_id"].to_numpy()
    )


def read_official_split(root: Path) -> tuple[pd.DataFrame, Path]:
    """One row per DICOM with its official split renamed to train/val/test."""
    file = find_label_file(root, f"{PREFIX}-split.csv")
    frame = read_csv(file)
    require_columns(frame, ("dicom_id", *STUDY_KEY, "split"), file)
    split = frame["split"].astype(str).str.strip().str.lower()
    unknown = ~split.isin(list(OFFICIAL_SPLITS)).to_numpy()
    if unknown.any():
        line = int(np.flatnonzero(unknown)[0]) + 2
        raise ArkfedError(
            f"{file}: line {line}, column 'split': {frame['split'].iloc[line - 2]!r} is not one of {list(OFFICIAL_SPLITS)}"
        )
    return frame.assign(split=split.map(OFFICIAL_SPLITS)), file


def read_views(root: Path) -> pd.DataFrame:
    file = find_label_file(root, f"{PREFIX}-metadata.csv")
    frame = read_csv(file, usecols=lambda c: c in ("dicom_id", "ViewPosition"))
    require_columns(frame, ("dicom_id", "ViewPosition"), file)
    return frame.drop_duplicates("dicom_id")


def read_patients(root: Path, name: str) -> pd.DataFrame | None:
    """MIMIC-IV core ``patients.csv`` (sex, anchor age), when the site has it next to the images."""
    stem = name.removesuffix(".gz").removesuffix(".zip")
    file = find_label_file(root, stem, required=False)
    if file is None:
        return None
    frame = read_csv(file)
    require_columns(frame, ("subject_id", "gender", "anchor_age"), file)
    return frame[["subject_id", "gender", "anchor_age"]].drop_duplicates("subject_id")


def image_paths(root: Path, rows: pd.DataFrame) -> pd.Series:
    """files/pXX/pSUBJECT/sSTUDY/DICOM.jpg, XX = the subject id's first two digits."""
    subject = rows["subject_id"].astype("int64").astype(str)
    study = rows["study_id"].astype("int64").astype(str)
    sep = os.sep
    return (
        str(root / "files") + sep + "p" + subject.str[:2] + sep + "p" + subject + sep + "s" + study + sep
        + rows["dicom_id"].astype(str) + ".jpg"
    )


@register_dataset
class MimicCxr(DatasetPlugin):
    name = "mimic_cxr"
    description = "MIMIC-CXR-JPG (chexpert/split/metadata CSVs, official train/validate/test), CheXpert's 14 labels, Ark's policies"
    Options = MimicCxrOptions

    def label_schema(self) -> LabelSchema:
        return ARK_MIMIC_SCHEMA if self.options.label_policy == "ark" else CHEXPERT_LABELER_SCHEMA

    def read_records(self, root: Path) -> LabelRecords:
        """One row per DICOM of the split file, with its study's labels (NaN for unlabelled studies)."""
        studies = read_study_labels(root)
        rows, split_file = read_official_split(root)
        rows = rows.merge(read_views(root), on="dicom_id", how="left")
        ark = self.options.protocol == "ark"
        if self.options.views == "frontal":  # Ark's test list holds every view of the official test split
            rows = rows[rows["ViewPosition"].isin(FRONTAL_VIEWS) | (ark & (rows["split"] == "test"))]
        rows = rows.merge(studies, on=STUDY_KEY, how="left")
        patients = read_patients(root, self.options.patients_file)
        if patients is not None:
            rows = rows.merge(patients, on="subject_id", how="left")
        rows = rows.reset_index(drop=True)
        meta = make_meta(
            len(rows),
            patient_id=rows["subject_id"].astype(str),
            sex=rows["gender"] if patients is not None else None,
            age=rows["anchor_age"] if patients is not None else None,
            view=rows["ViewPosition"],
            study_id=rows["study_id"].astype(str),
        )
        labels = rows[list(CHEXPERT_CLASSES)].to_numpy(dtype=np.float32, copy=True)
        if ark:  # Ark's MIMIC loader: "elif a == -1: ... if self.uncertain_label == 'Ones': label[i] = 1"
            labels[labels == UNCERTAIN] = 1.0
        return LabelRecords(
            paths=image_paths(root, rows).to_numpy(dtype=object),
            labels=labels,
            meta=meta,
            classes=CHEXPERT_CLASSES,
            source=split_file,
            official=rows["split"].to_numpy(dtype=object),
        )
