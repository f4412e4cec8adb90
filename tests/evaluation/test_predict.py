"""arkfed predict: every head's probabilities and combined scores for findings heads share."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.data.loaders import Normalise, read_resized
from arkfed.errors import ArkfedError
from arkfed.evaluation.predict import image_table, predict_images, shared_findings
from arkfed.model.weights import load_ark_model, load_heads
from eval_fixtures import make_run_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("predict") / "run")


def test_shared_findings_align_names_through_the_canonical_vocabulary(run):
    heads = load_heads(run / "heads")
    shared = shared_findings(heads)
    # alpha says "Effusion", beta "Pleural Effusion"; both have Cardiomegaly; gamma shares nothing
    assert shared == {
        "Cardiomegaly": [("alpha", "Cardiomegaly"), ("beta", "Cardiomegaly")],
        "Pleural Effusion": [("alpha", "Effusion"), ("beta", "Pleural Effusion")],
    }


def test_predict_cli_on_real_samples(run, shared_data, tmp_path):
    samples = shared_data / "samples"
    images = [samples / "00000001_000.png", samples / "16747_3_1.jpg", next(samples.glob("*.dcm"))]
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(run), *map(str, images), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [e["image"] for e in data["images"]] == [str(p) for p in images]

    model, heads = load_ark_model(run).eval(), load_heads(run / "heads")
    table = image_table(images)
    x = Normalise(model.spec.mean, model.spec.std)(torch.stack([read_resized(table, i, model.spec.img_size) for i in range(3)]))
    with torch.no_grad():
        emb = model(x)
        alpha = heads["alpha"](emb).sigmoid().numpy()
        gamma = heads["gamma"](emb).softmax(1).numpy()
    for i, entry in enumerate(data["images"]):
        s = entry["scores"]
        assert len(s) == 3 + 2 + 3
        assert s["alpha/Effusion"] == pytest.approx(alpha[i, 0], abs=1e-5)
        assert [s[f"gamma/{c}"] for c in ("Normal", "Pneumonia", "Tuberculosis")] == pytest.approx(gamma[i], abs=1e-5)
        combined = entry["combined"]["Pleural Effusion"]
        assert combined["from"] == ["alpha/Effusion", "beta/Pleural Effusion"]
        assert combined["score"] == pytest.approx((s["alpha/Effusion"] + s["beta/Pleural Effusion"]) / 2)
        assert set(entry["combined"]) == {"Pleural Effusion", "Cardiomegaly"}
    # different images, different predictions
    assert not np.allclose(list(data["images"][0]["scores"].values()), list(data["images"][1]["scores"].values()))


def test_predict_errors(run, tmp_path):
    model = load_ark_model(run)
    with pytest.raises(ArkfedError, match="no heads"):
        predict_images(model, {}, [tmp_path / "x.png"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ArkfedError, match="broken.png"):
        predict_images(model, load_heads(run / "heads"), [broken])


def test_predict_uses_the_teacher_heads_for_the_teacher(run, shared_data, tmp_path):
    import shutil

    from arkfed.model.weights import save_head

    image = shared_data / "samples" / "00000001_000.png"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    teacher_heads = load_heads(run / "heads")
    for site, head in teacher_heads.items():
        with torch.no_grad():
            head.weight.mul_(-3.0)
        save_head(copy / "teacher-heads" / f"{site}.safetensors", head)
    scores = {}
    for which in ("teacher", "student"):
        out = tmp_path / which
        result = CliRunner().invoke(app, ["predict", str(copy), str(image), "--which", which, "--out", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        scores[which] = json.loads((out / "results.json").read_text())
    assert scores["teacher"]["notes"] == [] == scores["student"]["notes"]
    model = load_ark_model(copy).eval()
    x = Normalise(model.spec.mean, model.spec.std)(read_resized(image_table([image]), 0, model.spec.img_size)[None])
    with torch.no_grad():
        expected = teacher_heads["alpha"](model(x)).sigmoid()[0, 0].item()
    assert scores["teacher"]["images"][0]["scores"]["alpha/Effusion"] == pytest.approx(expected, abs=1e-5)
    # the student is scored with the student's heads, and a run without teacher-heads says so
    plain = tmp_path / "plain"
    assert CliRunner().invoke(app, ["predict", str(run), str(image), "--out", str(plain)]).exit_code == 0
    assert "student's heads" in json.loads((plain / "results.json").read_text())["notes"][0]
