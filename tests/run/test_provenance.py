"""provenance.json: versions, the source commit, and dataset fingerprints that see labels, not images."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable, FileImages, make_meta
from arkfed.run.provenance import (
    FEDERATED_NOTE,
    changed_sites,
    dataset_fingerprint,
    federated_fingerprint,
    git_state,
    source_dir,
    write_provenance,
)
from arkfed.site.config import SiteConfig
from arkfed.site.load import Site

CLASSES = ("Atelectasis", "Effusion")
SCHEMA = LabelSchema(task="multilabel", classes=CLASSES)


def file_site(root, labels: np.ndarray, names: list[str] | None = None) -> Site:
    """A site whose images are files under ``root`` (never read: a fingerprint must not open them)."""
    n = len(labels)
    names = names or [f"patient{i:03d}_scan.png" for i in range(n)]
    table = DatasetTable(FileImages(tuple(str(root / "images" / name) for name in names)), labels,
                         make_meta(n, patient_id=[f"p{i}" for i in range(n)]), CLASSES)
    val = table.subset(np.arange(n - 2, n))
    return Site(SiteConfig(name="north", dataset="csv", root=root), None, SCHEMA, {"train": table.subset(np.arange(n - 2)), "val": val})


def labels(seed: int = 0) -> np.ndarray:
    values = (np.random.default_rng(seed).random((8, 2)) < 0.5).astype(np.float32)
    values[3, 1] = np.nan
    return values


def test_fingerprint_follows_labels_not_location(tmp_path):
    base = dataset_fingerprint(file_site(tmp_path / "a", labels()))
    assert base["split_sizes"] == {"train": 6, "val": 2} and base["classes"] == list(CLASSES)
    assert dataset_fingerprint(file_site(tmp_path / "a", labels())) == base  # nothing changed
    assert dataset_fingerprint(file_site(tmp_path / "moved" / "b", labels())) == base  # only the folder moved

    flipped = labels()
    flipped[0, 0] = 1 - flipped[0, 0]
    changed = dataset_fingerprint(file_site(tmp_path / "a", flipped))
    assert changed["labels_sha256"] != base["labels_sha256"]
    assert changed["splits"]["train"]["labels_sha256"] != base["splits"]["train"]["labels_sha256"]
    assert changed["splits"]["val"] == base["splits"]["val"]  # the other split is untouched

    unlabelled = labels()
    unlabelled[0, 0] = np.nan  # a label becoming "not labelled" is a change too
    assert dataset_fingerprint(file_site(tmp_path / "a", unlabelled))["labels_sha256"] != base["labels_sha256"]

    names = [f"patient{i:03d}_scan.png" for i in range(8)]
    names[0], names[1] = names[1], names[0]  # same labels, other images
    assert dataset_fingerprint(file_site(tmp_path / "a", labels(), names))["labels_sha256"] != base["labels_sha256"]


def test_provenance_file_has_versions_and_no_image_paths(tmp_path):
    data, run_dir = tmp_path / "hospital-data", tmp_path / "run"
    site = file_site(data, labels())
    record = write_provenance(run_dir, {"north": dataset_fingerprint(site)})
    text = (run_dir / "provenance.json").read_text()
    assert json.loads(text) == record
    from importlib.metadata import version

    import timm
    import torch

    versions = record["versions"]
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["timm"] == timm.__version__ and versions["flwr"] == version("flwr")  # importing flwr costs seconds
    assert versions["arkfed"] and versions["python"].count(".") == 2
    assert record["created"] and record["command"]
    for image in site.splits["train"].images.paths:
        assert str(image) not in text and image.rsplit("/", 1)[-1] not in text
    assert str(data) not in text and "patient000" not in text
    assert record["sites"]["north"]["labels_sha256"] == dataset_fingerprint(site)["labels_sha256"]


def test_resume_appends_and_reports_changed_sites(tmp_path):
    first = write_provenance(tmp_path, {"north": dataset_fingerprint(file_site(tmp_path / "a", labels()))})
    flipped = labels()
    flipped[5, 1] = 1 - flipped[5, 1]
    again = write_provenance(tmp_path, {"north": dataset_fingerprint(file_site(tmp_path / "a", flipped))})
    assert again["created"] == first["created"] and again["sites"] == first["sites"]  # the first record is kept
    assert len(again["resumes"]) == 1
    assert changed_sites(first, again["resumes"][0]) == ["north"]
    assert changed_sites(first, first) == []


def test_federated_fingerprint_holds_only_the_hello_reply():
    fp = federated_fingerprint({"val": 40, "train": 200}, SCHEMA)
    assert fp["split_sizes"] == {"train": 200, "val": 40}
    assert fp["schema"]["classes"] == list(CLASSES) and fp["note"] == FEDERATED_NOTE
    assert set(fp) == {"split_sizes", "schema", "schema_sha256", "note"}
    other = federated_fingerprint({"val": 40, "train": 200}, LabelSchema(task="multilabel", classes=CLASSES[::-1]))
    assert other["schema_sha256"] != fp["schema_sha256"]
    assert federated_fingerprint({"train": 200, "val": 40}, SCHEMA.model_dump(mode="json")) == fp


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_of_the_checkout(tmp_path):
    folder = source_dir()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip(f"{folder} is not a git checkout")
    state = git_state()
    assert state["commit"] == head.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True)
    assert state["dirty"] == bool(dirty.stdout.strip())
    assert git_state(tmp_path) == {}  # not a checkout: nothing, and no error


def test_git_absent_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert git_state() == {}
    record = write_provenance(tmp_path / "run", {})
    assert record["git"] == {}
