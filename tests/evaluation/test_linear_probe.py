"""arkfed linear-probe: few-shot selection, probes on frozen embeddings, the random-init baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.data.schema import label_targets
from arkfed.errors import ArkfedError
from arkfed.evaluation.linear_probe import ProbeSettings, few_shot_rows, linear_probe
from eval_fixtures import make_run_folder, pretrained_alpha, schemas, synthetic_table, write_site


@pytest.fixture(scope="module")
def pretrained():
    return pretrained_alpha()[0]


def test_shots_pick_k_positive_and_k_negative_per_class_multilabel():
    schema = schemas()["alpha"]
    table = synthetic_table(schema, 200, 0)
    targets, mask = label_targets(table.labels, schema)
    rows = few_shot_rows(targets, mask, schema, shots=4, seed=0)
    assert len(rows) == len(set(rows)) <= 2 * 4 * 3
    for k in range(3):  # every class has at least K positives and K negatives in the subset
        assert (targets[rows, k] == 1).sum() >= 4 and (targets[rows, k] == 0).sum() >= 4
    assert not np.array_equal(rows, few_shot_rows(targets, mask, schema, shots=4, seed=1))


def test_shots_multiclass_and_fraction():
    schema = schemas()["gamma"]
    table = synthetic_table(schema, 90, 0)
    targets, mask = label_targets(table.labels, schema)
    rows = few_shot_rows(targets, mask, schema, shots=5, seed=0)
    assert np.bincount(targets[rows].argmax(1), minlength=3).tolist() == [5, 5, 5]
    assert len(few_shot_rows(targets, mask, schema, fraction=0.2, seed=0)) == 18
    with pytest.raises(ArkfedError, match="either --shots or --fraction"):
        few_shot_rows(targets, mask, schema, shots=2, fraction=0.5)


def test_probe_learns_from_frozen_embedding_and_reads_the_model(pretrained):
    schema = schemas()["alpha"]
    train, test = synthetic_table(schema, 120, 1), synthetic_table(schema, 120, 2)
    full = linear_probe(pretrained, train, test, schema, ProbeSettings(seeds=(0,)))
    few = linear_probe(pretrained, train, test, schema, ProbeSettings(shots=3, seeds=(0, 1, 2)))
    assert full["mean_auc"] > 0.95
    assert few["mean_auc"] > 0.85 and [r["train_size"] for r in few["runs"]] != [120] * 3

    # a model whose projector outputs a constant carries no information: chance exactly ...
    blind = pretrained.__class__(pretrained.spec).eval()
    blind.load_state_dict(pretrained.state_dict())
    with torch.no_grad():
        blind.projector.weight.zero_()
    assert linear_probe(blind, train, test, schema, ProbeSettings(seeds=(0,)))["mean_auc"] == pytest.approx(0.5)
    # ... while its backbone features (unchanged) still do, and a random init is a different model
    assert linear_probe(blind, train, test, schema, ProbeSettings(seeds=(0,), features="backbone"))["mean_auc"] > 0.9
    random = linear_probe(blind, train, test, schema, ProbeSettings(seeds=(0, 1), init="random"))
    assert random["mean_auc"] > 0.6
    assert random["mean_auc_std"] > 0  # each seed probes its own random model


def test_linear_probe_cli_few_shot_curve_against_random_init_and_a_compared_model(tmp_path, pretrained):
    """Shots 2 and all, three seeds: the pretrained model, a random init and a compared export
    (an untrained model) on one curve, paired t-tests, Holm-corrected, one PNG."""
    from arkfed.evaluation.export import export_model

    schema = schemas()["gamma"]
    run = make_run_folder(tmp_path / "run", teacher=pretrained, sites={"alpha": schemas()["alpha"]})
    export_model(make_run_folder(tmp_path / "other", seed=4, sites={"alpha": schemas()["alpha"]}), tmp_path / "untrained")
    site = write_site(tmp_path, "gamma", schema, {"train": 60, "val": 8, "test": 60}, seed=3)
    out = tmp_path / "probe"
    result = CliRunner().invoke(app, ["linear-probe", str(run), "--site", str(site), "--plugins-dir", str(tmp_path / "plugins"),
                                      "--train-sizes", "2,all", "--seeds", "0,1,2", "--compare", str(tmp_path / "untrained"),
                                      "--features", "backbone", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    curve = data["curve"]
    model = curve["inits"]["model"]
    assert list(curve["inits"]) == ["model", "random", "untrained"] and curve["sizes"] == ["2", "all"]
    assert [r["train_size"] for r in data["runs"] if r["init"] == "model" and r["size"] == "2"] == [6, 6, 6]
    assert curve["inits"]["model"]["all"]["train_size"] == 60
    # at "all" the probe of a fixed model is deterministic: the seeds carry no evidence, so that
    # pair is not tested (random init draws a new model per seed and is); 3 tests in the family
    assert curve["test"].startswith("paired t-test") and curve["tests_in_family"] == 3
    assert curve["comparisons"]["untrained"]["all"]["verdict"].startswith("not tested")
    untrained = curve["inits"]["untrained"]["all"]  # zero-width over seeds: the bootstrap over test images is shown instead
    assert untrained["ci"][0] == untrained["ci"][1] and untrained["bootstrap_ci"][0] < untrained["mean"] < untrained["bootstrap_ci"][1]
    assert model["all"]["mean"] > 0.8 and model["2"]["ci"][0] <= model["2"]["mean"] <= model["2"]["ci"][1]
    for other in ("random", "untrained"):
        for size in ("2", "all"):
            c = curve["comparisons"][other][size]
            assert c["difference"] == pytest.approx(model[size]["mean"] - curve["inits"][other][size]["mean"])
            assert c["p"] is None and c["p_adjusted"] is None if (other, size) == ("untrained", "all") else c["p_adjusted"] >= c["p"]
    assert data["site"] == "gamma" and 0 <= data["runs"][0]["accuracy"] <= 1
    assert (out / "linear-probe.png").read_bytes()[:4] == b"\x89PNG"
    assert "paired t-test" in result.output


def test_probe_accepts_run_folder_export_weights_file_and_plain_timm_file(tmp_path, pretrained):
    from arkfed.evaluation.export import export_model

    schema = schemas()["alpha"]
    run = make_run_folder(tmp_path / "run", teacher=pretrained, sites={"alpha": schema})
    export_model(run, tmp_path / "export")
    site = write_site(tmp_path, "alpha", schema, {"train": 40, "val": 4, "test": 40}, seed=4)
    sources = {
        "run": [str(run)],
        "export": [str(tmp_path / "export")],
        "file": [str(run / "teacher.safetensors")],
        "timm": [str(tmp_path / "export" / "model.safetensors"), "--arch", "test_resnet", "--img-size", "32"],
    }
    aucs = {}
    for name, model_args in sources.items():
        out = tmp_path / f"probe-{name}"
        result = CliRunner().invoke(app, ["linear-probe", *model_args, "--site", str(site), "--plugins-dir", str(tmp_path / "plugins"),
                                          "--features", "backbone", "--seeds", "0", "--no-baseline", "--out", str(out)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        aucs[name] = json.loads((out / "results.json").read_text())["auc"]["model"]["all"]
    for name in ("export", "file", "timm"):  # the same backbone, whatever the container
        assert aucs[name] == pytest.approx(aucs["run"], abs=1e-6), name


def test_plain_backbone_file_without_arch_is_a_clear_error(tmp_path, pretrained):
    from arkfed.evaluation.export import export_model

    schema = schemas()["alpha"]
    export_model(make_run_folder(tmp_path / "run", teacher=pretrained, sites={"alpha": schema}), tmp_path / "export")
    site = write_site(tmp_path, "alpha", schema, {"train": 8, "val": 4, "test": 8})
    with pytest.raises(ArkfedError, match=r"model.safetensors: a plain backbone file carries no architecture; pass --arch"):
        CliRunner().invoke(app, ["linear-probe", str(tmp_path / "export" / "model.safetensors"), "--site", str(site),
                                 "--plugins-dir", str(tmp_path / "plugins"), "--out", str(tmp_path / "o")], catch_exceptions=False)
