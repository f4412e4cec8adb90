"""The data commands end to end through the CLI: demo-data, validate, list-datasets, add-dataset."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import arkfed.demo.generate
import arkfed.demo.sites
from arkfed.cli import app, main

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run through ``arkfed.cli.main`` (the console script) to see exit codes and one-line errors."""
    monkeypatch.setattr(sys, "argv", ["arkfed", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    """`arkfed demo-data` with the demo sites shrunk to a few images each."""
    out = tmp_path_factory.mktemp("cli_demo") / "demo"
    small = tuple(dataclasses.replace(s, images=n) for s, n in zip(arkfed.demo.generate.DEMO_SITES, (30, 30, 24)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(arkfed.demo.generate, "DEMO_SITES", small)
        patch.setattr(arkfed.demo.generate, "ALL_DEMO_SITES", small + arkfed.demo.sites.EXTRA_DEMO_SITES)
        result = run("demo-data", out, "--seed", "5", "--size", "32")
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output and "demo-shenzhen" in result.output
    return out


def test_demo_data_writes_three_sites_that_validate(small_demo):
    assert sorted(p.name for p in (small_demo / "sites").glob("*.yaml")) == ["demo-chexpert.yaml", "demo-nih.yaml", "demo-shenzhen.yaml"]
    for name in ("demo-nih", "demo-chexpert", "demo-shenzhen"):
        result = run("validate", small_demo / "sites" / f"{name}.yaml")
        assert result.exit_code == 0, result.output
        assert f"site {name}: OK" in result.output and "positive / negative / uncertain / missing" in result.output
    with Image.open(next((small_demo / "demo-nih" / "images").glob("*.png"))) as img:
        assert img.size == (32, 32)


def test_validate_sample_and_no_check_images(small_demo):
    result = run("validate", small_demo / "sites" / "demo-shenzhen.yaml", "--sample", "5")
    assert result.exit_code == 0 and "read 5 of 24 images" in result.output
    result = run("validate", small_demo / "sites" / "demo-shenzhen.yaml", "--no-check-images")
    assert result.exit_code == 0 and "read " not in result.output


def test_validate_exits_non_zero_naming_unreadable_files(small_demo, tmp_path):
    victim = sorted((small_demo / "demo-shenzhen" / "CXR_png").glob("*.png"))[0]
    original = victim.read_bytes()
    victim.write_bytes(b"not an image")
    try:
        result = run("validate", small_demo / "sites" / "demo-shenzhen.yaml")
    finally:
        victim.write_bytes(original)
    assert result.exit_code == 1
    assert victim.name in result.output and "1 error(s)" in result.output


def test_validate_load_error_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "s.yaml").write_text("name: s\ndataset: chexpert\nroot: missing\nextra_key: 1\n")
    code, output = run_main(monkeypatch, capsys, "validate", tmp_path / "s.yaml")
    assert code == 1
    lines = [line for line in output.splitlines() if line.strip()]
    allowed = "name, dataset, root, options, split, split_lists, labels, image_size, state_dir, max_images, cache, compute, policy"
    assert lines == [f"error: {tmp_path / 's.yaml'}: field 'extra_key': unknown key (allowed: {allowed})"]


def test_list_datasets_shows_schemas_and_broken_plugins(tmp_path):
    folder = tmp_path / "cli_list_plugins"
    folder.mkdir()
    (folder / "cli_broken_plugin.py").write_text("raise RuntimeError('half-installed')\n")
    result = runner.invoke(app, ["list-datasets", "--plugins-dir", str(folder)], catch_exceptions=False, env={"COLUMNS": "1000"})
    assert result.exit_code == 0
    assert "Tuberculosis" in result.output
    assert "No Finding, Enlarged Cardiomediastinum, Cardiomegaly*, Lung Opacity, Lung Lesion, Edema*" in result.output
    assert "set by the site's options" in result.output  # csv: no schema without options
    assert "failed to load plugin cli_broken_plugin" in result.output and "half-installed" in result.output


def test_add_dataset_writes_validates_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    rows = ["image,patient,Pneumonia"]
    for i in range(40):
        Image.fromarray(np.full((16, 16), 5 * i, dtype=np.uint8)).save(data / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,p{i},{i % 2}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["add-dataset", "cli_pneumo", "--labels", data / "labels.csv", "--image-column", "image", "--task", "binary",
            "--patient-column", "patient", "--plugins-dir", tmp_path / "plugins", "--sites-dir", tmp_path / "sites"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "binary[Pneumonia]" in result.output and "site cli_pneumo: OK" in result.output
    assert (tmp_path / "plugins" / "cli_pneumo.py").is_file() and (tmp_path / "sites" / "cli_pneumo.yaml").is_file()
    code, output = run_main(monkeypatch, capsys, *args)
    assert code == 2 and output.strip() == f"error: {tmp_path / 'plugins' / 'cli_pneumo.py'} already exists; pass --force to overwrite it"
    code, output = run_main(monkeypatch, capsys, *args[:-4], "--task", "trinary")
    assert code == 2 and output.strip().startswith("error: --task: Input should be")


def test_help_lists_the_data_commands():
    result = run("--help")
    for command in ("demo-data", "validate", "list-datasets", "add-dataset"):
        assert command in result.output
