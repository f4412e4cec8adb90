"""--protocol arkfed|ark: the evaluation commands read a site as arkfed does or as Ark does, and record which."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.data.findings import CHEXPERT_CLASSES
from arkfed.data.schema import CHEXPERT_LABELER_SCHEMA
from arkfed.errors import ArkfedError
from arkfed.run.provenance import dataset_fingerprint
from arkfed.site.config import SiteConfig
from arkfed.site.load import load_site, with_protocol
from eval_fixtures import make_run_folder, schemas, write_site

FOLDER = "CheXpert-v1.0-small"


def phantom_chexpert(root: Path, options: dict | None = None) -> Path:
    """A phantom CheXpert: 6 frontal training images; valid.csv with 2 frontal and 2 lateral images
    (Stanford's has 32 laterals among 234). Returns the site YAML."""
    def row(path: str, view: str, value: float) -> dict:
        return {"Path": path, "Sex": "Female", "Age": 60, "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else np.nan,
                **{c: value for c in CHEXPERT_CLASSES}}

    train = [row(f"{FOLDER}/train/patient0000{i}/study1/view1_frontal.jpg", "Frontal", float(i % 2)) for i in range(6)]
    valid = [row(f"{FOLDER}/valid/patient6454{i // 2}/study1/view{1 + i % 2}_{view.lower()}.jpg", view, float(i // 2))
             for i, view in enumerate(("Frontal", "Lateral", "Frontal", "Lateral"))]
    (root / FOLDER).mkdir(parents=True)
    for name, rows in (("train", train), ("valid", valid)):
        pd.DataFrame(rows).to_csv(root / FOLDER / f"{name}.csv", index=False)
        for r in rows:
            (root / r["Path"]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16), 100 + 40 * int(r["Cardiomegaly"]), dtype=np.uint8)).save(root / r["Path"])
    site = {"name": "phantom", "dataset": "chexpert", "root": str(root), "split": {"val_fraction": 0.2}, "options": options or {}}
    path = root / "phantom.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("protocol") / "run", sites={"phantom": CHEXPERT_LABELER_SCHEMA})


def evaluate(run: Path, site: Path, out: Path, *extra: str) -> tuple[dict, str]:
    result = CliRunner().invoke(app, ["evaluate", str(run), "--site", str(site), "--bootstrap", "0", "--min-positives", "1",
                                      "--out", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text()), result.output


def test_evaluate_protocol_ark_tests_on_all_of_valid_csv_and_records_it(run, tmp_path):
    site = phantom_chexpert(tmp_path / "data")
    ours, _ = evaluate(run, site, tmp_path / "arkfed")
    theirs, output = evaluate(run, site, tmp_path / "ark", "--protocol", "ark")
    assert ours["protocol"] == "arkfed" and theirs["protocol"] == "ark"
    assert ours["models"]["teacher"]["num_examples"] == 2  # frontal views of valid.csv
    assert theirs["models"]["teacher"]["num_examples"] == 4  # valid.csv whole, laterals included, as Ark tests
    assert "protocol_note" not in theirs  # the chexpert plugin reads protocol ark itself
    assert "protocol ark" in " ".join(output.split())


def test_protocol_defaults_to_the_site_yaml_and_the_option_overrides_it(run, tmp_path):
    site = phantom_chexpert(tmp_path / "data", {"protocol": "ark"})
    assert load_site(site).protocol == "ark" and len(load_site(site).split("test")) == 4
    assert dataset_fingerprint(load_site(site))["protocol"] == "ark"  # what a training run's provenance.json records
    overridden, _ = evaluate(run, site, tmp_path / "arkfed", "--protocol", "arkfed")
    assert overridden["protocol"] == "arkfed" and overridden["models"]["teacher"]["num_examples"] == 2
    with pytest.raises(ArkfedError, match="unknown reading protocol 'reference': use arkfed or ark"):
        load_site(site, protocol="reference")


def test_a_plugin_without_the_option_reads_alike_and_the_note_says_so(tmp_path):
    site = write_site(tmp_path, "alpha", schemas()["alpha"], {"train": 8, "val": 4, "test": 8})
    plain = load_site(site, [tmp_path / "plugins"])
    assert plain.protocol == "arkfed" and plain.protocol_note is None
    ark = load_site(site, [tmp_path / "plugins"], protocol="ark")
    assert ark.protocol == "ark" and "plugin 'evalnpz' reads its dataset the same way under protocols arkfed and ark" in ark.protocol_note
    assert np.array_equal(ark.split("test").labels, plain.split("test").labels)
    # a plugin that reads Ark's split lists: the note says when the site gives none
    _, note = with_protocol(SiteConfig(name="sz", dataset="shenzhen", root=tmp_path), "ark")
    assert "Ark's split lists were not given (site key split_lists:)" in note
    config, note = with_protocol(SiteConfig(name="cx", dataset="chexpert", root=tmp_path, options={"views": "all"}), "ark")
    assert note is None and config.options == {"views": "all", "protocol": "ark"}


def test_linear_probe_records_the_protocol_in_results_and_caption(tmp_path):
    from arkfed.evaluation.export import export_model

    export_model(make_run_folder(tmp_path / "run", sites={"beta": schemas()["beta"]}), tmp_path / "export")
    site = write_site(tmp_path, "alpha", schemas()["alpha"], {"train": 24, "val": 8, "test": 24})
    out = tmp_path / "probe"
    args = ["linear-probe", str(tmp_path / "export"), "--site", str(site), "--plugins-dir", str(tmp_path / "plugins"),
            "--seeds", "0", "--no-baseline", "--bootstrap", "0", "--protocol", "ark", "--out", str(out)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"] == "ark" and "same way under protocols" in data["protocol_note"]
    assert "protocol ark" in " ".join(result.output.split())
