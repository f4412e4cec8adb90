"""`arkfed train`: the demo path (no --sites), named sites, resume, and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.demo.generate import generate_demo_federation
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
    result = invoke("--sites", "demo-shenzhen", "--out", str(tmp_path / "one"), *TINY, "--ema", "iteration")
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


def test_train_and_coordinator_resolve_the_same_config_from_one_file(demo_dir, tmp_path, monkeypatch):
    """One run configuration: the same file and options give the same config.yaml whether the run
    is local (`train`) or federated (`coordinator`); options override the file, which overrides the
    recipe."""
    import yaml

    monkeypatch.chdir(demo_dir)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "sites": ["demo-nih", "demo-shenzhen"], "recipe": "demo", "rounds": 1, "mode": "cyclic",
        "model": {"model": "test_resnet", "img_size": 32, "projector_dim": 16},
        "settings": {"batch_size": 8, "max_steps_per_visit": 1, "optimizer": "sgd", "weight_decay": 0.0, "jitter_p": 0.2},
    }))
    runner = CliRunner(env={"COLUMNS": "200"})
    extra = ["--lr", "0.02", "--warmup-visits", "1", "--max-consistency", "0.3"]
    train = runner.invoke(app, ["train", "--config", str(run_yaml), "--dry-run", *extra])
    coordinator = runner.invoke(app, ["coordinator", "--config", str(run_yaml), "--dry-run", *extra])
    assert train.exit_code == 0 and coordinator.exit_code == 0, train.output + coordinator.output
    assert train.stdout == coordinator.stdout
    resolved = yaml.safe_load(train.stdout)
    assert resolved["settings"]["lr"] == 0.02 and resolved["settings"]["optimizer"] == "sgd"  # option > file
    assert resolved["settings"]["crop_scale"] == [0.7, 1.0] and resolved["recipe"] == "demo"  # file > recipe
    assert resolved["settings"]["jitter_p"] == 0.2 and resolved["settings"]["max_consistency"] == 0.3

    result = invoke("--config", str(run_yaml), "--out", str(tmp_path / "run"), "-q", *extra)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == resolved


def test_both_commands_offer_every_run_setting():
    import click
    import typer.main

    from arkfed.cli.options import run_options

    commands = typer.main.get_command(app).commands
    wanted = {f"--{o.param.replace('_', '-')}" for o in run_options()}
    for name in ("train", "coordinator"):
        flags = {opt for p in commands[name].params if isinstance(p, click.Option) for opt in p.opts}
        assert wanted <= flags, (name, wanted - flags)
    for flag in ("--optimizer", "--weight-decay", "--warmup-visits", "--views", "--ema", "--momentum-teacher",
                 "--projector", "--jitter-p", "--max-consistency", "--momentum", "--mode", "--weighting"):
        assert flag in wanted


def test_recipe_list_records_the_as_run_options():
    result = invoke("--recipe", "list")
    assert result.exit_code == 0, result.output
    for text in ("ark: Ark-6 as published", "ark-documented: ", "ark+-documented: ", "lr_schedule ark-as-run", "optimizer_state carry",
                 "multiclass_loss bce", "dataset_resize chestxray14=224,vindr_cxr=224", "lr_schedule cosine", "optimizer_state reset"):
        assert text in result.output, text


def test_federated_runs_reset_the_optimizer_a_recipe_would_carry():
    from arkfed.cli.options import resolve_run_config

    assert resolve_run_config(["a"], {}, recipe="ark").settings.optimizer_state == "carry"
    federated = resolve_run_config(["a"], {}, recipe="ark", federated=True)
    assert federated.settings.optimizer_state == "reset" and federated.settings.lr_schedule == "ark-as-run"
    with pytest.raises(ArkfedError, match="would leave the site"):
        resolve_run_config(["a"], {"settings.optimizer_state": "carry"}, recipe="ark", federated=True)
