"""The vindr_cxr plugin: the real Kaggle VinBigData box file, and PhysioNet's per-reader layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError

BOX_FILE = "vinbigdata-train.csv.gz"


def plugin(**options):
    return get_plugin("vindr_cxr")(options)


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 70, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def boxes(label_files: Path) -> pd.DataFrame:
    return pd.read_csv(label_files / BOX_FILE)


@pytest.fixture(scope="module")
def kaggle_root(label_files: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vinbigdata")
    (root / "train.csv.gz").symlink_to(label_files / BOX_FILE)
    return root


@pytest.fixture(scope="module")
def majority(kaggle_root: Path):
    return plugin(label_file="kaggle").read_records(kaggle_root)


def test_box_file_gives_one_row_per_image(majority, boxes):
    assert len(majority) == boxes["image_id"].nunique() == 15_000
    assert boxes.groupby("image_id")["rad_id"].nunique().eq(3).all()  # three readers per training image
    assert majority.classes[-1] == "No finding" and len(majority.classes) == 15
    assert set(np.unique(majority.labels)) == {0.0, 1.0}


def test_majority_vote_against_the_raw_votes(majority, boxes):
    no_finding = majority.labels[:, -1] == 1
    assert not majority.labels[no_finding, :-1].any()  # a reader who saw nothing marked nothing
    unanimous = boxes.groupby("image_id")["class_name"].agg(lambda c: (c == "No finding").all())
    assert no_finding.sum() == unanimous.sum()
    assert 0.6 < no_finding.mean() < 0.8
    cardiomegaly = majority.classes.index("Cardiomegaly")
    votes = boxes[boxes["class_name"] == "Cardiomegaly"].groupby("image_id")["rad_id"].nunique()
    ids = pd.Series(majority.meta["patient_id"].to_numpy())
    expected = ids.map(votes).fillna(0).to_numpy() >= 2
    np.testing.assert_array_equal(majority.labels[:, cardiomegaly] == 1, expected)


def test_any_vote_is_more_sensitive(kaggle_root: Path, majority):
    anyone = plugin(label_file="kaggle", rad_vote="any").read_records(kaggle_root)
    assert (anyone.labels >= majority.labels).all()
    assert anyone.labels[:, :-1].sum() > majority.labels[:, :-1].sum()


def test_kaggle_site_with_stand_in_images(kaggle_root: Path, boxes, tmp_path: Path, shared_data: Path):
    root = tmp_path
    (root / "train.csv.gz").symlink_to(kaggle_root / "train.csv.gz")
    ids = boxes["image_id"].drop_duplicates().iloc[:20].tolist()
    for image_id in ids[1:]:
        write_png(root / "train" / f"{image_id}.png")
    dicom = next((shared_data / "samples").glob("*.dcm"))
    shutil.copy(dicom, root / "train" / f"{ids[0]}.dicom")
    splits = plugin(label_file="kaggle", missing_images="drop").read(root, SplitConfig(val_fraction=0.2, test_fraction=0.3))
    assert sum(len(t) for t in splits.values()) == 20
    names = {Path(t.images.describe(i)).name for t in splits.values() for i in range(len(t))}
    assert f"{ids[0]}.dicom" in names
    seen = [set(t.meta["patient_id"]) for t in splits.values()]
    assert len(set.union(*seen)) == 20
    with pytest.raises(ArkfedError, match=r"train.csv.gz: 14980 of 15000 listed image files are missing"):
        plugin(label_file="kaggle").read(root, SplitConfig())


def test_unknown_kaggle_class_names_line(boxes, tmp_path: Path):
    bad = boxes.head(30).copy()
    bad.iloc[7, bad.columns.get_loc("class_name")] = "Lung nodule"
    bad.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ArkfedError, match=r"train.csv: line 9, column 'class_name': unknown class 'Lung nodule'"):
        plugin(label_file="kaggle").read_records(tmp_path)


ALL = get_plugin("vindr_cxr")({"labels": "all"}).label_schema().classes


def physionet_site(root: Path) -> None:
    """Three images x three readers for training, two consensus rows for testing (28 labels each)."""
    train = pd.DataFrame(0, index=range(9), columns=list(ALL))
    train.insert(0, "rad_ID", ["R1", "R2", "R3"] * 3)
    train.insert(0, "image_id", ["a"] * 3 + ["b"] * 3 + ["c"] * 3)
    train.loc[[0, 1], "Pneumonia"] = 1  # image a: 2 of 3 readers -> majority positive
    train.loc[3, "Tuberculosis"] = 1  # image b: 1 of 3 -> positive only with rad_vote any
    train.loc[[2, 4, 5, 6, 7, 8], "No finding"] = 1
    test = pd.DataFrame(0, index=range(2), columns=list(ALL)).rename(columns={"Other diseases": "Other disease"})
    test.insert(0, "image_id", ["t1", "t2"])
    test.loc[0, "COPD"] = 1
    test.loc[0, "Pleural effusion"] = 1
    test.loc[1, "No finding"] = 1
    (root / "annotations").mkdir()
    train.to_csv(root / "annotations" / "image_labels_train.csv", index=False)
    test.to_csv(root / "annotations" / "image_labels_test.csv", index=False)
    for name in ("a", "b", "c"):
        write_png(root / "train" / f"{name}.png")
    for name in ("t1", "t2"):
        write_png(root / "test" / f"{name}.png")


def test_physionet_layout_votes_per_image_and_keeps_official_test(tmp_path: Path):
    physionet_site(tmp_path)
    p = plugin()
    classes = p.label_schema().classes
    assert classes == ("Pleural effusion", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
    assert p.label_schema().canonical("Pleural effusion") == "Pleural Effusion"
    ark = p.read(tmp_path, SplitConfig(val_fraction=0.0))["test"]
    assert dict(zip(ark.meta["patient_id"], ark.labels[:, 0].tolist())) == {"t1": 1.0, "t2": 0.0}
    p = plugin(labels="global")  # the COPD variant
    classes = p.label_schema().classes
    assert classes == ("Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "COPD", "No finding")
    splits = p.read(tmp_path, SplitConfig(val_fraction=0.0))
    train = dict(zip(splits["train"].meta["patient_id"], splits["train"].labels))
    assert train["a"][classes.index("Pneumonia")] == 1 and train["c"][-1] == 1
    assert train["b"][classes.index("Tuberculosis")] == 0 and train["b"][-1] == 1  # 1 TB vote, 2 "No finding"
    test = dict(zip(splits["test"].meta["patient_id"], splits["test"].labels))
    assert set(test) == {"t1", "t2"} and test["t1"][classes.index("COPD")] == 1
    anyone = plugin(labels="global", rad_vote="any").read_records(tmp_path)
    b = list(anyone.meta["patient_id"]).index("b")
    assert anyone.labels[b, classes.index("Tuberculosis")] == 1
    assert plugin(labels="all").read_records(tmp_path).labels.shape == (5, 28)


def test_physionet_bad_value_and_missing_column(tmp_path: Path):
    physionet_site(tmp_path)
    file = tmp_path / "annotations" / "image_labels_train.csv"
    train = pd.read_csv(file)
    train.loc[4, "COPD"] = 2
    train.to_csv(file, index=False)
    with pytest.raises(ArkfedError, match=r"image_labels_train.csv: line 6, column 'COPD': label value 2"):
        plugin(labels="global").read_records(tmp_path)
    train.drop(columns=["Pleural effusion"]).to_csv(file, index=False)
    with pytest.raises(ArkfedError, match=r"image_labels_train.csv: missing column\(s\) \['Pleural effusion'\]"):
        plugin().read_records(tmp_path)


def test_labels_option_is_rejected_for_the_kaggle_file():
    with pytest.raises(ArkfedError, match="option"):
        plugin(label_file="kaggle", labels="all")


def test_protocol_ark_takes_any_readers_training_positives(tmp_path: Path):
    """Ark's VinDrCXR_train_pe_global_one.txt is the any-reader vote of image_labels_train.csv."""
    physionet_site(tmp_path)
    classes = plugin().label_schema().classes
    tb = classes.index("Tuberculosis")
    ours, theirs = plugin().read_records(tmp_path), plugin(protocol="ark").read_records(tmp_path)
    b = list(ours.meta["patient_id"]).index("b")  # one of three readers saw tuberculosis
    assert ours.labels[b, tb] == 0 and theirs.labels[b, tb] == 1
    np.testing.assert_array_equal(theirs.labels, plugin(rad_vote="any").read_records(tmp_path).labels)
    np.testing.assert_array_equal(theirs.labels[-2:], ours.labels[-2:])  # the test consensus either way
    assert plugin(protocol="ark").label_schema() == plugin().label_schema()


@pytest.mark.parametrize("options", [{"rad_vote": "majority"}, {"labels": "all"}, {"label_file": "kaggle"}])
def test_protocol_ark_rejects_what_ark_did_not_read(options):
    with pytest.raises(ArkfedError, match=r"plugin 'vindr_cxr': option .*protocol: ark"):
        plugin(protocol="ark", **options)
