"""Split lists in the format of Ark's repository (``Ark_MICCAI2023/dataset/*.txt``), read through ``split_lists:``.

arkfed does not ship Ark's lists; the small lists below are written line for line in their format:
``ShenzenCXR_*_data.txt`` "CHNCXR_0001_0.png,0" (``ShenzhenCXR.__init__``: ``line.split(',')``),
``RSNAPneumonia_*.txt`` "<patientId>.png 2" (``RSNAPneumonia.__init__``: one-hot at ``int(lineItems[-1])``,
0 Normal, 1 No Lung Opacity / Not Normal, 2 Lung Opacity) and ``Xray14_*_official.txt``
"00000001_000.png" + 14 0/1 columns (``ChestXray14.__init__``: ``line.split()``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from arkfed.data.findings import CHESTXRAY14_CLASSES
from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError

SHENZHEN = [f"CHNCXR_000{i}_{int(i > 4)}" for i in range(1, 9)]  # 0001..0004 normal, 0005..0008 tuberculosis


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 60, dtype=np.uint8)).save(path)


def write_lists(folder: Path, files: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_text("".join(line + "\n" for line in lines))
    return folder


@pytest.fixture
def shenzhen(tmp_path: Path) -> Path:
    for stem in SHENZHEN:
        png(tmp_path / "data" / "CXR_png" / f"{stem}.png")
    return tmp_path / "data"


def shenzhen_lists(folder: Path, train=("0005_1", "0001_0", "0002_0", "0006_1"), val=("0003_0",), test=("0007_1", "0004_0")) -> Path:
    def lines(stems):
        return [f"CHNCXR_{s}.png,{s[-1]}" for s in stems]

    files = {"ShenzenCXR_train_data.txt": lines(train), "ShenzenCXR_test_data.txt": lines(test)}
    if val is not None:
        files["ShenzenCXR_valid_data.txt"] = lines(val)
    return write_lists(folder, files)


def names(table) -> list[str]:
    return [Path(table.images.describe(i)).stem for i in range(len(table))]


def test_shenzhen_splits_are_the_listed_ones_in_list_order(shenzhen: Path, tmp_path: Path):
    lists = shenzhen_lists(tmp_path / "lists")
    splits = get_plugin("shenzhen")({}).read(shenzhen, SplitConfig(lists=lists))
    assert names(splits["train"]) == ["CHNCXR_0005_1", "CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0006_1"]
    assert names(splits["val"]) == ["CHNCXR_0003_0"] and names(splits["test"]) == ["CHNCXR_0007_1", "CHNCXR_0004_0"]
    assert splits["train"].labels[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert sum(len(t) for t in splits.values()) == 7  # CHNCXR_0008_1 is in no list: left out, as Ark leaves it out
    default = get_plugin("shenzhen")({}).read(shenzhen, SplitConfig(val_fraction=0.25, test_fraction=0.25))
    assert sum(len(t) for t in default.values()) == 8  # without lists: today's split by image


def test_ark_plus_subfolder_and_no_val_list(shenzhen: Path, tmp_path: Path):
    lists = tmp_path / "dataset"
    shenzhen_lists(lists / "Shenzhen", val=None)  # Ark_Plus/dataset/Shenzhen/ layout, no valid list
    splits = get_plugin("shenzhen")({}).read(shenzhen, SplitConfig(lists=lists, val_fraction=0.5))
    assert len(splits["train"]) + len(splits["val"]) == 4 and len(splits["val"]) >= 1  # the train list cut by patient
    assert names(splits["test"]) == ["CHNCXR_0007_1", "CHNCXR_0004_0"]


def test_a_listed_image_that_is_missing_names_the_list_file_and_line(shenzhen: Path, tmp_path: Path):
    lists = shenzhen_lists(tmp_path / "lists", test=("0007_1", "0004_0", "0009_1"))
    plugin = get_plugin("shenzhen")
    with pytest.raises(ArkfedError, match=r"ShenzenCXR_test_data.txt: line 3: listed image CHNCXR_0009_1.png is not in the dataset") as err:
        plugin({}).read(shenzhen, SplitConfig(lists=lists))
    assert "\n" not in str(err.value)
    splits = plugin({"missing_images": "drop"}).read(shenzhen, SplitConfig(lists=lists))
    assert names(splits["test"]) == ["CHNCXR_0007_1", "CHNCXR_0004_0"]


def test_list_errors_name_file_and_line(shenzhen: Path, tmp_path: Path):
    plugin = get_plugin("shenzhen")({})
    lists = shenzhen_lists(tmp_path / "a")
    (lists / "ShenzenCXR_test_data.txt").write_text("CHNCXR_0004_0.png,0\nCHNCXR_0007_1.png,0\n")  # the file name says tuberculosis
    with pytest.raises(ArkfedError, match=r"ShenzenCXR_test_data.txt: line 2: CHNCXR_0007_1.png is listed with positives \[none\] but"):
        plugin.read(shenzhen, SplitConfig(lists=lists))
    lists = shenzhen_lists(tmp_path / "b", val=("0001_0",))
    again = r"ShenzenCXR_valid_data.txt: line 1: CHNCXR_0001_0.png is listed again \(first in .*train_data.txt, line 2\)"
    with pytest.raises(ArkfedError, match=again):
        plugin.read(shenzhen, SplitConfig(lists=lists))
    lists = shenzhen_lists(tmp_path / "c")
    (lists / "ShenzenCXR_test_data.txt").write_text("CHNCXR_0007_1.png,1\nCHNCXR_0004_0.png 0\n")
    with pytest.raises(ArkfedError, match=r"ShenzenCXR_test_data.txt: line 2: expected an image name and 1 0/1 label"):
        plugin.read(shenzhen, SplitConfig(lists=lists))
    (lists / "ShenzenCXR_test_data.txt").unlink()
    with pytest.raises(ArkfedError, match=r"split list not found: ShenzenCXR_test_data.txt"):
        plugin.read(shenzhen, SplitConfig(lists=lists))


def rsna_root(root: Path, classes: dict[str, str], images: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ids = list(classes)
    pd.DataFrame({"patientId": ids, "Target": [int(classes[i] == "Lung Opacity") for i in ids]}).to_csv(
        root / "stage_2_train_labels.csv", index=False)
    pd.DataFrame({"patientId": ids, "class": [classes[i] for i in ids]}).to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    (root / "stage_2_train_images").mkdir()
    for pid in images:
        (root / "stage_2_train_images" / f"{pid}.dcm").write_bytes(b"DICM")  # existence is all that is checked
    return root


RSNA = {"p0": "Normal", "p1": "No Lung Opacity / Not Normal", "p2": "Lung Opacity", "p3": "Lung Opacity", "p4": "Normal"}


def test_rsna_lists_name_pngs_and_count_arks_class_order(tmp_path: Path):
    root = rsna_root(tmp_path / "rsna", RSNA, list(RSNA))
    lists = write_lists(tmp_path / "lists", {
        "RSNAPneumonia_train.txt": ["p2.png 2", "p0.png 0", "p1.png 1"],
        "RSNAPneumonia_val.txt": ["p4.png 0"],
        "RSNAPneumonia_test.txt": ["p3.png 2"],
    })
    plugin = get_plugin("rsna_pneumonia")({})
    splits = plugin.read(root, SplitConfig(lists=lists))
    classes = plugin.label_schema().classes  # arkfed's order: Normal, Lung Opacity, No Lung Opacity / Not Normal
    train = splits["train"]
    assert list(train.meta["patient_id"]) == ["p2", "p0", "p1"]
    assert [classes[i] for i in train.labels.argmax(axis=1)] == ["Lung Opacity", "Normal", "No Lung Opacity / Not Normal"]
    assert list(splits["test"].meta["patient_id"]) == ["p3"] and list(splits["val"].meta["patient_id"]) == ["p4"]

    (lists / "RSNAPneumonia_val.txt").write_text("p4.png 1\n")  # Ark's 1 = Not Normal, the Kaggle files say Normal
    differs = r"RSNAPneumonia_val.txt: line 1: p4.png is listed with positives \[No Lung Opacity / Not Normal\] but .*gives \[Normal\]"
    with pytest.raises(ArkfedError, match=differs):
        plugin.read(root, SplitConfig(lists=lists))
    (lists / "RSNAPneumonia_val.txt").write_text("p4.png 3\n")
    with pytest.raises(ArkfedError, match=r"RSNAPneumonia_val.txt: line 1: class index '3' is not one of 0..2"):
        plugin.read(root, SplitConfig(lists=lists))


def test_rsna_listed_image_without_its_dicom_names_list_and_line(tmp_path: Path):
    root = rsna_root(tmp_path / "rsna", RSNA, ["p0", "p1", "p2", "p4"])  # p3.dcm absent
    lists = write_lists(tmp_path / "lists", {
        "RSNAPneumonia_train.txt": ["p0.png 0", "p1.png 1"], "RSNAPneumonia_test.txt": ["p2.png 2", "p3.png 2"],
    })
    with pytest.raises(ArkfedError, match=r"RSNAPneumonia_test.txt: line 2: listed image p3.png is missing: .*p3.dcm"):
        get_plugin("rsna_pneumonia")({}).read(root, SplitConfig(lists=lists))
    splits = get_plugin("rsna_pneumonia")({"missing_images": "drop"}).read(root, SplitConfig(lists=lists))
    assert list(splits["test"].meta["patient_id"]) == ["p2"]


def test_chestxray14_lists_replace_the_official_train_val_cut(tmp_path: Path):
    root = tmp_path / "nih"
    findings = ["No Finding", "Effusion|Hernia", "Atelectasis", "Mass", "No Finding"]
    frame = pd.DataFrame({
        "Image Index": [f"0000000{i}_000.png" for i in range(5)], "Finding Labels": findings,
        "Follow-up #": 0, "Patient ID": range(5), "Patient Age": 50, "Patient Gender": "F", "View Position": "PA",
    })
    root.mkdir()
    frame.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    for name in frame["Image Index"]:
        png(root / "images" / name)

    def line(i: int) -> str:
        labels = [int(c in findings[i].split("|")) for c in CHESTXRAY14_CLASSES]
        return f"0000000{i}_000.png " + " ".join(map(str, labels))

    lists = write_lists(tmp_path / "lists", {
        "Xray14_train_official.txt": [line(0), line(1)],
        "Xray14_val_official.txt": [line(2)],
        "Xray14_test_official.txt": [line(3), line(4)],
    })
    splits = get_plugin("chestxray14")({}).read(root, SplitConfig(lists=lists))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 2]
    effusion_hernia = splits["train"].labels[1]
    assert [CHESTXRAY14_CLASSES[i] for i in np.flatnonzero(effusion_hernia)] == ["Effusion", "Hernia"]


def test_plugins_without_a_list_format_refuse_split_lists(tmp_path: Path):
    with pytest.raises(ArkfedError, match=r"plugin 'vindr_cxr' reads no split lists"):
        get_plugin("vindr_cxr")({}).read(tmp_path, SplitConfig(lists=tmp_path))
    with pytest.raises(ArkfedError, match=r"plugin 'medmnist' reads no split lists"):
        get_plugin("medmnist")({}).read(tmp_path, SplitConfig(lists=tmp_path))


def test_site_yaml_split_lists_key_is_relative_to_the_yaml(shenzhen: Path, tmp_path: Path):
    from arkfed.site.config import load_site_config
    from arkfed.site.load import load_site

    shenzhen_lists(tmp_path / "ark_lists")
    path = tmp_path / "szh.yaml"
    path.write_text(textwrap.dedent("""
        name: szh
        dataset: shenzhen
        root: data
        split_lists: ark_lists
    """))
    config = load_site_config(path)
    assert config.split_lists == config.split.lists == tmp_path / "ark_lists"
    site = load_site(config, cache=False)
    assert names(site.split("test")) == ["CHNCXR_0007_1", "CHNCXR_0004_0"]
    path.write_text(path.read_text() + "split: {use_official: false}\n")
    with pytest.raises(ArkfedError, match=r"szh.yaml: .*use_official: false.* contradicts"):
        load_site_config(path)
