"""validate_site: counts, unreadable images, leaks across splits, empty splits, bad labels, load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from arkfed.demo.generate import generate_demo_federation
from arkfed.site.load import load_site
from arkfed.site.validate import class_counts, list_plugins, validate_site


@pytest.fixture(scope="module")
def demo_sites(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("validate_demo")
    paths = generate_demo_federation(out, seed=0, size=32, counts={"demo-nih": 40, "demo-chexpert": 40, "demo-shenzhen": 30})
    return {p.stem: p for p in paths}


def test_report_counts_match_the_site_tables(demo_sites):
    progress = []
    report = validate_site(demo_sites["demo-chexpert"], progress=lambda done, total: progress.append((done, total)))
    site = load_site(demo_sites["demo-chexpert"])
    assert report.ok, report.errors
    assert (report.site, report.dataset) == ("demo-chexpert", "chexpert")
    assert report.images_total == report.images_checked == 40 and not report.unreadable
    assert progress[-1] == (40, 40) and len(progress) == 40
    by_name = {s.name: s for s in report.splits}
    for name, table in site.splits.items():
        summary = by_name[name]
        assert summary.images == len(table)
        assert summary.patients == table.meta["patient_id"].nunique()
        assert summary.sex["M"] + summary.sex["F"] + summary.sex["unknown"] == len(table)
        assert summary.age.known == table.meta["age"].notna().sum()
        for k, counts in enumerate(summary.classes):
            column = table.labels[:, k]
            assert counts.positive == (column == 1).sum() and counts.uncertain == (column == -1).sum()
            assert counts.negative == (column == 0).sum() and counts.missing == np.isnan(column).sum()


def test_sample_reads_only_n_images(demo_sites):
    report = validate_site(demo_sites["demo-shenzhen"], sample=7)
    assert report.images_checked == 7 and report.images_total == 30
    assert validate_site(demo_sites["demo-shenzhen"], check_images=False).images_checked == 0


def test_unreadable_images_are_each_named(demo_sites, tmp_path):
    site = load_site(demo_sites["demo-nih"])
    victims = [Path(site.splits["train"].images.describe(0)), Path(site.splits["val"].images.describe(0))]
    originals = [p.read_bytes() for p in victims]
    try:
        for p in victims:
            p.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        report = validate_site(demo_sites["demo-nih"])
    finally:
        for p, data in zip(victims, originals):
            p.write_bytes(data)
    assert not report.ok
    assert sorted(u.path for u in report.unreadable) == sorted(map(str, victims))
    assert all(any(v.name in e for e in report.errors) for v in victims)
    assert report.splits  # the rest of the summary is still there


def test_a_site_that_cannot_load_is_one_error_line(demo_sites, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"name": "broken", "dataset": "chexpert", "root": str(tmp_path / "nowhere")}))
    report = validate_site(broken)
    assert not report.ok and report.errors == [f"site 'broken': data folder not found: {tmp_path / 'nowhere'}"]
    assert not report.splits
    assert validate_site(tmp_path / "absent.yaml").errors[0].startswith("site config not found")


# A small CSV site for the problems the demo never has.
def csv_site(tmp_path: Path, rows: list[str], **options) -> Path:
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    for i in range(len(rows)):
        Image.fromarray(np.full((16, 16), 10 * i, dtype=np.uint8)).save(data / "img" / f"{i}.png")
    (data / "labels.csv").write_text("path,patient,split,Effusion,Nodule\n" + "\n".join(rows) + "\n")
    config = {
        "name": "csvsite",
        "dataset": "csv",
        "root": "data",
        "options": {"file": "labels.csv", "image_column": "path", "image_dir": "img", "label_columns": ["Effusion", "Nodule"],
                    "patient_column": "patient", "split_column": "split", **options},
    }
    path = tmp_path / "csvsite.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_patients_shared_across_splits_are_errors(tmp_path):
    rows = [f"{i}.png,p{i % 4},{'train' if i < 6 else 'val' if i < 9 else 'test'},{i % 2},0" for i in range(12)]
    report = validate_site(csv_site(tmp_path, rows))
    leaks = {leak.splits: leak for leak in report.shared_patients}
    assert (leaks[("train", "val")].count, leaks[("train", "val")].examples) == (3, ["p0", "p2", "p3"])
    assert any("patient(s) in both 'train' and 'val'" in e for e in report.errors)
    assert not report.ok


def test_empty_splits_train_val_are_errors_test_a_warning(tmp_path):
    rows = [f"{i}.png,p{i},train,{i % 2},{(i + 1) % 2}" for i in range(6)]
    report = validate_site(csv_site(tmp_path, rows))
    assert report.empty_splits == ["val", "test"]
    assert "split 'val' is empty" in report.errors and "split 'test' is empty" in report.warnings


def test_label_values_outside_the_schema_are_errors_naming_line_and_column(tmp_path):
    rows = [f"{i}.png,p{i},train,{i % 2},0" for i in range(4)] + ["4.png,p4,val,2,0"]
    report = validate_site(csv_site(tmp_path, rows))
    assert len(report.errors) == 1
    assert "line 6, column 'Effusion'" in report.errors[0] and "'2'" in report.errors[0]


def test_reported_classes_without_positives_are_warned_about(tmp_path):
    rows = [f"{i}.png,p{i},{['train', 'val', 'test'][i % 3]},{i % 2},0" for i in range(9)]
    report = validate_site(csv_site(tmp_path, rows))
    assert report.ok
    assert any(w.startswith("split 'train': no positives for Nodule") for w in report.warnings)


def test_class_counts_separates_the_four_kinds_of_values():
    labels = np.array([[1, 0], [0, -1], [np.nan, 1], [1, np.nan]], dtype=np.float32)
    a, b = class_counts(labels, ("A", "B"))
    assert (a.positive, a.negative, a.uncertain, a.missing) == (2, 1, 0, 1)
    assert (b.positive, b.negative, b.uncertain, b.missing) == (1, 1, 1, 1)
    assert a.prevalence == pytest.approx(2 / 3)


def test_list_plugins_shows_default_schemas_and_failures(tmp_path):
    folder = tmp_path / "listing_plugins"
    folder.mkdir()
    (folder / "listing_broken.py").write_text("raise ImportError('needs a library that is not installed')\n")
    summaries, failures = list_plugins([folder])
    by_name = {s.name: s for s in summaries}
    assert by_name["chexpert"].label_schema["eval_classes"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert by_name["medmnist"].label_schema["classes"] == ["Pneumonia"]  # default options: pneumoniamnist
    assert by_name["csv"].label_schema is None and "options" in by_name["csv"].schema_note
    assert "needs a library" in failures["listing_broken"]
