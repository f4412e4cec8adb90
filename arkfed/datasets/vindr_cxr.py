"""VinDr-CXR: 18,000 adult X-rays from two Vietnamese hospitals, 28 image-level labels.

Read as PhysioNet distributes it: ``annotations/image_labels_train.csv`` (one row per image and
radiologist, three radiologists per training image), ``annotations/image_labels_test.csv`` (the
consensus of five radiologists, one row per image), images ``train/<image_id>.dicom`` and
``test/<image_id>.dicom`` (``.dcm`` and ``.png`` conversions are found too).

Labels. By default (``labels: ark``) the six Ark uses, in Ark's order: Pleural effusion (Ark's
"PE"), Lung tumor, Pneumonia, Tuberculosis, Other diseases, No finding
(``Ark_MICCAI2023/datasets_config.yaml``; "PE" was identified by matching Ark's published
``VinDrCXR_{train,test}_pe_global_one.txt`` against ``image_labels_{train,test}.csv``, which agree
on every image). ``labels: global`` is the COPD variant (the five global labels with COPD in
place of PE, plus No finding); ``labels: all`` gives all 28.

``label_file: kaggle`` reads instead the Kaggle VinBigData box file (``train.csv``: one row per
box or per "No finding" vote, with ``rad_id``), giving the 14 local lesion classes + "No finding".
Kaggle's test labels were never released, so that variant is split by image.

Training images have three readers and no consensus. ``rad_vote: majority`` (default) calls a
finding present when more than half of the image's radiologists marked it, which approximates
the test set's consensus standard and damps single-reader noise; ``rad_vote: any`` keeps every
reader's positives (more sensitive, noisier). Where this departs from Ark: Ark's training list is
``any`` (a positive from one reader is a positive; checked on all 15,000 training images), so
choose ``protocol: ark`` (or ``rad_vote: any``) to reproduce Ark's training labels exactly. Test
labels are the consensus either way. VinDr ships no patient ids: each image is its own patient for splitting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from arkfed.datasets import (
    ArkfedError,
    DatasetPlugin,
    FileDatasetOptions,
    LabelRecords,
    LabelSchema,
    ReadingProtocol,
    concat_records,
    find_label_file,
    label_matrix,
    list_files,
    locate_images,
    make_meta,
    read_csv,
    register_dataset,
    require_columns,
)

GLOBAL_LABELS = ("Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "COPD", "No finding")
# Ark's six (datasets_config.yaml: ['PE', 'Lung tumor', 'Pneumonia', 'Tuberculosis', 'Other diseases', 'No finding']).
ARK_LABELS = ("Pleural effusion", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
LOCAL_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)
ALL_LABELS = (*LOCAL_LABELS, "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
# The Kaggle competition's classes, in class_id order 0..14.
KAGGLE_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "No finding",
)
# Spellings that differ between VinDr's own files (the test file says "Other disease").
COLUMN_SPELLINGS = {"other disease": "Other diseases"}
IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")


class VinDrCxrOptions(FileDatasetOptions):
    label_file: Literal["physionet", "kaggle"] = Field(
        default="physionet", description="physionet: annotations/image_labels_{train,test}.csv; kaggle: VinBigData's train.csv boxes"
    )
    labels: Literal["ark", "global", "all"] | None = Field(
        default=None,
        description="ark (default): Ark's six (Ark_MICCAI2023/datasets_config.yaml VinDrCXR); global: the COPD variant; all: 28",
    )
    rad_vote: Literal["majority", "any"] | None = Field(
        default=None,
        description="how the three readers of a training image are combined: majority (> half; arkfed's default) or "
        "any (one reader suffices; the default under protocol: ark)",
    )
    protocol: ReadingProtocol = Field(
        default="arkfed",
        description="ark: training labels are 'any reader', as in Ark's dataset/VinDrCXR_train_pe_global_one.txt "
        "(read by VinDrCXR.__init__ in Ark_MICCAI2023/dataloader.py; it equals the any-reader vote of "
        "image_labels_train.csv on all 15,000 images), Ark's six labels from PhysioNet's files; arkfed: a majority vote",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "VinDrCxrOptions":
        if self.label_file == "kaggle" and self.labels is not None:
            raise ValueError("the Kaggle box file has only the 14 local classes + 'No finding'; drop `labels`")
        if self.protocol == "ark":
            if self.rad_vote == "majority":
                raise ValueError("protocol: ark reads any reader's positive as positive (Ark's training list); drop rad_vote: majority")
            if self.label_file != "physionet" or self.labels not in (None, "ark"):
                raise ValueError("protocol: ark reads Ark's six labels from PhysioNet's image_labels files; drop label_file / labels")
        return self

    @property
    def vote(self) -> str:
        """The reader vote in effect: the option, else any under protocol: ark, else majority."""
        return self.rad_vote or ("any" if self.protocol == "ark" else "majority")


def classes_for(options: VinDrCxrOptions) -> tuple[str, ...]:
    if options.label_file == "kaggle":
        return KAGGLE_LABELS
    return {"all": ALL_LABELS, "global": GLOBAL_LABELS}.get(options.labels or "ark", ARK_LABELS)


def vote(positive: np.ndarray, image_ids: pd.Series, rad_vote: str) -> tuple[np.ndarray, pd.Index]:
    """Per-reader 0/1 rows -> one row per image (majority: > half of its readers; any: >= 1)."""
    frame = pd.DataFrame(positive).groupby(image_ids.to_numpy(), sort=False)
    votes, readers = frame.sum(), frame.size()
    if rad_vote == "any":
        labels = votes.to_numpy() > 0
    else:
        labels = votes.to_numpy() * 2 > readers.to_numpy()[:, None]
    return labels.astype(np.float32), votes.index


def image_index(folder: Path) -> dict[str, str]:
    """image id -> file, for the suffixes VinDr images come in (DICOM first)."""
    files = list_files(folder)
    index: dict[str, str] = {}
    for suffix in reversed(IMAGE_SUFFIXES):  # earlier suffixes win
        index.update({name[: -len(suffix)]: path for name, path in files.items() if name.lower().endswith(suffix)})
    return index


def image_paths(folder: Path, image_ids: pd.Index) -> np.ndarray:
    return locate_images(pd.Series(image_ids.astype(str)), image_index(folder), folder, ".dicom")


@register_dataset
class VinDrCxr(DatasetPlugin):
    name = "vindr_cxr"
    description = "VinDr-CXR (annotations/image_labels_{train,test}.csv, 3 readers -> vote), Ark's 6 labels, the COPD variant or all 28"
    Options = VinDrCxrOptions

    def label_schema(self) -> LabelSchema:
        aliases = {"Clavicle fracture": "Fracture"} if self.options.labels == "all" else {}
        return LabelSchema(task="multilabel", classes=classes_for(self.options), uncertain="lsr-ones", missing="zeros", aliases=aliases)

    def read_records(self, root: Path) -> LabelRecords:
        if self.options.label_file == "kaggle":
            return self.read_kaggle(root)
        folder = root / "annotations"
        parts = [self.read_image_labels(find_label_file(folder, "image_labels_train.csv"), root / "train", "trainval")]
        test = find_label_file(folder, "image_labels_test.csv", required=False)
        if test is not None:
            parts.append(self.read_image_labels(test, root / "test", "test"))
        return concat_records(parts)

    def read_image_labels(self, file: Path, image_folder: Path, official: str) -> LabelRecords:
        """PhysioNet's per-reader 0/1 table -> one voted row per image."""
        frame = read_csv(file)
        frame = frame.rename(columns={c: COLUMN_SPELLINGS.get(c.strip().lower(), c.strip()) for c in frame.columns})
        classes = classes_for(self.options)
        require_columns(frame, ("image_id", *classes), file)
        positive = label_matrix(frame, classes, file, (0.0, 1.0))
        labels, image_ids = vote(positive, frame["image_id"].astype(str), self.options.vote)
        return self.records(image_folder, image_ids, labels, classes, file, official)

    def read_kaggle(self, root: Path) -> LabelRecords:
        """The Kaggle box file: one row per box or "No finding" vote -> one voted row per image."""
        file = find_label_file(root, "train.csv")
        frame = read_csv(file, usecols=lambda c: c in ("image_id", "class_name", "rad_id"))
        require_columns(frame, ("image_id", "class_name", "rad_id"), file)
        codes = pd.Index(KAGGLE_LABELS).get_indexer(frame["class_name"])
        if (codes < 0).any():
            bad = int(np.flatnonzero(codes < 0)[0])
            raise ArkfedError(
                f"{file}: line {bad + 2}, column 'class_name': unknown class {frame['class_name'].iloc[bad]!r} "
                f"(known: {', '.join(KAGGLE_LABELS)})"
            )
        # One vote per (image, reader, class): a reader drawing three nodules still votes once.
        marks = pd.DataFrame({"image": frame["image_id"].astype(str), "rad": frame["rad_id"].astype(str), "code": codes})
        per_reader = marks.drop_duplicates()
        readers = per_reader.groupby("image", sort=False)["rad"].nunique()
        votes = pd.crosstab(per_reader["image"], per_reader["code"]).reindex(
            index=readers.index, columns=range(len(KAGGLE_LABELS)), fill_value=0
        )
        if self.options.vote == "any":
            labels = votes.to_numpy() > 0
        else:
            labels = votes.to_numpy() * 2 > readers.to_numpy()[:, None]
        return self.records(root / "train", readers.index, labels.astype(np.float32), KAGGLE_LABELS, file, None)

    @staticmethod
    def records(image_folder: Path, image_ids: pd.Index, labels: np.ndarray, classes: tuple[str, ...], file: Path,
                official: str | None) -> LabelRecords:
        ids = image_ids.astype(str)
        return LabelRecords(
            paths=image_paths(image_folder, ids),
            labels=labels,
            meta=make_meta(len(ids), patient_id=ids),
            classes=classes,
            source=file,
            official=None if official is None else np.full(len(ids), official, dtype=object),
        )
