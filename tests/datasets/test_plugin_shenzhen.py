"""The shenzhen plugin on a small set written in the NLM layout (CXR_png/ + ClinicalReadings/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError

# image stem -> clinical reading text (None: no reading file), in the spellings the NLM files use
READINGS = {
    "CHNCXR_0001_0": "male 45yrs\nnormal\n",
    "CHNCXR_0002_0": "\n  Female 35 yrs \nnormal",
    "CHNCXR_0003_1": "female  24yrs\n\nPTB in the left upper field\n",
    "CHNCXR_0004_1": "male 10month\nmiliary TB",
    "CHNCXR_0005_1": "illegible scan of the form",
    "CHNCXR_0006_0": None,
    "CHNCXR_0007_1": "Male, 63Y\nsecondary PTB",
    "CHNCXR_0008_0": "female 7yrs",
}
EXPECTED = {  # stem -> (sex, age)
    "CHNCXR_0001_0": ("M", 45.0),
    "CHNCXR_0002_0": ("F", 35.0),
    "CHNCXR_0003_1": ("F", 24.0),
    "CHNCXR_0004_1": ("M", 10 / 12),
    "CHNCXR_0005_1": (None, None),
    "CHNCXR_0006_0": (None, None),
    "CHNCXR_0007_1": ("M", 63.0),
    "CHNCXR_0008_0": ("F", 7.0),
}


def plugin(**options):
    return get_plugin("shenzhen")(options)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "CXR_png").mkdir()
    (tmp_path / "ClinicalReadings").mkdir()
    for i, (stem, text) in enumerate(READINGS.items()):
        Image.fromarray(np.full((16, 16), 40 + 20 * i, dtype=np.uint8)).save(tmp_path / "CXR_png" / f"{stem}.png")
        if text is not None:
            (tmp_path / "ClinicalReadings" / f"{stem}.txt").write_text(text)
    (tmp_path / "CXR_png" / "Thumbs.db").write_bytes(b"\0")  # as found in the NLM archive
    return tmp_path


def test_labels_from_file_names_and_sex_age_from_readings(root: Path):
    records = plugin().read_records(root)
    assert len(records) == len(READINGS)
    assert records.classes == ("Tuberculosis",)
    for i, path in enumerate(records.paths):
        stem = Path(path).stem
        assert records.labels[i, 0] == float(stem.endswith("_1"))
        sex, age = EXPECTED[stem]
        assert (records.meta["sex"][i] if isinstance(records.meta["sex"][i], str) else None) == sex
        if age is None:
            assert np.isnan(records.meta["age"][i])
        else:
            assert records.meta["age"][i] == pytest.approx(age)
        assert records.meta["patient_id"][i] == stem[:-2]


def test_split_by_patient_covers_every_image_once(root: Path):
    splits = plugin().read(root, SplitConfig(val_fraction=0.25, test_fraction=0.25, seed=4))
    ids = [pid for t in splits.values() for pid in t.meta["patient_id"]]
    assert sorted(ids) == sorted(stem[:-2] for stem in READINGS)
    assert splits["train"].images.read(0).shape == (16, 16)
    same = plugin().read(root, SplitConfig(val_fraction=0.25, test_fraction=0.25, seed=4))
    assert list(same["test"].meta["patient_id"]) == list(splits["test"].meta["patient_id"])  # deterministic


def test_missing_image_folder_is_named(tmp_path: Path):
    with pytest.raises(ArkfedError, match=r"image folder not found: .*CXR_png"):
        plugin().read_records(tmp_path)
    (tmp_path / "CXR_png").mkdir()
    (tmp_path / "CXR_png" / "scan.png").write_bytes(b"")
    with pytest.raises(ArkfedError, match=r"CXR_png: no images named CHNCXR_XXXX_0.png"):
        plugin().read_records(tmp_path)
