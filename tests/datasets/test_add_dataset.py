"""arkfed add-dataset's core: infer classes from a CSV, write a plugin + site YAML that really load."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arkfed.datasets._plugin import get_plugin
from arkfed.datasets._scaffold import DatasetRequest, scaffold_dataset
from arkfed.errors import ArkfedError
from arkfed.site.load import load_site
from arkfed.site.validate import validate_site


def make_dataset(root: Path, n: int = 60, effusion=None, finding=None) -> Path:
    """Images in root/img and root/labels.csv with metadata, two 1/0/-1 columns and distractors."""
    (root / "img").mkdir(parents=True)
    lines = ["file,patient,gender,age,Pneumonia,Effusion,finding,notes,site_code"]
    for i in range(n):
        Image.fromarray(np.full((16, 16), 4 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        eff = effusion(i) if effusion else ("-1" if i % 7 == 0 else "" if i % 5 == 0 else str(i % 2))
        kind = finding(i) if finding else ["normal", "pneumonia", "covid"][i % 3]
        lines.append(f"{i}.png,p{i // 2},{'M' if i % 2 else 'F'},{30 + i},{int(i % 3 == 0)},{eff},{kind},note {i},{100 + i}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def request(tmp_path: Path, name: str, **kw) -> DatasetRequest:
    base = dict(name=name, labels=tmp_path / "data" / "labels.csv", image_column="file", image_dir="img",
                patient_column="patient", sex_column="gender", age_column="age",
                plugins_dir=tmp_path / f"{name}_plugins", sites_dir=tmp_path / "sites")
    return DatasetRequest(**{**base, **kw})


def test_inferred_plugin_loads_and_reads_the_data(tmp_path):
    make_dataset(tmp_path / "data")
    result = scaffold_dataset(request(tmp_path, "addds_multi"))
    assert result.inferred.label_columns == ["Pneumonia", "Effusion"]
    assert set(result.inferred.skipped) == {"finding", "notes", "site_code"}
    assert result.label_schema.classes == ("Pneumonia", "Effusion")
    source = result.plugin_file.read_text()
    ast.parse(source)
    assert "arkfed add-dataset addds_multi" in source and "--patient-column patient" in source
    cls = get_plugin("addds_multi", [result.plugin_file.parent])
    assert cls().options.file == "labels.csv" and cls().label_schema() == result.label_schema
    assert result.site_file.read_text().count("root: ../data") == 1

    site = load_site(result.site_file, [result.plugin_file.parent])
    rows = np.concatenate([t.labels for t in site.splits.values()])
    assert rows.shape == (60, 2)
    uncertain = [i for i in range(60) if i % 7 == 0]
    blank = [i for i in range(60) if i % 5 == 0 and i % 7]
    assert (rows[:, 1] == -1).sum() == len(uncertain) and np.isnan(rows[:, 1]).sum() == len(blank)
    report = validate_site(result.site_file, [result.plugin_file.parent])
    assert report.ok and report.images_checked == 60, report.errors
    assert {s.sex["M"] + s.sex["F"] for s in report.splits} == {s.images for s in report.splits}


def test_multiclass_from_a_column_of_class_names(tmp_path):
    make_dataset(tmp_path / "data")
    result = scaffold_dataset(request(tmp_path, "addds_kind", task="multiclass", label_columns=["finding"]))
    assert result.label_schema.classes == ("covid", "normal", "pneumonia")
    site = load_site(result.site_file, [result.plugin_file.parent])
    table = site.splits["train"]
    assert np.all(table.labels.sum(axis=1) == 1)
    first = int(Path(table.images.describe(0)).stem)
    assert table.labels[0].argmax() == ("covid", "normal", "pneumonia").index(["normal", "pneumonia", "covid"][first % 3])


def test_binary_needs_exactly_one_label_column(tmp_path):
    make_dataset(tmp_path / "data")
    with pytest.raises(ArkfedError, match="binary task has one label column"):
        scaffold_dataset(request(tmp_path, "addds_bin", task="binary"))
    result = scaffold_dataset(request(tmp_path, "addds_bin", task="binary", label_columns=["Pneumonia"]))
    assert result.label_schema.task == "binary" and result.label_schema.classes == ("Pneumonia",)


def test_bad_values_in_named_label_columns_name_line_and_column(tmp_path):
    make_dataset(tmp_path / "data", effusion=lambda i: "yes" if i == 5 else "0")
    with pytest.raises(ArkfedError, match=r"labels.csv: line 7, column 'Effusion': non-numeric value 'yes'"):
        scaffold_dataset(request(tmp_path, "addds_bad", label_columns=["Pneumonia", "Effusion"]))
    with pytest.raises(ArkfedError, match=r"missing column\(s\) \['Oedema'\]"):
        scaffold_dataset(request(tmp_path, "addds_bad", label_columns=["Oedema"]))


def test_refuses_to_overwrite_unless_forced_and_force_takes_effect(tmp_path):
    make_dataset(tmp_path / "data")
    first = scaffold_dataset(request(tmp_path, "addds_force", label_columns=["Pneumonia"]))
    with pytest.raises(ArkfedError, match="already exists; pass --force"):
        scaffold_dataset(request(tmp_path, "addds_force"))
    assert get_plugin("addds_force", [first.plugin_file.parent])().label_schema().classes == ("Pneumonia",)
    scaffold_dataset(request(tmp_path, "addds_force", force=True))
    cls = get_plugin("addds_force", [first.plugin_file.parent])
    assert cls().label_schema().classes == ("Pneumonia", "Effusion")  # the rewritten file, not the cached one


def test_names_must_be_identifiers_and_not_taken(tmp_path):
    make_dataset(tmp_path / "data")
    for bad in ("9lives", "my-data", "class", ""):
        with pytest.raises(ArkfedError, match="must be a Python identifier"):
            scaffold_dataset(request(tmp_path, bad))
    with pytest.raises(ArkfedError, match="plugin named 'chexpert' already exists"):
        scaffold_dataset(request(tmp_path, "chexpert"))
    assert not (tmp_path / "chexpert_plugins" / "chexpert.py").exists()


def test_no_label_columns_found_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("file,comment\na.png,hello\n")
    with pytest.raises(ArkfedError, match="no label columns found"):
        scaffold_dataset(DatasetRequest(name="addds_none", labels=tmp_path / "data" / "labels.csv", image_column="file",
                                        plugins_dir=tmp_path / "p", sites_dir=tmp_path / "s"))
