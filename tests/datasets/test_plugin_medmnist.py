"""The medmnist plugin on the real PneumoniaMNIST file, and a small ChestMNIST-shaped file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arkfed.data.findings import CHESTXRAY14_CLASSES
from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError
from arkfed.site.load import load_site

REPO = Path(__file__).resolve().parents[2]


def plugin(**options):
    return get_plugin("medmnist")(options)


def test_real_pneumoniamnist_keeps_official_splits(shared_data: Path):
    root = shared_data / "medmnist"
    splits = plugin().read(root, SplitConfig())
    with np.load(root / "pneumoniamnist.npz") as raw:
        for name in ("train", "val", "test"):
            assert len(splits[name]) == len(raw[f"{name}_images"])
            np.testing.assert_array_equal(splits[name].labels[:, 0], raw[f"{name}_labels"].ravel())
        np.testing.assert_array_equal(splits["test"].images.read(7), raw["test_images"][7])
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3882, 524, 624]
    assert splits["test"].classes == ("Pneumonia",)
    assert 0.5 < splits["test"].labels.mean() < 0.75  # PneumoniaMNIST's test set is 62.5 % pneumonia
    assert splits["train"].images.read(0).shape == (28, 28)


def test_the_shipped_pneumoniamnist_site_loads(shared_data: Path):
    site = load_site(REPO / "sites" / "pneumoniamnist.yaml")
    assert site.schema.task == "binary" and site.schema.classes == ("Pneumonia",)
    assert len(site.split("test")) == 624


def write_npz(path: Path, columns: int, bad_value: bool = False) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n in (("train", 12), ("val", 4), ("test", 5)):
        arrays[f"{name}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{name}_labels"] = rng.integers(0, 2, size=(n, columns), dtype=np.uint8)
    if bad_value:
        arrays["val_labels"][2, 3] = 2
    np.savez(path, **arrays)


def test_chestmnist_is_multilabel_with_the_nih_classes(tmp_path: Path):
    write_npz(tmp_path / "chestmnist.npz", 14)
    p = plugin(flag="chestmnist")
    assert p.label_schema().task == "multilabel" and p.label_schema().classes == CHESTXRAY14_CLASSES
    splits = p.read(tmp_path, SplitConfig())
    assert splits["train"].labels.shape == (12, 14)


def test_bad_inputs_are_named(tmp_path: Path):
    with pytest.raises(ArkfedError, match=r"unknown MedMNIST flag 'pathmnist'; supported: chestmnist, pneumoniamnist"):
        plugin(flag="pathmnist")
    with pytest.raises(ArkfedError, match=r"MedMNIST file not found: .*chestmnist.npz"):
        plugin(flag="chestmnist").read(tmp_path, SplitConfig())
    write_npz(tmp_path / "chestmnist.npz", 14, bad_value=True)
    with pytest.raises(ArkfedError, match=r"chestmnist.npz:val_labels: line 2, column 'Infiltration': label value 2"):
        plugin(flag="chestmnist").read(tmp_path, SplitConfig())
    write_npz(tmp_path / "chestmnist.npz", 3)
    with pytest.raises(ArkfedError, match=r"chestmnist.npz: train_labels has 3 columns, the schema has 14"):
        plugin(flag="chestmnist").read(tmp_path, SplitConfig())
