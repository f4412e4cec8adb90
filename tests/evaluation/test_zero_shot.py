"""arkfed zero-shot: a site's classes scored by the heads of other sites, through the findings vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from arkfed.ark.metrics import roc_auc
from arkfed.cli import app
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable
from arkfed.errors import ArkfedError
from arkfed.evaluation.embeddings import embed_table
from arkfed.evaluation.zero_shot import ZeroShotSettings, class_sources, zero_shot
from arkfed.model.ark import SiteHead
from arkfed.model.weights import load_heads
from arkfed.site.load import load_site
from eval_fixtures import make_run_folder, pretrained_alpha, schemas, tiny_spec, write_site

# drawn at the places of alpha's Effusion and Cardiomegaly; Pneumothorax at the place of alpha's Nodule
DELTA = LabelSchema(task="multilabel", classes=("Pleural Effusion", "Cardiomegaly", "Pneumothorax"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run trained on site alpha only, and site delta, which it never saw."""
    folder = tmp_path_factory.mktemp("zero-shot")
    teacher, head = pretrained_alpha()
    run = make_run_folder(folder / "run", teacher=teacher, heads={"alpha": head}, sites={"alpha": schemas()["alpha"]})
    site = write_site(folder, "delta", DELTA, {"train": 16, "val": 8, "test": 120}, seed=7)
    return run, site, folder / "plugins"


def test_classes_map_through_the_vocabulary_to_every_head_that_knows_them(tmp_path):
    heads = load_heads(make_run_folder(tmp_path / "run") / "heads")  # alpha, beta and the multiclass gamma
    schema = LabelSchema(task="multilabel", classes=("Pleural Effusion", "Cardiomegaly", "TB", "Pneumothorax", "Goitre"))
    sources = class_sources(heads, schema)
    assert sources["Pleural Effusion"] == {"canonical": "Pleural Effusion", "from": ["alpha/Effusion", "beta/Pleural Effusion"]}
    assert sources["Cardiomegaly"]["from"] == ["alpha/Cardiomegaly", "beta/Cardiomegaly"]
    assert sources["TB"] == {"canonical": "Tuberculosis", "from": ["gamma/Tuberculosis"]}  # a synonym, served by a multiclass head
    assert sources["Pneumothorax"] == {"canonical": "Pneumothorax", "from": []}
    assert sources["Goitre"] == {"canonical": None, "from": []}


def test_zero_shot_cli_scores_the_shared_findings_and_lists_the_unknown(world, tmp_path):
    run, site, plugins = world
    out = tmp_path / "zs"
    result = CliRunner().invoke(app, ["zero-shot", str(run), "--site", str(site), "--plugins-dir", str(plugins), "--bootstrap", "200",
                                      "--min-positives", "5", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"] == "arkfed" and data["split"] == "test" and data["model"] == "teacher"
    assert data["classes"]["Pleural Effusion"] == {"canonical": "Pleural Effusion", "from": ["alpha/Effusion"]}
    assert data["classes"]["Cardiomegaly"]["from"] == ["alpha/Cardiomegaly"]
    assert data["unknown_classes"] == ["Pneumothorax"] and data["unknown_reasons"]["Pneumothorax"] == "no head predicts Pneumothorax"
    assert data["mapped_classes"] == data["mean_auc_classes"] == ["Pleural Effusion", "Cardiomegaly"]
    scores = data["scores"]
    assert set(scores["auc"]) == {"Pleural Effusion", "Cardiomegaly"}  # the unknown class is not guessed
    for name in ("Pleural Effusion", "Cardiomegaly"):
        assert scores["auc"][name] > 0.85, scores["auc"]
        low, high = scores["auc_ci"][name]
        assert low <= scores["auc"][name] <= high
    assert scores["bootstrap"]["unit"] == "patient" and scores["num_examples"] == 120
    assert "mean of the serving heads' probabilities" in data["combine"] and data["bn_recalibrated"] is False
    assert "not scored" in result.output and "protocol arkfed" in " ".join(result.output.split())


def test_several_heads_combine_by_their_mean_probability_and_a_multiclass_head_by_its_softmax(world):
    run, site_yaml, plugins = world
    teacher, alpha = pretrained_alpha()
    torch.manual_seed(3)
    heads = {"alpha": alpha, **{name: SiteHead(name, schema, 16).eval() for name, schema in
                                (("beta", schemas()["beta"]), ("gamma", schemas()["gamma"]), ("delta", DELTA))}}
    site = load_site(site_yaml, [plugins])
    tb = LabelSchema(task="multilabel", classes=("Pleural Effusion", "Tuberculosis"))
    site.schema = tb  # the same images scored as if the site's second class were Tuberculosis
    site.splits = {k: DatasetTable(v.images, v.labels[:, :2], v.meta, tb.classes) for k, v in site.splits.items()}
    result = zero_shot(teacher, heads, site, ZeroShotSettings(n_boot=0, min_positives=1))
    assert result["classes"]["Pleural Effusion"]["from"] == ["alpha/Effusion", "beta/Pleural Effusion"]
    assert result["heads_used"] == ["alpha", "beta", "gamma"]
    assert "the model has a head for delta" in result["notes"][0]  # the site's own head is left out
    table = site.split("test")
    emb = embed_table(teacher, table, tb)
    features = torch.from_numpy(emb.features)
    with torch.no_grad():
        effusion = (alpha(features).sigmoid()[:, 0] + heads["beta"](features).sigmoid()[:, 0]) / 2
        tuberculosis = heads["gamma"](features).softmax(1)[:, 2]
    assert result["scores"]["auc"]["Pleural Effusion"] == pytest.approx(roc_auc(table.labels[:, 0] > 0.5, effusion.numpy()), abs=1e-6)
    assert result["scores"]["auc"]["Tuberculosis"] == pytest.approx(roc_auc(table.labels[:, 1] > 0.5, tuberculosis.numpy()), abs=1e-6)


def test_no_known_class_is_an_error(world):
    _, site_yaml, plugins = world
    site = load_site(site_yaml, [plugins])
    gamma = SiteHead("gamma", schemas()["gamma"], 16)
    with pytest.raises(ArkfedError, match="no class of site delta is predicted by a head of the model"):
        zero_shot(pretrained_alpha()[0], {"gamma": gamma}, site)


def test_zero_shot_on_a_demo_site_from_heads_of_another_dataset(tmp_path):
    """demo-chexpert scored with a ChestX-ray14 head: Effusion serves Pleural Effusion, CheXpert-only observations are listed."""
    from arkfed.datasets._plugin import get_plugin
    from arkfed.demo.generate import generate_demo_federation

    [yaml] = generate_demo_federation(tmp_path / "demo", seed=0, size=32, counts={"demo-chexpert": 60}, sites=["demo-chexpert"])
    nih = get_plugin("chestxray14")().label_schema()
    run = make_run_folder(tmp_path / "run", sites={"nih": nih})
    out = tmp_path / "zs"
    result = CliRunner().invoke(app, ["zero-shot", str(run), "--site", str(yaml), "--protocol", "ark", "--bootstrap", "0",
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"] == "ark" and "protocol_note" not in data  # the chexpert plugin reads protocol ark
    assert data["classes"]["Pleural Effusion"]["from"] == ["nih/Effusion"]
    assert set(data["mapped_classes"]) == {"Cardiomegaly", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                                           "Pleural Effusion"}
    assert data["unknown_classes"] == ["No Finding", "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other",
                                       "Fracture", "Support Devices"]
    # the mean is over CheXpert's five competition classes, all of which ChestX-ray14 knows
    assert data["mean_auc_classes"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert data["scores"]["num_examples"] == len(load_site(yaml, protocol="ark").split("test")) > 0


def test_zero_shot_of_a_bare_weights_file_is_an_error(world, tmp_path):
    from arkfed.model.ark import ArkModel
    from arkfed.model.weights import save_ark_model

    _, site, plugins = world
    file = tmp_path / "bare.safetensors"
    save_ark_model(file, ArkModel(tiny_spec()))
    args = ["zero-shot", str(file), "--site", str(site), "--plugins-dir", str(plugins), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "no heads" in str(result.exception)
