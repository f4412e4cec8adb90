"""Shenzhen Hospital tuberculosis set (NLM): 662 PNG X-rays, 336 with tuberculosis.

Read as the NLM distributes it: ``CXR_png/CHNCXR_0001_0.png`` (the final digit is the label,
1 = tuberculosis) and ``ClinicalReadings/CHNCXR_0001_0.txt``, whose first non-empty line gives
sex and age ("male 45yrs", "Female 35 yrs"). Readings are free text written by hand, so an
unparsable or missing reading leaves sex/age missing rather than failing the site. There is no
official split and each image is one patient, so the split is by image, unless a site's
``split_lists: DIR`` gives Ark's (``ShenzenCXR_{train,valid,test}_data.txt``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from arkfed.datasets import (
    ArkfedError,
    DatasetPlugin,
    FileDatasetOptions,
    LabelRecords,
    LabelSchema,
    SplitListFormat,
    list_files,
    make_meta,
    register_dataset,
)

IMAGE_NAME = re.compile(r"^(CHNCXR_\d+)_([01])\.png$", re.IGNORECASE)
SEX_WORD = re.compile(r"\b(male|female|m|f)\b", re.IGNORECASE)
AGE = re.compile(r"(\d+)\s*(month|day)?", re.IGNORECASE)
# Ark's lists (Ark_MICCAI2023/dataset/ShenzenCXR_{train,valid,test}_data.txt, Ark's spelling):
# "CHNCXR_0001_0.png,0", read by ShenzhenCXR.__init__ in Ark_MICCAI2023/dataloader.py
# (line.split(','), labels lineItems[1:2]).
ARK_SPLIT_LISTS = SplitListFormat(
    files={"train": "ShenzenCXR_train_data.txt", "val": "ShenzenCXR_valid_data.txt", "test": "ShenzenCXR_test_data.txt"},
    classes=("Tuberculosis",),
    separator=",",
    folder="Shenzhen",
    reference="Ark_MICCAI2023/dataloader.py ShenzhenCXR",
)


class ShenzhenOptions(FileDatasetOptions):
    pass


def parse_reading(text: str) -> tuple[str | None, float]:
    """(sex word, age) from a clinical reading's first non-empty line; missing parts are None/NaN."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    sex = SEX_WORD.search(line)
    age = AGE.search(line)
    if age is None:
        return (sex.group(1) if sex else None), float("nan")
    unit = (age.group(2) or "").lower()
    years = float(age.group(1)) / (12 if unit == "month" else 365 if unit == "day" else 1)
    return (sex.group(1) if sex else None), years


def read_reading(folder: Path, stem: str) -> tuple[str | None, float]:
    path = folder / f"{stem}.txt"
    try:
        return parse_reading(path.read_text(errors="replace"))
    except OSError:
        return None, float("nan")


@register_dataset
class Shenzhen(DatasetPlugin):
    name = "shenzhen"
    description = "Shenzhen tuberculosis set (CXR_png/CHNCXR_XXXX_{0,1}.png + ClinicalReadings), binary Tuberculosis"
    schema = LabelSchema(task="binary", classes=("Tuberculosis",), uncertain="lsr-ones", missing="zeros")
    Options = ShenzhenOptions
    split_list_format = ARK_SPLIT_LISTS

    def read_records(self, root: Path) -> LabelRecords:
        """One row per CHNCXR image in CXR_png (other files, e.g. Thumbs.db, are ignored)."""
        folder = root / "CXR_png"
        if not folder.is_dir():
            raise ArkfedError(f"image folder not found: {folder} (expected CXR_png/CHNCXR_XXXX_0.png and _1.png)")
        files = pd.Series(list_files(folder), dtype=object).sort_index()
        parsed = files.index.to_series().str.extract(IMAGE_NAME)
        parsed = parsed[parsed[0].notna()]
        if parsed.empty:
            raise ArkfedError(f"{folder}: no images named CHNCXR_XXXX_0.png / CHNCXR_XXXX_1.png")
        stems = (parsed[0] + "_" + parsed[1]).tolist()
        readings = root / "ClinicalReadings"
        sex, age = zip(*(read_reading(readings, stem) for stem in stems))
        return LabelRecords(
            paths=files[parsed.index].to_numpy(dtype=object),
            labels=parsed[1].astype(int).to_numpy(dtype=np.float32)[:, None],
            meta=make_meta(len(stems), patient_id=parsed[0].tolist(), sex=sex, age=age),
            classes=("Tuberculosis",),
            source=folder,
        )
