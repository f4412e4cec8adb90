"""arkfed segment: U-Net decoder on timm multi-scale features, trained on the REAL lung masks."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.errors import ArkfedError
from arkfed.evaluation.segment import Segmenter, create_encoder, dice_scores, find_pairs
from arkfed.model import ArkModel
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


def test_segment_cli_on_real_lung_masks_beats_the_trivial_mask(shared_data, tmp_path):
    data = shared_data / "lung-seg-cxr"
    run = make_run_folder(tmp_path / "run", img_size=64, sites={"alpha": schemas()["alpha"]})
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, ["segment", str(run), "--images", str(data / "images"), "--masks", str(data / "masks"),
                                      "--img-size", "64", "--epochs", "4", "--limit", "40", "--batch-size", "4", "--lr", "3e-3",
                                      "--variants", "frozen,finetuned", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["train_pairs"] + res["test_pairs"] == 40 and res["test_pairs"] == 8
    trivial = res["trivial_dice"]  # predicting "lung" everywhere
    assert 0.3 < trivial < 0.6
    for variant in ("frozen", "finetuned"):
        v = res["variants"][variant]
        assert v["dice"] > trivial + 0.25, (variant, v["dice"], trivial)
        assert v["train_loss"][-1] < v["train_loss"][0]


def test_find_pairs_names_an_image_without_mask(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    with pytest.raises(ArkfedError, match=r"a.png: no mask named a\.\*"):
        find_pairs(tmp_path / "images", tmp_path / "masks")
