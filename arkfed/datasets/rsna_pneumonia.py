"""RSNA Pneumonia Detection Challenge: 26,684 X-rays (one per patientId), three classes.

Read as Kaggle distributes it: ``stage_2_train_labels.csv`` (patientId, box, Target; one row
per box) and ``stage_2_detailed_class_info.csv`` (patientId, class in "Lung Opacity", "Normal",
"No Lung Opacity / Not Normal"), images ``stage_2_train_images/<patientId>.dcm``. The two files
must agree (Target 1 exactly when the class is "Lung Opacity"). Each patientId is one image of one
patient, so the split is by patientId. ``read_dicom_metadata: true`` reads sex, age and view from
the DICOM headers (headers only, no pixels) of the images kept. A site's ``split_lists: DIR``
gives Ark's split instead: its ``RSNAPneumonia_{train,val,test}.txt`` (PNG names are matched to
the DICOMs by patientId; each listed class must agree with the Kaggle files).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from arkfed.datasets import (
    ArkfedError,
    DatasetPlugin,
    DatasetTable,
    FileDatasetOptions,
    LabelRecords,
    LabelSchema,
    SplitConfig,
    SplitListFormat,
    find_label_file,
    make_meta,
    present_images,
    read_csv,
    register_dataset,
    require_columns,
    split_records,
)

CLASSES = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")
OPACITY = "Lung Opacity"
IMAGE_FOLDER = "stage_2_train_images"
# Ark's lists (Ark_MICCAI2023/dataset/RSNAPneumonia_{train,val,test}.txt): "<patientId>.png <class>",
# read by RSNAPneumonia.__init__ in Ark_MICCAI2023/dataloader.py (one-hot at int(lineItems[-1])), the
# class index counting datasets_config.yaml's ['Normal', 'No Lung Opacity/Not Normal', 'Lung Opacity'].
ARK_SPLIT_LISTS = SplitListFormat(
    files={"train": "RSNAPneumonia_train.txt", "val": "RSNAPneumonia_val.txt", "test": "RSNAPneumonia_test.txt"},
    classes=("Normal", "No Lung Opacity / Not Normal", "Lung Opacity"),
    labels="index",
    folder="RSNA",
    reference="Ark_MICCAI2023/dataloader.py RSNAPneumonia",
)


class RsnaPneumoniaOptions(FileDatasetOptions):
    read_dicom_metadata: bool = Field(
        default=False, description="read sex, age and view from the DICOM headers of the images kept (no pixels)"
    )


def first_line(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 2


def per_patient(frame: pd.DataFrame, column: str, file: Path) -> pd.Series:
    """One value of ``column`` per patientId; a patient given two different values is an error."""
    values = frame.groupby("patientId", sort=False)[column]
    conflicting = values.nunique(dropna=False) > 1
    if conflicting.any():
        patient = conflicting.index[np.argmax(conflicting.to_numpy())]
        line = first_line((frame["patientId"] == patient).to_numpy() & (frame[column] != values.first()[patient]).to_numpy())
        raise ArkfedError(f"{file}: line {line}, column {column!r}: patientId {patient} has conflicting values")
    return values.first()


def dicom_metadata(paths: np.ndarray) -> pd.DataFrame:
    """PatientSex, PatientAge and ViewPosition from the DICOM headers (pixels are not read)."""
    import pydicom

    rows = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise ArkfedError(f"cannot read DICOM header of {path}: {type(exc).__name__}: {exc}") from exc
        rows.append((ds.get("PatientSex"), ds.get("PatientAge"), ds.get("ViewPosition")))
    frame = pd.DataFrame(rows, columns=["sex", "age", "view"], dtype=object)
    frame["age"] = pd.to_numeric(frame["age"].astype(str).str.extract(r"(\d+)", expand=False), errors="coerce")
    return frame


@register_dataset
class RsnaPneumonia(DatasetPlugin):
    name = "rsna_pneumonia"
    description = "RSNA Pneumonia (stage_2_train_labels.csv + stage_2_detailed_class_info.csv), 3 classes, DICOM"
    schema = LabelSchema(task="multiclass", classes=CLASSES, uncertain="lsr-ones", missing="zeros")
    Options = RsnaPneumoniaOptions
    split_list_format = ARK_SPLIT_LISTS

    def read_records(self, root: Path) -> LabelRecords:
        """One row per patientId with a one-hot class, after checking the two label files agree."""
        boxes_file = find_label_file(root, "stage_2_train_labels.csv")
        boxes = read_csv(boxes_file, dtype={"patientId": str})
        require_columns(boxes, ("patientId", "Target"), boxes_file)
        bad = ~boxes["Target"].isin([0, 1]).to_numpy()
        if bad.any():
            line = first_line(bad)
            raise ArkfedError(f"{boxes_file}: line {line}, column 'Target': {boxes['Target'].iloc[line - 2]} is not 0 or 1")
        target = per_patient(boxes, "Target", boxes_file)

        class_file = find_label_file(root, "stage_2_detailed_class_info.csv")
        info = read_csv(class_file, dtype={"patientId": str, "class": str})
        require_columns(info, ("patientId", "class"), class_file)
        codes = pd.Index(CLASSES).get_indexer(info["class"].str.strip())
        if (codes < 0).any():
            line = first_line(codes < 0)
            raise ArkfedError(f"{class_file}: line {line}, column 'class': {info['class'].iloc[line - 2]!r} is not one of {list(CLASSES)}")
        info = info.assign(code=codes)
        code = per_patient(info, "code", class_file)

        missing = ~target.index.isin(code.index)
        if missing.any():
            raise ArkfedError(f"{class_file}: no class for patientId {target.index[np.argmax(missing)]} (listed in {boxes_file.name})")
        code = code.reindex(target.index)
        disagree = (target.to_numpy() == 1) != (code.to_numpy() == CLASSES.index(OPACITY))
        if disagree.any():
            patient = target.index[np.argmax(disagree)]
            line = first_line((info["patientId"] == patient).to_numpy())
            raise ArkfedError(
                f"{class_file}: line {line}: patientId {patient} has class {CLASSES[code[patient]]!r} but Target "
                f"{target[patient]} in {boxes_file.name} (Target 1 means {OPACITY!r})"
            )
        labels = np.eye(len(CLASSES), dtype=np.float32)[code.to_numpy()]
        ids = pd.Series(target.index.astype(str), dtype=object)
        paths = str(root / IMAGE_FOLDER) + os.sep + ids + ".dcm"
        return LabelRecords(
            paths=paths.to_numpy(dtype=object),
            labels=labels,
            meta=make_meta(len(ids), patient_id=ids),
            classes=CLASSES,
            source=boxes_file,
        )

    def read(self, root: Path, split: SplitConfig) -> dict[str, DatasetTable]:
        records = self.read_split_records(root, split)
        keep = present_images(records.paths, self.options.missing_images, records.source)
        records = records.subset(keep)
        if self.options.read_dicom_metadata:
            header = dicom_metadata(records.paths)
            meta = make_meta(len(records), patient_id=records.meta["patient_id"], sex=header["sex"], age=header["age"], view=header["view"])
            records = replace(records, meta=meta)
        return split_records(records, split)
