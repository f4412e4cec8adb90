"""``--init imagenet`` offline (a local file, ``$ARKFED_PRETRAINED``, the Hugging Face cache) and
Ark's MLP projector width."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from arkfed.errors import ArkfedError
from arkfed.model.ark import PRETRAINED_ENV, ArkModel
from arkfed.model.weights import load_ark_model
from arkfed.spec import ModelSpec

SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=8)
HUB_ID = "timm/test_resnet.r160_in1k"


@pytest.fixture
def imagenet_state() -> dict[str, torch.Tensor]:
    """A stand-in for timm's ImageNet file: a full test_resnet state dict, classifier included."""
    torch.manual_seed(1)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv(PRETRAINED_ENV, raising=False)
    return tmp_path / "hub"


def same_backbone(model: ArkModel, state: dict[str, torch.Tensor]) -> bool:
    own = model.backbone.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k in own) and "fc.weight" not in own


def test_local_file_folder_env_and_hub_cache(imagenet_state, tmp_path, monkeypatch, empty_hub_cache):
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(imagenet_state, folder / "model.safetensors")
    assert same_backbone(load_ark_model(f"imagenet:{folder / 'model.safetensors'}", spec=SPEC), imagenet_state)
    torch.save(imagenet_state, tmp_path / "original.pth")
    assert same_backbone(load_ark_model(f"imagenet:{tmp_path / 'original.pth'}", spec=SPEC), imagenet_state)
    monkeypatch.setenv(PRETRAINED_ENV, str(folder))
    assert same_backbone(ArkModel(SPEC, pretrained=True), imagenet_state)
    monkeypatch.delenv(PRETRAINED_ENV)
    snapshot = empty_hub_cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(imagenet_state, snapshot / "model.safetensors")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert same_backbone(load_ark_model("imagenet", spec=SPEC), imagenet_state)


def test_no_local_weights_fails_at_once_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(PRETRAINED_ENV, str(tmp_path / "nowhere"))
    start = time.perf_counter()
    with pytest.raises(ArkfedError) as info:
        ArkModel(SPEC, pretrained=True)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and "nowhere (does not exist)" in message and HUB_ID in message and "imagenet:PATH" in message


def test_mlp_projector_hidden_width():
    spec = SPEC.model_copy(update={"projector": "mlp", "projector_hidden": 13})
    model = ArkModel(spec)
    assert [tuple(p.shape) for p in model.projector.parameters()] == [(13, model.spec.num_features), (13,), (8, 13), (8,)]
    assert ArkModel(spec.model_copy(update={"projector_hidden": None})).projector[0].out_features == model.spec.num_features
