"""arkfed compare: several models (run, export, plain timm file) on one site with one protocol."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.evaluation.export import export_model
from eval_fixtures import make_run_folder, pretrained_alpha, schemas, write_site


def test_compare_puts_an_ark_run_beside_an_export_and_a_plain_timm_file(tmp_path):
    schema = schemas()["alpha"]
    teacher, head = pretrained_alpha()
    run = make_run_folder(tmp_path / "ark", teacher=teacher, heads={"alpha": head}, sites={"alpha": schema})
    export_model(make_run_folder(tmp_path / "single", seed=5, sites={"beta": schemas()["beta"]}), tmp_path / "single-site")
    plain = tmp_path / "single-site" / "model.safetensors"  # a public-style timm backbone file
    site = write_site(tmp_path, "alpha", schema, {"train": 80, "val": 16, "test": 80}, seed=6)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(run), str(tmp_path / "single-site"), str(plain), "--site", str(site),
                                      "--plugins-dir", str(tmp_path / "plugins"), "--arch", "test_resnet", "--img-size", "32",
                                      "--features", "backbone", "--shots", "3,all", "--seeds", "0,1", "--finetune-epochs", "1",
                                      "--bootstrap", "200", "--min-positives", "5", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["models"] == ["ark", "single-site", "model.safetensors"] and data["reference"] == "ark"
    # own head: only the Ark run has a head for this site, and it is the trained one
    assert list(data["own_head"]) == ["ark"] and data["own_head"]["ark"]["mean_auc"] > 0.9
    low, high = data["own_head"]["ark"]["mean_auc_ci"]
    assert low <= data["own_head"]["ark"]["mean_auc"] <= high
    curve = data["probe"]["curve"]
    assert list(curve["inits"]) == ["model", "random", "single-site", "model.safetensors"]  # "model": the reference, ark
    assert data["curve_names"]["model"] == "ark"
    # the export and the plain file hold the same backbone: identical probes
    assert curve["inits"]["single-site"]["all"]["values"] == curve["inits"]["model.safetensors"]["all"]["values"]
    assert curve["inits"]["model"]["3"]["mean"] > curve["inits"]["single-site"]["3"]["mean"]  # the trained Ark backbone
    c = curve["comparisons"]["single-site"]["3"]
    assert c["p_adjusted"] >= c["p"] and c["difference"] > 0
    assert set(data["finetune"]["curve"]["inits"]) == set(curve["inits"]) - {"random"}
    assert data["bias"]["ark"]["tests"] >= 1 and set(data["bias"]) == {"ark", "single-site", "model.safetensors"}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "Holm" in result.output and "random init" in result.output
    # zero-shot beside probe and fine-tuning: the single-site export's beta head serves alpha's Effusion and Cardiomegaly
    assert data["protocol"] == "arkfed" and data["settings"]["zero_shot"] is True
    zero = data["zero_shot"]
    assert zero["single-site"]["classes"]["Effusion"]["from"] == ["beta/Pleural Effusion"]
    assert zero["single-site"]["unknown_classes"] == ["Nodule"] and 0 <= zero["single-site"]["scores"]["mean_auc"] <= 1
    assert "skipped" in zero["ark"]  # its only head is the site's own: that is the own-head column
    assert "model.safetensors" not in zero  # a plain backbone file has no heads
    assert "zero-shot AUC" in result.output and "protocol arkfed" in " ".join(result.output.split())
