"""The generic csv plugin and CsvDatasetPlugin subclasses (what `arkfed add-dataset` writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from arkfed.data.schema import UNCERTAIN
from arkfed.datasets._csv import CsvOptions, read_csv_dataset
from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import discover_plugins, get_plugin
from arkfed.errors import ArkfedError
from arkfed.site.config import SiteConfig
from arkfed.site.load import load_site

ROWS = [  # image, patient, sex, age, pneumonia, effusion, split
    ("a/1.png", "p1", "Female", "34", "yes", "no", "train"),
    ("a/2.png", "p1", "Female", "35", "no", "", "train"),
    ("a/3.png", "p2", "male", "61", "maybe", "yes", "valid"),
    ("b/4.png", "p3", "M", "", "no", "no", "test"),
    ("b/5.png", "p4", "F", "70", "YES", "no", "Train"),
    ("b/6.png", "p5", "", "55", "no", "maybe", "test"),
]
OPTIONS = {
    "file": "labels.csv",
    "image_column": "image",
    "image_dir": "png",
    "label_columns": ["pneumonia", "effusion"],
    "classes": ["Pneumonia", "Pleural Effusion"],
    "positive_values": ["yes"],
    "negative_values": ["no"],
    "uncertain_values": ["maybe"],
    "patient_column": "patient",
    "sex_column": "sex",
    "age_column": "age",
}


def plugin(**options):
    return get_plugin("csv")({**OPTIONS, **options})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    frame = pd.DataFrame(ROWS, columns=["image", "patient", "sex", "age", "pneumonia", "effusion", "split"])
    frame.to_csv(tmp_path / "labels.csv", index=False)
    for i, image in enumerate(frame["image"]):
        path = tmp_path / "png" / image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 30 * i, dtype=np.uint8)).save(path)
    return tmp_path


def test_values_are_mapped_and_metadata_attached(root: Path):
    records = plugin().read_records(root)
    expected = np.array(
        [[1, 0], [0, np.nan], [UNCERTAIN, 1], [0, 0], [1, 0], [0, UNCERTAIN]], dtype=np.float32
    )
    np.testing.assert_array_equal(records.labels, expected)
    assert records.classes == ("Pneumonia", "Pleural Effusion")
    assert list(records.meta["sex"].fillna("?")) == ["F", "F", "M", "M", "F", "?"]
    assert records.meta["age"][0] == 34 and np.isnan(records.meta["age"][3])
    assert records.paths[3] == str(root / "png" / "b/4.png")
    schema = plugin().label_schema()
    assert schema.task == "multilabel" and schema.canonical("Pleural Effusion") == "Pleural Effusion"


def test_split_column_is_official(root: Path):
    splits = plugin(split_column="split").read(root, SplitConfig())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    assert set(splits["test"].meta["patient_id"]) == {"p3", "p5"}


def test_patient_split_keeps_patients_whole(root: Path):
    splits = read_csv_dataset(root, SplitConfig(val_fraction=0.3, test_fraction=0.3, seed=5), CsvOptions(**OPTIONS))
    owner = {}
    for name, table in splits.items():
        for pid in table.meta["patient_id"]:
            assert owner.setdefault(pid, name) == name
    assert sum(len(t) for t in splits.values()) == len(ROWS)


def test_single_column_of_class_names_for_multiclass(root: Path):
    frame = pd.read_csv(root / "labels.csv", dtype=str)
    frame["finding"] = ["normal", "Pneumonia", "other", "normal", "", "pneumonia"]
    frame.to_csv(root / "labels.csv", index=False)
    p = plugin(task="multiclass", label_columns=["finding"], classes=["Normal", "Pneumonia", "Other"])
    labels = p.read_records(root).labels
    assert labels.shape == (6, 3)
    np.testing.assert_array_equal(labels[[0, 1, 2, 5]].argmax(axis=1), [0, 1, 2, 1])
    assert np.isnan(labels[4]).all()
    frame.loc[3, "finding"] = "nodule"
    frame.to_csv(root / "labels.csv", index=False)
    with pytest.raises(ArkfedError, match=r"labels.csv: line 5, column 'finding': 'nodule' is not one of the classes"):
        p.read_records(root)


def test_out_of_schema_value_names_line_and_column(root: Path):
    frame = pd.read_csv(root / "labels.csv", dtype=str)
    frame.loc[4, "effusion"] = "probably"
    frame.to_csv(root / "labels.csv", index=False)
    with pytest.raises(ArkfedError, match=r"labels.csv: line 6, column 'effusion': label value 'probably' is outside the schema"):
        plugin().read_records(root)


def test_missing_column_image_and_bad_split_are_named(root: Path):
    with pytest.raises(ArkfedError, match=r"labels.csv: missing column\(s\) \['view'\]"):
        plugin(view_column="view").read_records(root)
    frame = pd.read_csv(root / "labels.csv", dtype=str)
    frame.loc[2, "split"] = "holdout"
    frame.to_csv(root / "labels.csv", index=False)
    with pytest.raises(ArkfedError, match=r"labels.csv: line 4, column 'split': 'holdout' is not train, val or test"):
        plugin(split_column="split").read_records(root)
    (root / "png" / "b" / "5.png").unlink()
    with pytest.raises(ArkfedError, match=r"labels.csv: 1 of 6 listed image files are missing, first .*b/5.png"):
        plugin().read(root, SplitConfig())
    assert sum(len(t) for t in plugin(missing_images="drop").read(root, SplitConfig()).values()) == 5


def test_inconsistent_options_are_rejected():
    with pytest.raises(ArkfedError, match="option"):
        plugin(classes=["only one"])
    with pytest.raises(ArkfedError, match="option"):
        plugin(task="binary")
    with pytest.raises(ArkfedError, match="option 'file'"):
        get_plugin("csv")({})


SCAFFOLDED = '''
from arkfed.datasets._csv import CsvDatasetPlugin, CsvOptions
from arkfed.datasets._plugin import register_dataset
from arkfed.data.schema import TaskType


class Options(CsvOptions):
    file: str = "labels.csv"
    image_column: str = "image"
    image_dir: str = "png"
    label_columns: list[str] = ["pneumonia"]
    task: TaskType = "binary"
    positive_values: list = ["yes"]
    negative_values: list = ["no"]
    uncertain_values: list = ["maybe"]
    patient_column: str | None = "patient"


@register_dataset
class Scaffolded(CsvDatasetPlugin):
    name = "scaffolded_csv"
    Options = Options
'''


def test_a_subclass_with_default_options_is_a_working_plugin(root: Path, tmp_path_factory):
    """What `arkfed add-dataset` writes: a plugin file subclassing CsvDatasetPlugin with default options."""
    folder = tmp_path_factory.mktemp("user_plugins")
    (folder / "scaffolded_csv.py").write_text(SCAFFOLDED)
    config = SiteConfig(name="scaffolded", dataset="scaffolded_csv", root=root, labels={"uncertain": "ones"})
    site = load_site(config, plugins_dirs=[folder])
    assert site.schema.task == "binary" and site.schema.classes == ("pneumonia",) and site.schema.uncertain == "ones"
    labels = np.concatenate([t.labels for t in site.splits.values()])
    assert sorted(labels[:, 0].tolist()) == sorted([1.0, 0.0, UNCERTAIN, 0.0, 1.0, 0.0])
    assert "scaffolded_csv" not in discover_plugins().plugins  # a folder's plugins do not leak into later discoveries
