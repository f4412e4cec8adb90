"""The chexpert plugin on Stanford's real CheXpert-v1.0-small/train.csv, with stand-in images for a few rows."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from arkfed.data.findings import CHEXPERT_CLASSES
from arkfed.data.schema import UNCERTAIN
from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError

LABEL_FILE = "chexpert_train.csv.gz"
FOLDER = "CheXpert-v1.0-small"


def plugin(**options):
    return get_plugin("chexpert")(options)


def write_jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 100, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def raw(label_files: Path) -> pd.DataFrame:
    return pd.read_csv(label_files / LABEL_FILE)


@pytest.fixture(scope="module")
def full_root(label_files: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chexpert_full")
    (root / FOLDER).mkdir()
    (root / FOLDER / "train.csv.gz").symlink_to(label_files / LABEL_FILE)
    return root


@pytest.fixture(scope="module")
def all_views(full_root: Path):
    return plugin(views="all").read_records(full_root)


def test_real_train_csv_is_read_whole(all_views, raw):
    assert len(all_views) == len(raw) == 223_414
    assert all_views.classes == CHEXPERT_CLASSES
    assert all_views.meta["patient_id"].nunique() == 64_540
    values = all_views.labels
    assert set(np.unique(values[~np.isnan(values)])) == {0.0, 1.0, UNCERTAIN}
    assert (values == UNCERTAIN).sum() > 100_000  # CheXpert's hallmark: many uncertain labels
    assert np.isnan(values).mean() > 0.5  # and most entries unmentioned (blank)
    effusion = (values[:, CHEXPERT_CLASSES.index("Pleural Effusion")] == 1).mean()
    assert 0.3 < effusion < 0.45
    assert set(all_views.meta["sex"].dropna()) == {"M", "F"}
    assert all_views.meta["sex"].isna().sum() == (raw["Sex"] == "Unknown").sum()


def test_labels_follow_the_file_line_by_line(all_views, label_files: Path):
    with gzip.open(label_files / LABEL_FILE, "rt") as f:
        reader = csv.reader(f)
        header = next(reader)
        lines = [next(reader) for _ in range(50)]
    first = header.index("No Finding")
    for i, line in enumerate(lines):
        expected = [float(v) if v else np.nan for v in line[first:]]
        np.testing.assert_array_equal(all_views.labels[i], np.array(expected, dtype=np.float32))
        assert all_views.meta["patient_id"][i] == line[0].split("/")[2]
        assert all_views.paths[i].endswith(line[0].removeprefix(FOLDER))


def test_frontal_is_the_default_view(full_root: Path, raw):
    frontal = plugin().read_records(full_root)
    assert len(frontal) == (raw["Frontal/Lateral"] == "Frontal").sum()
    assert set(frontal.meta["view"].dropna()) <= {"AP", "PA", "LL", "RL"}


@pytest.fixture(scope="module")
def first_patients(raw: pd.DataFrame) -> pd.DataFrame:
    """The real train.csv rows of its first 15 patients."""
    head = raw.head(200)
    patients = head["Path"].str.split("/").str[2]
    return head[patients.isin(patients.drop_duplicates().iloc[:15])]


@pytest.fixture
def site(raw: pd.DataFrame, first_patients: pd.DataFrame, tmp_path: Path) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """Real train rows of the first 15 patients; a valid.csv of real label rows moved to valid/."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    train = first_patients
    valid = raw.iloc[1000:1008].copy()
    valid["Path"] = [f"{FOLDER}/valid/patient{64541 + i // 2}/study1/view{1 + i % 2}_frontal.jpg" for i in range(len(valid))]
    valid["Frontal/Lateral"] = "Frontal"
    train.to_csv(folder / "train.csv", index=False)
    valid.to_csv(folder / "valid.csv", index=False)
    for path in pd.concat([train, valid])["Path"]:
        write_jpg(tmp_path / path)
    return tmp_path, train, valid


def test_valid_csv_is_test_and_train_is_split_by_patient(site):
    root, train, valid = site
    splits = plugin(views="all").read(root, SplitConfig(val_fraction=0.3, seed=2))
    assert len(splits["test"]) == len(valid)
    assert set(splits["test"].meta["patient_id"]) == {f"patient{64541 + i}" for i in range(4)}
    np.testing.assert_array_equal(splits["test"].labels, valid[list(CHEXPERT_CLASSES)].to_numpy(np.float32))
    assert len(splits["train"]) + len(splits["val"]) == len(train)
    assert len(splits["val"]) > 0
    assert not set(splits["train"].meta["patient_id"]) & set(splits["val"].meta["patient_id"])
    assert splits["test"].images.read(0).shape == (16, 16)


def test_root_may_be_the_dataset_folder_itself(site):
    root, train, valid = site
    splits = plugin().read(root / FOLDER, SplitConfig())
    expected = (train["Frontal/Lateral"] == "Frontal").sum() + len(valid)
    assert sum(len(t) for t in splits.values()) == expected


def test_out_of_schema_value_names_line_and_column(site):
    root, train, _ = site
    bad = train.copy()
    bad.iloc[4, bad.columns.get_loc("Edema")] = 2.0
    bad.to_csv(root / FOLDER / "train.csv", index=False)
    with pytest.raises(ArkfedError, match=r"train.csv: line 6, column 'Edema': label value 2 is outside the schema"):
        plugin().read_records(root)
    bad = bad.astype({"Edema": object})
    bad.iloc[4, bad.columns.get_loc("Edema")] = "yes"
    bad.to_csv(root / FOLDER / "train.csv", index=False)
    with pytest.raises(ArkfedError, match=r"train.csv: line 6, column 'Edema': label value 'yes' is not a number"):
        plugin().read_records(root)


def test_missing_column_names_column_and_file(site):
    root, train, _ = site
    train.drop(columns=["Pleural Other"]).to_csv(root / FOLDER / "train.csv", index=False)
    with pytest.raises(ArkfedError, match=r"train.csv: missing column\(s\) \['Pleural Other'\]"):
        plugin().read_records(root)


def test_missing_image_is_named_with_its_label_file(site):
    root, _, valid = site
    gone = root / valid["Path"].iloc[3]
    gone.unlink()
    with pytest.raises(ArkfedError, match=rf"valid.csv: 1 of \d+ listed image files are missing, first {gone}"):
        plugin().read(root, SplitConfig())
    splits = plugin(missing_images="drop").read(root, SplitConfig())
    assert len(splits["test"]) == len(valid) - 1


def test_dataset_folder_not_found_is_named(tmp_path: Path):
    with pytest.raises(ArkfedError, match="CheXpert train.csv not found"):
        plugin().read_records(tmp_path)


def phantom_csv(rows: list[tuple[str, str, list[float]]]) -> pd.DataFrame:
    """Rows in Stanford's column layout: (path, Frontal/Lateral, 14 labels)."""
    frame = pd.DataFrame([labels for _, _, labels in rows], columns=list(CHEXPERT_CLASSES))
    frame.insert(0, "AP/PA", [("AP" if view == "Frontal" else np.nan) for _, view, _ in rows])
    frame.insert(0, "Frontal/Lateral", [view for _, view, _ in rows])
    frame.insert(0, "Age", 60)
    frame.insert(0, "Sex", "Female")
    frame.insert(0, "Path", [path for path, _, _ in rows])
    return frame


@pytest.fixture
def phantom(tmp_path: Path) -> Path:
    """A phantom CheXpert: 4 train images; valid.csv with 2 frontal and 2 lateral images (as Stanford's has 32 laterals)."""
    blank = [np.nan] * 14
    train = [(f"{FOLDER}/train/patient0000{i}/study1/view1_frontal.jpg", "Frontal", [1.0, UNCERTAIN] + blank[2:]) for i in range(3)]
    train.append((f"{FOLDER}/train/patient00000/study1/view2_lateral.jpg", "Lateral", [0.0] * 14))
    valid = [(f"{FOLDER}/valid/patient6454{i // 2}/study1/view{1 + i % 2}_{view.lower()}.jpg", view, [float(i % 2)] * 14)
             for i, view in enumerate(("Frontal", "Lateral", "Frontal", "Lateral"))]
    (tmp_path / FOLDER).mkdir()
    phantom_csv(train).to_csv(tmp_path / FOLDER / "train.csv", index=False)
    phantom_csv(valid).to_csv(tmp_path / FOLDER / "valid.csv", index=False)
    for path, _, _ in train + valid:
        write_jpg(tmp_path / path)
    return tmp_path


def test_protocol_ark_tests_on_all_of_valid_csv_laterals_included(phantom: Path):
    ours = plugin().read(phantom, SplitConfig(val_fraction=0.0))
    theirs = plugin(protocol="ark").read(phantom, SplitConfig(val_fraction=0.0))
    assert list(ours["test"].meta["view"]) == ["AP", "AP"]
    assert len(theirs["test"]) == 4 and list(theirs["test"].meta["view"]) == ["AP", "Lateral", "AP", "Lateral"]
    np.testing.assert_array_equal(theirs["test"].labels[:, 0], [0.0, 1.0, 0.0, 1.0])
    assert len(theirs["train"]) == len(ours["train"]) == 3  # train.csv keeps `views` (frontal)
    assert len(plugin(protocol="ark", views="all").read(phantom, SplitConfig(val_fraction=0.0))["train"]) == 4
    assert len(plugin(protocol="arkfed").read(phantom, SplitConfig(val_fraction=0.0))["test"]) == 2  # the default
