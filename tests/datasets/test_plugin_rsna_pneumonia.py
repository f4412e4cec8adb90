"""The rsna_pneumonia plugin on the real stage_2_train_labels.csv and a real RSNA DICOM as stand-in image.

The detailed-class file is not among the real files, so it is generated consistently with
Target (Target 1 -> "Lung Opacity"; Target 0 alternates the two other classes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError

LABEL_FILE = "kaggle_stage_2_train_labels.csv.zip"
CLASSES = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")


def plugin(**options):
    return get_plugin("rsna_pneumonia")(options)


@pytest.fixture(scope="module")
def boxes(label_files: Path) -> pd.DataFrame:
    return pd.read_csv(label_files / LABEL_FILE)


def class_info(boxes: pd.DataFrame) -> pd.DataFrame:
    target = boxes.groupby("patientId", sort=False)["Target"].first()
    other = np.where(np.arange(len(target)) % 2 == 0, "Normal", "No Lung Opacity / Not Normal")
    by_patient = dict(zip(target.index, np.where(target.to_numpy() == 1, "Lung Opacity", other)))
    return pd.DataFrame({"patientId": boxes["patientId"], "class": boxes["patientId"].map(by_patient)})


@pytest.fixture
def root(label_files: Path, boxes: pd.DataFrame, tmp_path: Path) -> Path:
    (tmp_path / "stage_2_train_labels.csv.zip").symlink_to(label_files / LABEL_FILE)
    class_info(boxes).to_csv(tmp_path / "stage_2_detailed_class_info.csv", index=False)
    return tmp_path


def test_real_labels_give_one_row_per_patient(root: Path, boxes: pd.DataFrame):
    records = plugin().read_records(root)
    assert len(boxes) == 30_227
    assert len(records) == boxes["patientId"].nunique() == 26_684
    assert records.classes == CLASSES
    np.testing.assert_array_equal(records.labels.sum(axis=1), 1.0)  # one class per image
    opacity = records.labels[:, CLASSES.index("Lung Opacity")] == 1
    target = boxes.groupby("patientId")["Target"].max()
    assert opacity.sum() == target.sum()
    assert 0.15 < opacity.mean() < 0.3
    ids = pd.Series(records.meta["patient_id"].to_numpy())
    np.testing.assert_array_equal(opacity, ids.map(target).to_numpy() == 1)


def test_split_by_patient_with_a_real_dicom(root: Path, boxes: pd.DataFrame, shared_data: Path):
    dicom = next((shared_data / "samples").glob("*.dcm"))
    patients = boxes["patientId"].drop_duplicates().iloc[:12]
    (root / "stage_2_train_images").mkdir()
    for pid in patients:
        shutil.copy(dicom, root / "stage_2_train_images" / f"{pid}.dcm")
    splits = plugin(missing_images="drop", read_dicom_metadata=True).read(root, SplitConfig(val_fraction=0.25, test_fraction=0.25))
    assert sum(len(t) for t in splits.values()) == 12
    seen = [set(t.meta["patient_id"]) for t in splits.values()]
    assert set.union(*seen) == set(patients) and sum(map(len, seen)) == 12
    header = pydicom.dcmread(dicom, stop_before_pixels=True)
    meta = pd.concat([t.meta for t in splits.values()])
    assert set(meta["sex"]) == {header.PatientSex}
    assert set(meta["age"]) == {float(header.PatientAge)}
    assert set(meta["view"]) == {header.ViewPosition}
    table = next(t for t in splits.values() if len(t))
    image = table.images.read(0)
    assert image.ndim == 2 and image.dtype == np.uint8 and image.std() > 0
    with pytest.raises(ArkfedError, match=r"stage_2_train_labels.csv.zip: 26672 of 26684 listed image files are missing, first .*\.dcm"):
        plugin().read(root, SplitConfig())


def test_class_disagreeing_with_target_names_patient_and_line(root: Path, boxes: pd.DataFrame):
    info = class_info(boxes)
    row = int(np.flatnonzero((boxes["Target"] == 1).to_numpy())[0])
    pid = info["patientId"][row]
    info.loc[info["patientId"] == pid, "class"] = "Normal"
    info.to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    expected = rf"stage_2_detailed_class_info.csv: line {row + 2}: patientId {pid} has class 'Normal' but Target 1"
    with pytest.raises(ArkfedError, match=expected):
        plugin().read_records(root)


def test_unknown_class_and_missing_column(root: Path, boxes: pd.DataFrame):
    info = class_info(boxes)
    info.loc[5, "class"] = "Pneumonia"
    info.to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    with pytest.raises(ArkfedError, match=r"stage_2_detailed_class_info.csv: line 7, column 'class': 'Pneumonia'"):
        plugin().read_records(root)
    info.drop(columns=["class"]).to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    with pytest.raises(ArkfedError, match=r"stage_2_detailed_class_info.csv: missing column\(s\) \['class'\]"):
        plugin().read_records(root)


def test_bad_target_names_line(tmp_path: Path, boxes: pd.DataFrame):
    bad = boxes.head(20).copy()
    bad.loc[3, "Target"] = 2
    bad.to_csv(tmp_path / "stage_2_train_labels.csv", index=False)
    class_info(boxes.head(20)).to_csv(tmp_path / "stage_2_detailed_class_info.csv", index=False)
    with pytest.raises(ArkfedError, match=r"stage_2_train_labels.csv: line 5, column 'Target': 2 is not 0 or 1"):
        plugin().read_records(tmp_path)
