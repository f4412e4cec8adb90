"""`arkfed train`: the demo path (no --sites), named sites, resume, and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.demo import generate_demo_federation
from arkfed.errors import ArkfedError

TINY = ["--model", "test_resnet", "--img-size", "32", "--projector-dim", "16", "--batch-size", "8",
        "--max-steps-per-visit", "1", "--rounds", "1", "-q"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo-data"
    generate_demo_federation(out, seed=0, size=32, counts={"demo-nih": 40, "demo-chexpert": 40, "demo-shenzhen": 30})
    return out


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, ["train", *args])


def test_train_without_sites_runs_the_demo_federation(demo_dir, tmp_path):
    result = invoke("--demo-dir", str(demo_dir), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 0, result.output
    for name in ("demo-nih", "demo-chexpert", "demo-shenzhen"):
        assert name in result.output
    assert "student AUC" in result.output and "teacher AUC" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["sites"]) == ["demo-nih", "demo-chexpert", "demo-shenzhen"]
    assert (tmp_path / "run" / "teacher.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "heads").iterdir()) == [
        "demo-chexpert.safetensors", "demo-nih.safetensors", "demo-shenzhen.safetensors"]

    # resuming a finished run trains nothing more and duplicates no metrics
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = invoke("--resume", str(tmp_path / "run"), "-q")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"kind": "visit"') == lines.count('"kind": "visit"')

    # an existing run folder is never overwritten
    clash = invoke("--demo-dir", str(demo_dir), "--out", str(tmp_path / "run"), *TINY)
    assert isinstance(clash.exception, ArkfedError) and "--resume" in str(clash.exception)


def test_train_single_named_site(demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_dir)  # names resolve to sites/NAME.yaml
    result = invoke("--sites", "demo-shenzhen", "--out", str(tmp_path / "one"), *TINY, "--ema", "per-iteration")
    assert result.exit_code == 0, result.output
    config = (tmp_path / "one" / "config.yaml").read_text()
    assert "demo-shenzhen" in config and "ema: iteration" in config


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sites", "no-such-site"], "sites/no-such-site.yaml"),
        (["--crop-scale", "0.9,0.2"], "crop"),
        (["--crop-scale", "half"], "MIN,MAX"),
        (["--views", "sideways"], "views"),
    ],
)
def test_bad_options_give_one_line_errors(demo_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(demo_dir)
    base = ["--sites", "demo-shenzhen"] if "--sites" not in args else []
    result = invoke(*base, *args, "--out", str(tmp_path / "x"), *TINY)
    assert isinstance(result.exception, ArkfedError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "x").exists()
