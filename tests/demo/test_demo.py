"""The synthetic demo federation: determinism, official layouts read by the real plugins, drawn findings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from arkfed.demo.anatomy import sample_anatomy
from arkfed.demo.draw import DRAWN_FINDINGS, AcquisitionStyle, draw_chest
from arkfed.demo.generate import (
    DEMO_SITES,
    MARKER_FILE,
    demo_is_complete,
    ensure_demo_federation,
    generate_demo_federation,
    site_classes,
)
from arkfed.errors import ArkfedError
from arkfed.site.load import load_site
from arkfed.site.validate import validate_site

COUNTS = {"demo-nih": 70, "demo-chexpert": 60, "demo-shenzhen": 40}
SIZE = 48
REPO = Path(__file__).resolve().parents[2]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo_federation(out, seed=3, size=SIZE, counts=COUNTS)
    return out


@pytest.fixture(scope="module")
def sites(demo):
    return {p.stem: load_site(p) for p in sorted((demo / "sites").glob("*.yaml"))}


def test_same_seed_gives_identical_files_and_another_seed_does_not(demo, tmp_path):
    again = generate_demo_federation(tmp_path / "again", seed=3, size=SIZE, counts=COUNTS)
    assert [p.name for p in again] == [f"{s.name}.yaml" for s in DEMO_SITES]
    first, second = tree_hashes(demo), tree_hashes(tmp_path / "again")
    assert first == second
    assert len([k for k in first if k.endswith((".png", ".jpg"))]) == sum(COUNTS.values())
    other = tree_hashes(Path(generate_demo_federation(tmp_path / "other", seed=4, size=SIZE, counts=COUNTS)[0]).parent.parent)
    images = [k for k in first if k.endswith(".png")]
    assert sum(first[k] != other.get(k) for k in images) > 0.9 * len(images)


PLAN_DIGEST = """
import hashlib, sys
from arkfed.demo.generate import DEMO_SITES, plan_site
plan = [plan_site(site, i, 1, 1500) for i, site in enumerate(DEMO_SITES)]
rows = [[(p.key, sorted(p.findings.items()), sorted(p.uncertain), p.sex, p.age, p.view) for p in s] for s in plan]
print(hashlib.sha256(repr(rows).encode()).hexdigest())
"""


def test_planning_does_not_depend_on_the_interpreters_hash_seed():
    """Two interpreters with different hash seeds plan the same images (no set-order randomness)."""
    import os
    import subprocess
    import sys

    digests = {
        subprocess.run([sys.executable, "-c", PLAN_DIGEST], check=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_files_are_in_the_publishers_layouts(demo):
    nih = demo / "demo-nih"
    header = (nih / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0]
    assert header == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                      "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    listed = set((nih / "train_val_list.txt").read_text().split()) | set((nih / "test_list.txt").read_text().split())
    assert listed == {p.name for p in (nih / "images").glob("*.png")}
    chexpert = demo / "demo-chexpert" / "CheXpert-v1.0-small"
    train = pd.read_csv(chexpert / "train.csv")
    assert train["Path"].str.match(r"CheXpert-v1\.0-small/train/patient\d{5}/study\d+/view1_frontal\.jpg").all()
    assert all((demo / "demo-chexpert" / p).is_file() for p in train["Path"])
    shenzhen = demo / "demo-shenzhen"
    for png in (shenzhen / "CXR_png").glob("*.png"):
        assert png.stem[:-2].startswith("CHNCXR_") and png.stem[-1] in "01"
        first_line = (shenzhen / "ClinicalReadings" / f"{png.stem}.txt").read_text().splitlines()[0]
        assert first_line.split()[0] in ("male", "female") and first_line.endswith("yrs")


def test_the_real_plugins_read_every_site_cleanly(demo, sites):
    assert set(sites) == set(COUNTS)
    for name, site in sites.items():
        assert sum(len(t) for t in site.splits.values()) == COUNTS[name]
        report = validate_site(site.config)
        assert report.ok, report.errors  # every image readable, no patient in two splits, no empty split
        assert report.images_checked == COUNTS[name]
        for table in site.splits.values():
            assert set(table.meta["sex"]) <= {"M", "F"} and table.meta["age"].between(18, 96).all()


def test_patients_have_follow_ups_so_splitting_by_patient_matters(sites):
    meta = pd.concat([t.meta for t in sites["demo-nih"].splits.values()])
    per_patient = meta["patient_id"].value_counts()
    assert per_patient.max() >= 2 and (per_patient == 1).any()


def test_label_values_are_consistent_with_what_is_drawn(sites):
    nih = sites["demo-nih"]
    labels = np.concatenate([t.labels for t in nih.splits.values()])
    drawn = [nih.schema.classes.index(c) for c in site_classes(DEMO_SITES[0])]
    never = [k for k in range(len(nih.schema.classes)) if k not in drawn]
    assert np.all(labels[:, never] == 0)
    assert labels[:, drawn].sum(axis=0).min() > 0
    chexpert = sites["demo-chexpert"]
    train = chexpert.splits["train"].labels
    assert (train == -1).any() and np.isnan(train).any()  # uncertain and blank, as CheXpert's labeler writes
    test = chexpert.splits["test"].labels  # valid.csv: radiologist consensus, 1/0 only
    assert np.isin(test, (0.0, 1.0)).all()
    no_finding = chexpert.schema.classes.index("No Finding")
    pathology = [chexpert.schema.classes.index(c) for c in ("Cardiomegaly", "Edema", "Pleural Effusion")]
    both = (test[:, no_finding] == 1) & (test[:, pathology] == 1).any(axis=1)
    assert not both.any()
    shenzhen = sites["demo-shenzhen"]
    for table in shenzhen.splits.values():
        suffix = np.array([table.images.describe(i).endswith("_1.png") for i in range(len(table))])
        np.testing.assert_array_equal(table.labels[:, 0] == 1, suffix)


CLEAN = AcquisitionStyle(noise=0.0, blur=(0.0, 0.0), rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0)


def finding_difference(finding: str, seed: int, size: int = 64) -> np.ndarray:
    """The same patient and seed drawn with minus without one finding (noise-free acquisition)."""
    anatomy = sample_anatomy(np.random.default_rng([seed, 1]), "F" if seed % 2 else "M")
    with_it = draw_chest(np.random.default_rng([seed, 2]), anatomy, {finding: 1.0}, size, CLEAN)
    without = draw_chest(np.random.default_rng([seed, 2]), anatomy, {}, size, CLEAN)
    return with_it.astype(int) - without.astype(int)


# finding -> (sign of the change, where its centre of mass lies: rows as a fraction of the image)
EXPECTED_CHANGE = {
    "Pleural Effusion": (1, (0.5, 0.8)),
    "Cardiomegaly": (1, (0.45, 0.75)),
    "Tuberculosis": (1, (0.15, 0.45)),
    "Pneumothorax": (-1, (0.15, 0.55)),
    "Edema": (1, (0.35, 0.7)),
    "Atelectasis": (1, (0.4, 0.75)),
    "Consolidation": (1, (0.2, 0.7)),
    "Nodule": (1, (0.15, 0.8)),
    "Mass": (1, (0.15, 0.8)),
    "Support Devices": (1, (0.0, 0.6)),
}


@pytest.mark.parametrize("finding", DRAWN_FINDINGS)
def test_findings_are_visible_local_changes_of_the_expected_kind(finding):
    sign, (top, bottom) = EXPECTED_CHANGE[finding]
    for seed in range(4):
        diff = finding_difference(finding, seed)
        visible = np.abs(diff) > 25  # clearly visible grey-level change at 64 px
        assert visible.sum() >= 20, f"{finding} barely drawn (seed {seed})"
        assert visible.mean() < 0.3, f"{finding} changed the whole image (seed {seed})"
        assert np.sign(diff[visible].mean()) == sign
        rows = np.nonzero(visible)[0].mean() / diff.shape[0]
        assert top <= rows <= bottom, f"{finding} centred at row fraction {rows:.2f} (seed {seed})"


@pytest.mark.parametrize("site_index, finding", [(2, "Tuberculosis"), (1, "Atelectasis"), (0, "Pleural Effusion")])
def test_findings_are_learnable_from_thumbnails_in_each_sites_style(site_index, finding):
    """Logistic regression on 16 x 16 thumbnails of 160 images (half with the finding, drawn in the
    site's acquisition style) separates them: the finding survives the style at low resolution."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    style = DEMO_SITES[site_index].style
    y = np.arange(160) % 2
    thumbs = []
    for i, positive in enumerate(y):
        rng = np.random.default_rng([9, i])
        anatomy = sample_anatomy(rng, "M" if i % 4 < 2 else "F")
        image = draw_chest(rng, anatomy, {finding: rng.uniform(0.75, 1.0)} if positive else {}, 64, style)
        thumbs.append(np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel() / 255)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=500))
    scores = cross_val_predict(model, np.stack(thumbs), y, cv=4, method="predict_proba")[:, 1]
    assert roc_auc_score(y, scores) > 0.85


def test_readme_yamls_and_marker_say_what_was_generated(demo):
    readme = (demo / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "not images of real patients" in readme
    for site in DEMO_SITES:
        config = yaml.safe_load((demo / "sites" / f"{site.name}.yaml").read_text())
        assert config["root"] == f"../{site.name}" and config["dataset"] == site.dataset
        assert "SYNTHETIC" in (demo / "sites" / f"{site.name}.yaml").read_text()
    marker = json.loads((demo / MARKER_FILE).read_text())
    assert (marker["seed"], marker["size"], marker["counts"]) == (3, SIZE, COUNTS)


def test_repository_demo_site_configs_match_the_generated_ones(demo):
    for site in DEMO_SITES:
        repo = yaml.safe_load((REPO / "sites" / f"{site.name}.yaml").read_text())
        generated = yaml.safe_load((demo / "sites" / f"{site.name}.yaml").read_text())
        assert repo.pop("root") == f"../demo-data/{site.name}"
        generated.pop("root")
        assert repo == generated


def test_ensure_generates_only_when_absent_incomplete_or_different(tmp_path):
    out = tmp_path / "demo-data"
    small = {"demo-nih": 12, "demo-chexpert": 12, "demo-shenzhen": 8}
    paths = ensure_demo_federation(out, seed=1, size=32, counts=small)
    assert all(p.is_file() for p in paths) and demo_is_complete(out, 1, 32, small)
    stamp = (out / MARKER_FILE).stat().st_mtime_ns
    sentinel = out / "demo-nih" / "kept.txt"
    sentinel.write_text("")
    ensure_demo_federation(out, seed=1, size=32, counts=small)
    assert sentinel.exists() and (out / MARKER_FILE).stat().st_mtime_ns == stamp  # untouched
    ensure_demo_federation(out, seed=2, size=32, counts=small)  # another seed: regenerated
    assert not sentinel.exists() and json.loads((out / MARKER_FILE).read_text())["seed"] == 2
    (out / MARKER_FILE).unlink()  # as after an interrupted generation
    assert not demo_is_complete(out, 2, 32, small)
    ensure_demo_federation(out, seed=2, size=32, counts=small)
    assert demo_is_complete(out, 2, 32, small)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ArkfedError, match="unknown demo site"):
        generate_demo_federation(tmp_path, counts={"demo-mars": 3})
    with pytest.raises(ArkfedError, match="at least 32 px"):
        generate_demo_federation(tmp_path, size=8)
