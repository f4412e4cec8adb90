"""The chestxray14 plugin on NIH's real Data_Entry_2017_v2020.csv, with stand-in images for a few rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from arkfed.data.findings import CHESTXRAY14_CLASSES
from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError

LABEL_FILE = "Data_Entry_2017_v2020.csv.gz"


def plugin(**options):
    return get_plugin("chestxray14")(options)


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def raw(label_files: Path) -> pd.DataFrame:
    return pd.read_csv(label_files / LABEL_FILE)


@pytest.fixture(scope="module")
def full_root(label_files: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih_full")
    (root / LABEL_FILE).symlink_to(label_files / LABEL_FILE)
    return root


@pytest.fixture(scope="module")
def records(full_root: Path):
    return plugin().read_records(full_root)


def test_real_label_file_is_read_whole(records, raw):
    assert len(records) == len(raw) == 112_120
    assert records.classes == CHESTXRAY14_CLASSES
    assert records.meta["patient_id"].nunique() == 30_805
    assert set(np.unique(records.labels)) == {0.0, 1.0}
    assert set(records.meta["sex"].dropna()) == {"M", "F"}
    assert set(records.meta["view"]) == {"PA", "AP"}


def test_no_finding_rows_are_all_zero_and_findings_match_the_pipes(records, raw):
    no_finding = (raw["Finding Labels"] == "No Finding").to_numpy()
    assert 0.45 < no_finding.mean() < 0.6  # about half of ChestX-ray14 has no finding
    assert not records.labels[no_finding].any()
    n_findings = raw["Finding Labels"].str.count(r"\|").to_numpy() + 1
    np.testing.assert_array_equal(records.labels[~no_finding].sum(axis=1), n_findings[~no_finding])
    infiltration = records.labels[:, CHESTXRAY14_CLASSES.index("Infiltration")].mean()
    hernia = records.labels[:, CHESTXRAY14_CLASSES.index("Hernia")].mean()
    assert 0.12 < infiltration < 0.25 and hernia < 0.005  # most and least common findings


def test_row_labels_follow_the_file(records, raw):
    row = int(np.flatnonzero((raw["Finding Labels"] == "Cardiomegaly|Emphysema").to_numpy())[0])
    positive = {CHESTXRAY14_CLASSES[k] for k in np.flatnonzero(records.labels[row])}
    assert positive == {"Cardiomegaly", "Emphysema"}
    assert records.meta["patient_id"][row] == str(raw["Patient ID"][row])
    assert records.meta["age"][row] == raw["Patient Age"][row]


@pytest.fixture
def site(raw: pd.DataFrame, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """Real rows of 12 patients, images spread over images_001/ and images_002/ as NIH unpacks them."""
    patients = raw["Patient ID"].drop_duplicates().iloc[:12]
    rows = raw[raw["Patient ID"].isin(patients)].head(48)
    rows.to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    for i, name in enumerate(rows["Image Index"]):
        write_png(tmp_path / f"images_00{1 + i % 2}" / "images" / name)
    test_patients = set(patients.iloc[:3])
    test = rows[rows["Patient ID"].isin(test_patients)]["Image Index"]
    train_val = rows[~rows["Patient ID"].isin(test_patients)]["Image Index"]
    (tmp_path / "test_list.txt").write_text("\n".join(test) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    return tmp_path, rows


def test_official_test_list_is_honoured_and_patients_never_shared(site):
    root, rows = site
    splits = plugin().read(root, SplitConfig(val_fraction=0.3, seed=1))
    assert sum(len(t) for t in splits.values()) == len(rows)
    listed = set((root / "test_list.txt").read_text().split())
    assert {Path(splits["test"].images.describe(i)).name for i in range(len(splits["test"]))} == listed
    patients = [set(splits[s].meta["patient_id"]) for s in ("train", "val", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert len(splits["val"]) > 0
    image = splits["train"].images.read(0)
    assert image.shape == (16, 16)
    by_name = rows.set_index("Image Index")["Finding Labels"]
    for table in splits.values():
        for i in range(len(table)):
            names = set(by_name[Path(table.images.describe(i)).name].split("|")) - {"No Finding"}
            assert {table.classes[k] for k in np.flatnonzero(table.labels[i])} == names


def test_without_split_lists_patients_are_split_by_hash(site):
    root, rows = site
    (root / "test_list.txt").unlink()
    (root / "train_val_list.txt").unlink()
    splits = plugin().read(root, SplitConfig(val_fraction=0.25, test_fraction=0.25, seed=3))
    assert sum(len(t) for t in splits.values()) == len(rows)
    patients = [set(splits[s].meta["patient_id"]) for s in ("train", "val", "test")]
    assert len(set.union(*patients)) == sum(map(len, patients))


def test_missing_image_is_named_or_dropped(site):
    root, rows = site
    gone = rows["Image Index"].iloc[5]
    next(root.glob(f"images_*/images/{gone}")).unlink()
    with pytest.raises(ArkfedError, match=rf"Data_Entry_2017_v2020.csv: 1 of {len(rows)} .*missing, first .*{gone}"):
        plugin().read(root, SplitConfig())
    splits = plugin(missing_images="drop").read(root, SplitConfig())
    assert sum(len(t) for t in splits.values()) == len(rows) - 1


def test_unknown_finding_names_line_and_value(site):
    root, rows = site
    rows = rows.copy()
    rows.iloc[6, rows.columns.get_loc("Finding Labels")] = "Effusion|Pneumonitis"
    rows.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    with pytest.raises(ArkfedError, match=r"Data_Entry_2017_v2020.csv: line 8, column 'Finding Labels': unknown finding 'Pneumonitis'"):
        plugin().read_records(root)


def test_missing_column_names_column_and_file(site):
    root, rows = site
    (root / "Data_Entry_2017_v2020.csv").unlink()
    rows.drop(columns=["Patient Gender"]).to_csv(root / "Data_Entry_2017.csv", index=False)  # the older name
    with pytest.raises(ArkfedError, match=r"Data_Entry_2017.csv: missing column\(s\) \['Patient Gender'\]"):
        plugin().read_records(root)


def test_absent_label_file_is_named(tmp_path: Path):
    with pytest.raises(ArkfedError, match="Data_Entry_2017_v2020.csv"):
        plugin().read_records(tmp_path)
