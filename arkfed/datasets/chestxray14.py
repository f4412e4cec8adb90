"""NIH ChestX-ray14: 112,120 frontal X-rays of 30,805 patients, 14 findings mined from reports.

Read as NIH distributes it: ``Data_Entry_2017_v2020.csv`` (or the older ``Data_Entry_2017.csv``),
findings pipe-separated in ``Finding Labels`` ("No Finding" = none of the 14), the official
patient-wise split lists ``train_val_list.txt`` / ``test_list.txt`` and the images in
``images/`` or in the ``images_0XX/images/`` folders the twelve download archives unpack to.
A site's ``split_lists: DIR`` gives Ark's train/val/test instead (``Xray14_{train,val,test}_official.txt``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from arkfed.datasets import (
    CHESTXRAY14_CLASSES,
    ArkfedError,
    DatasetPlugin,
    FileDatasetOptions,
    LabelRecords,
    LabelSchema,
    SplitListFormat,
    find_label_file,
    list_files,
    locate_images,
    make_meta,
    read_csv,
    register_dataset,
    require_columns,
)

LABEL_FILE_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NO_FINDING = "No Finding"
FINDINGS = "Finding Labels"
IMAGE = "Image Index"
COLUMNS = (IMAGE, FINDINGS, "Patient ID", "Patient Age", "Patient Gender", "View Position")
# Ark's lists (Ark_MICCAI2023/dataset/Xray14_{train,val,test}_official.txt): "00000001_000.png" and
# 14 0/1 columns in NIH's order, read by ChestXray14.__init__ in Ark_MICCAI2023/dataloader.py
# (line.split(), labels lineItems[1:15]); the test list is NIH's test_list.txt, train and val
# Ark's patient-wise cut of train_val_list.txt.
ARK_SPLIT_LISTS = SplitListFormat(
    files={"train": "Xray14_train_official.txt", "val": "Xray14_val_official.txt", "test": "Xray14_test_official.txt"},
    classes=CHESTXRAY14_CLASSES,
    folder="ChestXray14",
    reference="Ark_MICCAI2023/dataloader.py ChestXray14",
)


class ChestXray14Options(FileDatasetOptions):
    pass


def image_folders(root: Path) -> list[Path]:
    """``root/images`` and every ``root/images_0XX/images`` (how the NIH archives unpack)."""
    folders = [root / "images"]
    folders += sorted(p / "images" for p in root.glob("images_*") if p.is_dir())
    folders += sorted(p for p in root.glob("images_*") if p.is_dir())  # archives unpacked flat
    return folders


def read_split_list(path: Path) -> set[str] | None:
    """Image names listed one per line in an official split file; None when the file is absent."""
    if not path.is_file():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def findings_matrix(findings: pd.Series, file: Path) -> np.ndarray:
    """Pipe-separated finding names -> N x 14 matrix of 1/0; unknown names are errors with their line."""
    if findings.isna().any():
        line = int(np.flatnonzero(findings.isna().to_numpy())[0]) + 2
        raise ArkfedError(f"{file}: line {line}, column {FINDINGS!r}: empty (expected findings or {NO_FINDING!r})")
    tokens = findings.astype(str).str.split("|").explode().str.strip()
    vocabulary = (*CHESTXRAY14_CLASSES, NO_FINDING)
    codes = pd.Index(vocabulary).get_indexer(tokens)
    if (codes < 0).any():
        bad = int(np.flatnonzero(codes < 0)[0])
        raise ArkfedError(
            f"{file}: line {int(tokens.index[bad]) + 2}, column {FINDINGS!r}: unknown finding {tokens.iloc[bad]!r} "
            f"(known: {', '.join(vocabulary)})"
        )
    rows = tokens.index.to_numpy(dtype=int)
    matrix = np.zeros((len(findings), len(vocabulary)), dtype=np.float32)
    matrix[rows, codes] = 1.0
    mixed = (matrix[:, -1] == 1) & (matrix[:, :-1].sum(axis=1) > 0)
    if mixed.any():
        line = int(np.flatnonzero(mixed)[0]) + 2
        raise ArkfedError(f"{file}: line {line}, column {FINDINGS!r}: {NO_FINDING!r} together with findings")
    return matrix[:, :-1]


@register_dataset
class ChestXray14(DatasetPlugin):
    name = "chestxray14"
    description = "NIH ChestX-ray14 (Data_Entry_2017_v2020.csv, official train_val/test lists), 14 findings"
    schema = LabelSchema(task="multilabel", classes=CHESTXRAY14_CLASSES, uncertain="lsr-ones", missing="zeros")
    Options = ChestXray14Options
    split_list_format = ARK_SPLIT_LISTS

    def read_records(self, root: Path) -> LabelRecords:
        """All rows of the label file; official split from the lists (test, else the train pool)."""
        file = find_label_file(root, *LABEL_FILE_NAMES)
        frame = read_csv(file)
        require_columns(frame, COLUMNS, file)
        labels = findings_matrix(frame[FINDINGS], file)
        names = frame[IMAGE].astype(str)
        paths = locate_images(names, list_files(*image_folders(root)), root / "images")
        age = frame["Patient Age"]
        if not pd.api.types.is_numeric_dtype(age):  # older releases wrote ages as "058Y"
            age = pd.to_numeric(age.astype(str).str.extract(r"(\d+)", expand=False), errors="coerce")
        meta = make_meta(
            len(frame),
            patient_id=frame["Patient ID"].astype(str),
            sex=frame["Patient Gender"],
            age=age,
            view=frame["View Position"],
        )
        return LabelRecords(
            paths=paths,
            labels=labels,
            meta=meta,
            classes=CHESTXRAY14_CLASSES,
            source=file,
            official=self.official_split(root, names),
        )

    @staticmethod
    def official_split(root: Path, names: pd.Series) -> np.ndarray | None:
        """test_list.txt -> test; the rest (train_val_list.txt where given) -> the train pool."""
        test = read_split_list(root / "test_list.txt")
        train_val = read_split_list(root / "train_val_list.txt")
        if test is None and train_val is None:
            return None
        in_test = names.isin(test) if test is not None else ~names.isin(train_val)
        return np.where(in_test.to_numpy(), "test", "trainval").astype(object)
