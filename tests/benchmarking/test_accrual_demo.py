"""The opt-in demo-vindr site: a fair held-out site for the accrual benchmark."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml

from arkfed.demo.generate import generate_demo_federation
from arkfed.demo.layouts import vindr_image_id
from arkfed.demo.sites import ALL_DEMO_SITES, DEMO_SITES, EXTRA_DEMO_SITES, plan_site
from arkfed.site.load import load_site

REPO = Path(__file__).resolve().parents[2]
SMALL = {"demo-nih": 10, "demo-chexpert": 10, "demo-shenzhen": 8, "demo-vindr": 160}
VINDR = EXTRA_DEMO_SITES[0]


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_vindr_is_opt_in_and_leaves_the_other_sites_unchanged(tmp_path):
    three = generate_demo_federation(tmp_path / "three", seed=0, size=32, counts=SMALL)
    four = generate_demo_federation(tmp_path / "four", seed=0, size=32, counts=SMALL, sites=[s.name for s in ALL_DEMO_SITES])
    assert [p.stem for p in three] == [s.name for s in DEMO_SITES] and [p.stem for p in four][-1] == "demo-vindr"
    for site in DEMO_SITES:
        assert tree(tmp_path / "three" / site.name) == tree(tmp_path / "four" / site.name)
    repo = yaml.safe_load((REPO / "sites" / "demo-vindr.yaml").read_text())
    generated = yaml.safe_load(four[-1].read_text())
    assert repo.pop("root") == "../demo-data/demo-vindr" and generated.pop("root") == "../demo-vindr" and repo == generated


def test_vindr_findings_need_several_other_sites():
    """The benchmark's premise: every finding drawn at demo-vindr is drawn at some other site, and
    no single other site has them all."""
    def drawn(site) -> set[str]:
        return set(site.prevalence) - {"Support Devices"}  # canonical names (arkfed.data.findings)

    vindr = drawn(VINDR) - {"Mass"}  # Mass and Nodule are one VinDr label (Nodule/Mass)
    union = set().union(*(drawn(s) for s in DEMO_SITES))
    assert vindr <= union
    assert all(not vindr <= drawn(s) for s in DEMO_SITES)
    assert sum(bool(vindr & drawn(s)) for s in DEMO_SITES) == 3


def test_vindr_site_reads_through_the_plugin_with_reader_votes(tmp_path):
    paths = generate_demo_federation(tmp_path, seed=2, size=32, counts={"demo-vindr": 160}, sites=["demo-vindr"])
    site = load_site(paths[0])
    assert site.schema.task == "multilabel" and len(site.schema.classes) == 28
    labelled = {"Cardiomegaly", "Pleural effusion", "Consolidation", "Nodule/Mass", "Tuberculosis", "No finding"}
    for name, table in site.splits.items():
        positives = {c for c, n in zip(site.schema.classes, np.nansum(table.labels, axis=0)) if n > 0}
        assert positives <= labelled, name
    truth = {vindr_image_id(2, VINDR, image): image for image in plan_site(VINDR, ALL_DEMO_SITES.index(VINDR), 2, 160)}
    tb = site.schema.classes.index("Tuberculosis")
    agree, total = 0, 0
    for split in ("train", "val"):
        table = site.split(split)
        for row, patient in enumerate(table.meta["patient_id"]):
            agree += int(table.labels[row, tb] == float("Tuberculosis" in truth[patient].findings))
            total += 1
    assert 0.85 < agree / total  # majority of three noisy readers: mostly, not always, the truth
    test = site.split("test")
    exact = [test.labels[r, tb] == float("Tuberculosis" in truth[p].findings) for r, p in enumerate(test.meta["patient_id"])]
    assert all(exact)  # the test file is the consensus: the truth
