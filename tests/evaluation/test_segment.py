"""arkfed segment: U-Net decoder on timm multi-scale features, trained on the REAL lung masks."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.errors import ArkfedError
from arkfed.evaluation.segment import Segmenter, create_encoder, dice_scores, find_pairs
from arkfed.model.ark import ArkModel
from eval_fixtures import make_run_folder, schemas, tiny_spec


def test_dice_scores():
    a = torch.zeros(3, 1, 4, 4)
    b = torch.zeros(3, 1, 4, 4)
    a[0, :, :2], b[0, :, :2] = 1, 1  # identical
    a[1, :, :2], b[1, :, 2:] = 1, 1  # disjoint
    assert dice_scores(a, b).tolist() == [1.0, 0.0, 1.0]  # both empty counts as perfect


def test_encoder_carries_the_backbone_weights_and_decoder_handles_flat_vit_maps():
    torch.manual_seed(0)
    model = ArkModel(tiny_spec("test_resnet", 64)).eval()
    encoder = create_encoder(model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(x)[-1], model.backbone.forward_features(x), atol=1e-5)
        assert not torch.allclose(create_encoder(model, random_init=True).eval()(x)[-1], encoder(x)[-1], atol=1e-3)
        vit = Segmenter(create_encoder(ArkModel(tiny_spec("test_vit", 32))))  # every map at 1/16
        assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_segment_curve_on_real_lung_masks_says_where_pretraining_helps(shared_data, tmp_path):
    """A small but real label-efficiency run: 64 px, 5 and 20 training pairs, two seeds, the
    model (pretrained on the synthetic findings) against random init (``--compare`` is tested
    with the cheaper linear probe)."""
    from eval_fixtures import pretrained_alpha

    data = shared_data / "lung-seg-cxr"
    teacher, head = pretrained_alpha()
    run = make_run_folder(tmp_path / "run", teacher=teacher, heads={"alpha": head}, sites={"alpha": schemas()["alpha"]})
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, ["segment", str(run), "--images", str(data / "images"), "--masks", str(data / "masks"),
                                      "--img-size", "64", "--steps", "20", "--limit", "60", "--batch-size", "5", "--lr", "3e-3",
                                      "--train-sizes", "5,20", "--seeds", "0,1",
                                      "--bootstrap", "200", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["train_pool"] + res["test_pairs"] == 60 and res["test_pairs"] == 12
    curve = res["curve"]
    assert list(curve["inits"]) == ["model", "random"] and curve["sizes"] == ["5", "20"]
    assert curve["test"].startswith("Wilcoxon") and curve["correction"] == "holm" and curve["tests_in_family"] == 2
    trivial = res["trivial_dice"]  # predicting "lung" everywhere
    assert 0.3 < trivial < 0.6
    for points in curve["inits"].values():
        assert points["5"]["train_size"] == 5 and points["20"]["train_size"] == 20
        assert len(points["20"]["values"]) == 2 and points["20"]["ci"][0] <= points["20"]["mean"] <= points["20"]["ci"][1]
        low, high = points["20"]["bootstrap_ci"]
        assert low < high
    assert curve["inits"]["model"]["20"]["mean"] > trivial + 0.15  # it learnt to segment lungs
    vs_random = curve["comparisons"]["random"]
    for size, c in vs_random.items():
        assert c["p_adjusted"] >= c["p"] and c["verdict"] in ("model better", "model worse", "no significant difference")
        assert c["difference"] == pytest.approx(curve["inits"]["model"][size]["mean"] - curve["inits"]["random"][size]["mean"])
    verdict = curve["pretraining"]  # the report says where pretraining helps, whatever the answer
    assert verdict["helps_at"] == [s for s, c in vs_random.items() if c["significant"] and c["difference"] > 0]
    assert verdict["hurts_at"] == [s for s, c in vs_random.items() if c["significant"] and c["difference"] < 0]
    assert verdict["sentence"] and "training pairs" in verdict["sentence"]
    png = (out / "segment.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and res["chart"] == "segment.png"
    print("\nlung masks, 64 px:", {i: {s: round(p["mean"], 3) for s, p in pts.items()} for i, pts in curve["inits"].items()},
          "|", verdict["sentence"], "| p adj vs random:", {s: round(c["p_adjusted"], 4) for s, c in curve["comparisons"]["random"].items()})


def test_find_pairs_names_an_image_without_mask(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    with pytest.raises(ArkfedError, match=r"a.png: no mask named a\.\*"):
        find_pairs(tmp_path / "images", tmp_path / "masks")
