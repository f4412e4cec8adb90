"""arkfed export: plain-timm round trip with strict loading, projector/heads, model card."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file

from arkfed.errors import ArkfedError
from arkfed.evaluation.export import export_model
from arkfed.model.weights import load_ark_model, load_heads
from eval_fixtures import make_run_folder, schemas


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run_folder(root / "run", arch="test_resnet", img_size=32)
    result = export_model(run, root / "export")
    return run, root / "export", result


def _timm_records(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("timm") and ("Missing keys" in r.getMessage() or "Unexpected keys" in r.getMessage())]


def test_plain_timm_loads_export_strictly_and_reproduces_teacher_features(exported, caplog):
    run, out, result = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" == result.architecture
    assert config["num_classes"] == 0
    teacher = load_ark_model(run, which="teacher").eval()
    assert config["num_features"] == teacher.backbone.num_features
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == list(teacher.spec.mean)

    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    assert _timm_records(caplog) == []
    state = load_file(out / "model.safetensors")
    result = timm.create_model("test_resnet", num_classes=0).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(model.state_dict())

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = teacher.features(x)
        assert torch.allclose(model(x), expected, atol=1e-6)
        # and it is the teacher, not the student
        student = load_ark_model(run, which="student").eval()
        assert not torch.allclose(student.features(x), expected, atol=1e-3)
        # timm's own local-folder loader reads the same config.json
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.allclose(local(x), expected, atol=1e-6)


def test_vit_export_round_trips_with_its_img_size(tmp_path, caplog):
    run = make_run_folder(tmp_path / "run", arch="test_vit", img_size=32, sites={"alpha": schemas()["alpha"]})
    export_model(run, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_args"]["img_size"] in (32, [32, 32])
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model("test_vit", pretrained=True, num_classes=0, img_size=32,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "export" / "model.safetensors"))).eval()
    assert _timm_records(caplog) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), load_ark_model(run).eval().features(x), atol=1e-5)


def test_export_rebuilds_ark_model_projector_and_heads(exported):
    run, out, _ = exported
    again = load_ark_model(out).eval()
    teacher = load_ark_model(run).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again(x), teacher(x), atol=1e-6)
    heads, original = load_heads(out / "heads"), load_heads(run / "heads")
    assert set(heads) == set(schemas())
    for site, head in heads.items():
        assert head.schema == original[site].schema
        assert torch.equal(head.weight, original[site].weight)
    config = json.loads((out / "config.json").read_text())
    assert config["arkfed"]["heads"]["gamma"]["classes"] == ["Normal", "Pneumonia", "Tuberculosis"]
    assert config["arkfed"]["spec"]["model"] == "test_resnet"


def test_model_card_lists_sites_schemas_rounds_and_final_metrics(exported):
    _, out, _ = exported
    card = (out / "README.md").read_text()
    for site in schemas():
        assert f"| {site} |" in card
    assert "Pleural Effusion, Cardiomegaly" in card
    assert "rounds: 2 configured, 2 evaluated" in card
    # final metrics are the last round's (0.65 teacher, 0.67 student in the fixture's log)
    assert "| alpha | teacher | 1 | 0.650 |" in card
    assert "| alpha | student | 1 | 0.670 |" in card
    assert "test_resnet" in card


def test_export_errors_are_one_line(tmp_path):
    with pytest.raises(ArkfedError, match="model not found"):
        export_model(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArkfedError, match="neither a run folder"):
        export_model(tmp_path / "empty", tmp_path / "out")


def test_export_ships_teacher_heads_and_the_batchnorm_statistics_evaluate_used(tmp_path):
    """The export's teacher comes with the teacher's heads, and with --calibrate the statistics
    that produce `evaluate`'s numbers: plain inference with them reproduces `evaluate` exactly."""
    from arkfed.ark.metrics import score_predictions
    from arkfed.evaluation.embeddings import head_predictions
    from arkfed.evaluation.evaluate import evaluate_source
    from arkfed.evaluation.export import apply_site_batchnorm
    from arkfed.model.ark import SiteHead
    from arkfed.model.weights import save_head
    from arkfed.site.load import load_site
    from eval_fixtures import write_site

    schema = schemas()["alpha"]
    run = make_run_folder(tmp_path / "run", sites={"alpha": schema})
    torch.manual_seed(7)
    teacher_head = SiteHead("alpha", schema, 16)
    save_head(run / "teacher-heads" / "alpha.safetensors", teacher_head)
    site = load_site(write_site(tmp_path, "alpha", schema, {"train": 24, "val": 8, "test": 40}, seed=3), [tmp_path / "plugins"])
    result = export_model(run, tmp_path / "export", calibrate=[site])
    assert result.heads_of == "teacher" and "batchnorm/alpha.safetensors" in result.files
    exported_head = load_heads(tmp_path / "export" / "heads")["alpha"]
    assert torch.equal(exported_head.weight, teacher_head.weight)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "teacher's own heads" in card and "carries those of **site alpha**" in card

    model = load_ark_model(tmp_path / "export").eval()  # model.safetensors: alpha's statistics
    raw = load_ark_model(run, which="teacher")
    assert not torch.allclose(model.backbone.state_dict()["bn1.running_mean"], raw.backbone.state_dict()["bn1.running_mean"])
    plain = score_predictions(head_predictions(model, exported_head, site.split("test"), schema), schema)
    reference = evaluate_source(run, site, n_boot=0, min_positives=1)["models"]["teacher"]
    assert plain["auc"] == pytest.approx(reference["auc"], abs=1e-6)
    again = apply_site_batchnorm(load_ark_model(tmp_path / "export"), tmp_path / "export", "alpha")
    assert torch.equal(again.backbone.state_dict()["bn1.running_var"], model.backbone.state_dict()["bn1.running_var"])
    with pytest.raises(ArkfedError, match="no BatchNorm statistics for site 'beta'"):
        apply_site_batchnorm(model, tmp_path / "export", "beta")
