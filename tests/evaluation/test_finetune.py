"""arkfed finetune: full fine-tuning with a new head, from the model and from a random init."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.errors import ArkfedError
from arkfed.evaluation.finetune import FineTuneNet, initial_backbone
from arkfed.model.ark import ArkModel
from eval_fixtures import make_run_folder, pretrained_alpha, schemas, tiny_spec, write_site


def test_initial_backbone_copies_the_model_or_draws_a_fresh_one():
    torch.manual_seed(0)
    model = ArkModel(tiny_spec()).eval()
    x = torch.randn(2, 3, 32, 32)
    copied, fresh = initial_backbone(model, "model", 0).eval(), initial_backbone(model, "random", 0).eval()
    with torch.no_grad():
        assert torch.equal(copied(x), model.features(x))
        assert not torch.allclose(fresh(x), model.features(x), atol=1e-3)
        before = model.features(x)
        next(copied.parameters()).add_(1.0)
        assert torch.equal(model.features(x), before)  # the source model is untouched
    net = FineTuneNet(copied, 3)
    assert net(x).shape == (2, 3)


def test_finetune_cli_pretrained_beats_random_init_on_a_small_site(tmp_path):
    schema = schemas()["alpha"]
    teacher, head = pretrained_alpha()
    run = make_run_folder(tmp_path / "run", teacher=teacher, heads={"alpha": head}, sites={"alpha": schema})
    site = write_site(tmp_path, "small", schema, {"train": 32, "val": 32, "test": 64}, seed=7)
    out = tmp_path / "ft"
    result = CliRunner().invoke(app, ["finetune", str(run), "--site", str(site), "--plugins-dir", str(tmp_path / "plugins"),
                                      "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--init", "model", "--init", "random",
                                      "--bootstrap", "300", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    runs = {r["init"]: r for r in data["runs"]}
    # one seed: no test over seeds, and the table's CI is the bootstrap over test images
    assert data["curve"]["sizes"] == ["all"] and data["curve"]["comparisons"]["random"]["all"]["p"] is None
    low, high = data["curve"]["inits"]["model"]["all"]["bootstrap_ci"]
    assert low <= runs["model"]["test"]["mean_auc"] <= high and runs["model"]["test"]["bootstrap"]["unit"] == "patient"
    assert set(runs) == {"model", "random"}
    for r in runs.values():
        assert len(r["history"]) == 3 and 0 <= r["best_epoch"] < 3
        assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]  # it trains
        assert r["test"]["num_examples"] == 64
    # knowledge carried by the pretrained backbone: clearly better after the same short fine-tuning
    assert runs["model"]["test"]["mean_auc"] > 0.9
    assert runs["model"]["test"]["mean_auc"] > runs["random"]["test"]["mean_auc"] + 0.03


def test_finetune_cli_rejects_unknown_init(tmp_path):
    run = make_run_folder(tmp_path / "run", sites={"alpha": schemas()["alpha"]})
    site = write_site(tmp_path, "s", schemas()["alpha"], {"train": 8, "val": 4, "test": 8})
    with pytest.raises(ArkfedError, match="--init takes model, random or imagenet"):
        CliRunner().invoke(app, ["finetune", str(run), "--site", str(site), "--plugins-dir", str(tmp_path / "plugins"),
                                 "--init", "scratch", "--out", str(tmp_path / "o")], catch_exceptions=False)
