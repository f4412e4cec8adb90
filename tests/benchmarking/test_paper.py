"""``arkfed benchmark paper``: the paper's table beside arkfed's, on the synthetic demo at the smoke budget."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from arkfed.benchmarking.published import PUBLISHED
from arkfed.errors import ArkfedError
from arkfed.site.config import SiteConfig
from arkfed.site.load import with_protocol


def test_published_values_and_their_sources():
    values = {p.target: (p.dataset, p.metric, p.value) for p in PUBLISHED}
    assert values == {"CheXpert": ("chexpert", "mAUC", 89.14), "ChestX-ray14": ("chestxray14", "mAUC", 83.05),
                      "RSNA Pneumonia": ("rsna_pneumonia", "accuracy", 74.76), "VinDr-CXR": ("vindr_cxr", "mAUC", 95.07),
                      "Shenzhen": ("shenzhen", "mAUC", 98.99)}
    assert all(p.source and p.classes for p in PUBLISHED)


def test_protocol_is_set_where_the_plugin_has_the_option(tmp_path):
    chexpert = SiteConfig(name="a", dataset="chexpert", root=tmp_path, options={"views": "all"})
    assert with_protocol(chexpert, "ark")[0].options == {"views": "all", "protocol": "ark"}
    shenzhen = SiteConfig(name="b", dataset="shenzhen", root=tmp_path)
    read, note = with_protocol(shenzhen, "ark")
    assert read is shenzhen and "reads its dataset the same way" in note  # no protocol option: read as its plugin reads


@pytest.mark.slow  # trains and fine-tunes end to end (tests/conftest.py: `make test-fast` skips it)
def test_paper_command_on_the_demo_writes_published_beside_measured_and_resumes(tmp_path):
    from arkfed.cli import app

    out = tmp_path / "paper"
    args = ["benchmark", "paper", "--budget", "smoke", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["synthetic"] and results["protocol"] == "ark" and results["budget_name"] == "smoke" and results["runs"] == 2
    assert results["environment"]["device"] == "cpu" and results["reading"]["demo-chexpert"] == "protocol: ark"
    assert results["model"]["trained_here"] and results["model"]["steps"] > 0
    rows = {r["target"]: r for r in results["rows"]}
    assert [r["target"] for r in results["rows"]] == ["CheXpert", "ChestX-ray14", "RSNA Pneumonia", "VinDr-CXR", "Shenzhen"]
    assert rows["RSNA Pneumonia"]["status"] == "not present locally" and rows["RSNA Pneumonia"]["published"] == 74.76
    measured = {"CheXpert": "demo-chexpert", "ChestX-ray14": "demo-nih", "VinDr-CXR": "demo-vindr", "Shenzhen": "demo-shenzhen"}
    for target, site in measured.items():
        row = rows[target]
        assert row["site"] == site and row["status"] == "measured" and row["published_source"]
        assert row["model"]["n"] == row["random"]["n"] == 2 and 0.0 <= row["model"]["mean"] <= 100.0
        assert row["imagenet"] == {"status": "not run (no local weights)"} and "mean" in row["model_minus_random"]
    md = (out / "results.md").read_text()
    for text in ("Ark-6, published", "from the model, measured", "89.14 (published)", "not present locally", "not run (no local weights)",
                 "budget `smoke`", "**Hardware**: cpu", "**Protocol** `ark`", "n = 2", "Synthetic demo data"):
        assert text in md, text
    records = (out / "records.jsonl").read_text().splitlines()
    assert len(records) == 1 + 2 * 4 * 2  # the Ark model trained here, then 2 runs x 4 targets x (model, random)

    again = CliRunner().invoke(app, args)  # everything is recorded: nothing retrains
    assert again.exit_code == 0 and (out / "records.jsonl").read_text().splitlines() == records
    report = CliRunner().invoke(app, [*args, "--report-only"])
    assert report.exit_code == 0 and "89.14 (published)" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["model"]["steps"] == results["model"]["steps"]
    other = CliRunner().invoke(app, [*args, "--protocol", "arkfed"])
    assert isinstance(other.exception, ArkfedError) and "another setup" in str(other.exception)


@pytest.mark.slow
def test_paper_imagenet_column_from_a_local_file(tmp_path):
    """With --model and --imagenet (local files), a site's row has all three columns; a missing file is refused."""
    from arkfed.cli import app
    from arkfed.demo.generate import generate_demo_federation

    paths = generate_demo_federation(tmp_path / "demo", seed=0, size=32, counts={"demo-shenzhen": 40}, sites=["demo-shenzhen"])
    torch.manual_seed(1)
    weights = tmp_path / "in1k.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, weights)
    args = ["benchmark", "paper", "--sites", str(paths[0]), "--budget", "smoke", "--runs", "1", "--model", str(weights),
            "--arch", "test_resnet", "--img-size", "32", "--imagenet", str(weights), "--out", str(tmp_path / "paper")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "paper" / "results.json").read_text())
    row = next(r for r in results["rows"] if r["target"] == "Shenzhen")
    assert not results["synthetic"] and list(results["reading"]) == ["demo-shenzhen"]
    assert "reads its dataset the same way under protocols arkfed and ark" in results["reading"]["demo-shenzhen"]
    assert {row[i]["n"] for i in ("model", "imagenet", "random")} == {1} and results["model"]["source"].endswith("in1k.safetensors")
    assert results["model"]["spec"]["img_size"] == 32
    assert all(r["status"] == "not present locally" for r in results["rows"] if r["target"] != "Shenzhen")
    missing = CliRunner().invoke(app, [*args[:-4], "--imagenet", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "p2")])
    assert isinstance(missing.exception, ArkfedError) and "nothing is downloaded" in str(missing.exception)


@pytest.mark.parametrize("protocol", ["ARK", "none"])
def test_unknown_protocol_is_refused(tmp_path, protocol):
    from arkfed.benchmarking.budget import BUDGETS
    from arkfed.benchmarking.paper import benchmark_paper

    with pytest.raises(ArkfedError, match="--protocol"):
        benchmark_paper(None, BUDGETS["smoke"], tmp_path, protocol=protocol)
