"""Released Ark checkpoints (Ark-6 Swin-B, Ark+ Swin-L 768) in their published key layout.

The synthetic checkpoints are written the way Ark's ``engine.py`` saves them
(``{"epoch", "state_dict", "teacher", ...}`` with ``module.`` prefixes) from the layout of Ark's
``ArkSwinTransformer`` on timm 0.5: downsample at the end of stages 0-2, persistent
``relative_position_index`` / ``attn_mask`` buffers, an ImageNet ``head``, ``projector.*`` and
``omni_heads.N.*``. A tiny Swin stands in for Swin-B for the numeric checks; Swin-B and Swin-L 768
are checked for layout on the meta device (no memory, no time).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from arkfed.data.findings import CHESTXRAY14_CLASSES, CHEXPERT_CLASSES
from arkfed.model import released as ark_checkpoints
from arkfed.model.released import ARK_DATASETS, infer_spec, load_ark_checkpoint, split_state
from arkfed.model.weights import load_ark_model, load_file_heads
from arkfed.spec import ModelSpec

TINY = "swin_arkfed_tiny_test"
TINY_ARGS = dict(patch_size=4, window_size=7, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
HEAD_SIZES = (14, 14, 14, 3, 6, 1)  # Ark-6: MIMIC, CheXpert, ChestXray14, RSNA, VinDr, Shenzhen
# Line 1 of Ark's MIMIC lists (Ark_MICCAI2023/dataset/mimic-cxr-2.0.0-test.csv, the same in
# Ark_Plus/dataset/MIMIC/); ``MIMIC.__init__`` in dataloader.py reads ``line[5:]`` as the labels.
ARK_MIMIC_CSV_HEADER = (
    "image_path,dicom_id,study_id,subject_id,split,Atelectasis,Cardiomegaly,Consolidation,Edema,"
    "Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,"
    "Pneumonia,Pneumothorax,Support Devices"
)
ARK_MIMIC_HEADER = tuple(ARK_MIMIC_CSV_HEADER.split(",")[5:])
# Line 1 of Ark's CheXpert lists (Ark_MICCAI2023/dataset/CheXpert-v1.0_valid.csv = Stanford's
# valid.csv); ``CheXpert.__init__`` reads ``line[5:]``.
ARK_CHEXPERT_CSV_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
    "Support Devices"
)


@pytest.fixture(scope="module", autouse=True)
def tiny_swin():
    """Register a tiny Swin with timm (as a plugin model would be) and let Ark's loader know it."""
    if TINY not in timm.list_models():
        from timm.models import register_model
        from timm.models.swin_transformer import _create_swin_transformer

        @register_model
        def swin_arkfed_tiny_test(pretrained=False, **kwargs):
            return _create_swin_transformer(TINY, pretrained=pretrained, **dict(TINY_ARGS, **kwargs))

    key = (16, (2, 2, 2, 2), 7)
    ark_checkpoints.SWIN_MODELS[key] = (TINY, 224)
    yield
    ark_checkpoints.SWIN_MODELS.pop(key, None)


def published_layout(backbone: nn.Module, projector: nn.Module | None, heads: list[nn.Linear]) -> dict[str, torch.Tensor]:
    """Today's timm Swin + Ark's projector/heads -> the state dict of Ark's ArkSwinTransformer (timm 0.5)."""
    from timm.models.swin_transformer import get_relative_position_index

    out = {}
    for key, value in backbone.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key] = value
    for name, module in backbone.named_modules():
        if name.endswith(".attn"):
            out[f"{name}.relative_position_index"] = get_relative_position_index(*module.window_size).to(module.qkv.weight.device)
        if name.endswith(tuple(f"blocks.{j}" for j in range(40))) and getattr(module, "attn_mask", None) is not None:
            out[f"{name}.attn_mask"] = module.attn_mask
    num_features = backbone.num_features
    device = next(backbone.parameters()).device
    out["head.weight"] = torch.zeros(1000, num_features, device=device)  # timm's ImageNet classifier, unused by Ark
    out["head.bias"] = torch.zeros(1000, device=device)
    if projector is not None:
        out |= {f"projector.{k}": v for k, v in projector.state_dict().items()}
    for n, head in enumerate(heads):
        out |= {f"omni_heads.{n}.{k}": v for k, v in head.state_dict().items()}
    return out


def ark_mlp(in_dim: int, dim: int) -> nn.Sequential:  # Ark: Linear(enc, F) - ReLU - Linear(F, F)
    return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    torch.manual_seed(0)
    backbone = timm.create_model(TINY, num_classes=0).eval()
    projector = ark_mlp(backbone.num_features, 24)
    heads = [nn.Linear(24, k) for k in HEAD_SIZES]
    teacher = published_layout(backbone, projector, heads)
    student = {k: v + 0.01 if v.is_floating_point() else v for k, v in teacher.items()}
    path = tmp_path_factory.mktemp("ark") / "ark6_teacher_ep200_swint_projector24_mlp.pth.tar"
    torch.save({
        "epoch": 199, "lossMIN": [0.1] * 6,
        "state_dict": {f"module.{k}": v for k, v in student.items()},
        "teacher": {f"module.{k}": v for k, v in teacher.items()},
    }, path)
    return path, backbone, projector, heads


def test_published_checkpoint_loads_with_features_of_the_hand_loaded_timm_model(released):
    path, backbone, projector, heads = released
    model = load_ark_model(path)  # teacher by default
    assert model.spec.model == TINY and model.spec.projector == "mlp" and model.spec.projector_hidden == 24
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = backbone(x)
        assert torch.allclose(model.eval().features(x), expected, atol=1e-5)
        assert torch.allclose(model(x), projector(expected), atol=1e-5)
    student = load_ark_model(path, which="student")
    assert not torch.equal(student.projector[0].weight, model.projector[0].weight)


def test_omni_heads_become_named_heads_in_arks_dataset_order(released):
    path, _, projector, heads = released
    named = load_file_heads(path)
    assert list(named) == [d.name for d in ARK_DATASETS[:6]]
    z = torch.randn(3, 24)
    with torch.no_grad():
        mimic = named["mimic_cxr"]
        assert mimic.classes == CHEXPERT_CLASSES  # arkfed's order; Ark's rows are its CSV's (alphabetical) order
        assert torch.allclose(mimic(z), heads[0](z)[:, [ARK_MIMIC_HEADER.index(c) for c in CHEXPERT_CLASSES]], atol=1e-6)
        rsna = named["rsna_pneumonia"]
        assert rsna.classes == ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")
        assert torch.equal(rsna(z), heads[3](z)[:, [0, 2, 1]])  # Ark's rows: Normal, Not Normal, Lung Opacity
        assert named["vindr_cxr"].classes[0] == "Pleural effusion"


def test_head_schemas_match_the_dataset_plugins():
    from arkfed.datasets._plugin import get_plugin

    for dataset in ARK_DATASETS:
        if dataset.name == "covidx":
            continue
        assert get_plugin(dataset.name)({}).label_schema() == dataset.schema, dataset.name


def test_export_of_a_released_checkpoint_opens_in_plain_timm_strictly(released, tmp_path: Path):
    from safetensors.torch import load_file

    from arkfed.evaluation.export import export_model

    path, backbone, _, _ = released
    out = tmp_path / "export"
    result = export_model(path, out)
    assert set(result.heads) == {d.name for d in ARK_DATASETS[:6]}
    plain = timm.create_model(TINY, num_classes=0)
    plain.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), backbone(x), atol=1e-5)


@pytest.mark.parametrize("name,size,expected", [
    ("swin_base_patch4_window7_224", 224, ("swin_base_patch4_window7_224", 224)),  # Ark-6
    ("swin_large_patch4_window12_384", 768, ("swin_large_patch4_window12_384", 768)),  # Ark+
])
def test_swin_b_and_swin_l_768_layouts_convert_to_todays_timm_keys(name, size, expected):
    with torch.device("meta"):
        backbone = timm.create_model(name, img_size=size, num_classes=0)
        state = published_layout(backbone, ark_mlp(backbone.num_features, 1376), [nn.Linear(1376, k) for k in HEAD_SIZES])
    spec = infer_spec(state)
    assert (spec.model, spec.img_size) == expected
    assert (spec.projector, spec.projector_hidden, spec.projector_dim) == ("mlp", 1376, 1376)
    assert round(spec.img_size / spec.crop_pct) == {224: 256, 768: 896}[size] and spec.test_ten_crop  # Ark's eval protocol
    assert "layers.0.downsample.reduction.weight" in state and "layers.0.blocks.0.attn.relative_position_index" in state
    backbone_state, projector_state, heads = split_state(state)
    from timm.models.swin_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(backbone_state, backbone)
    assert set(converted) == set(backbone.state_dict())
    assert [w.shape[0] for w, _ in heads] == list(HEAD_SIZES) and set(projector_state) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_not_an_ark_checkpoint_is_named(tmp_path: Path):
    from arkfed.errors import ArkfedError

    path = tmp_path / "other.pth"
    torch.save({"optimizer": 3}, path)
    with pytest.raises(ArkfedError, match="other.pth: no state dict found"):
        load_ark_checkpoint(path)
    with pytest.raises(ArkfedError, match="other.pth"):
        load_ark_model(path, spec=ModelSpec(model="test_resnet", img_size=32))


def test_init_from_a_released_checkpoint_starts_a_run_on_a_new_site(released):
    from arkfed.config import TrainConfig
    from arkfed.data.schema import LabelSchema
    from arkfed.model.weights import load_init_heads
    from arkfed.run.start import initial_state

    path, backbone, _, _ = released
    config = TrainConfig(sites=["mysite"], init=str(path), model=ModelSpec(model=TINY, img_size=224))
    state = initial_state(config, {"mysite": LabelSchema(task="binary", classes=("Tuberculosis",))})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(state.teacher.eval().features(x), backbone(x), atol=1e-5)
    assert state.heads["mysite"].in_features == 24  # the new site's head sits on Ark's 24-wide projector
    assert set(load_init_heads(path)) == {d.name for d in ARK_DATASETS[:6]}  # known sites could continue their heads


def ark_head(name: str):
    return next(d for d in ARK_DATASETS if d.name == name)


def test_mimic_head_rows_follow_the_header_of_arks_mimic_lists():
    """Ark's MIMIC head row i is column 5 + i of its CSV lists: alphabetical, not CheXpert's order."""
    assert ark_head("mimic_cxr").ark_classes == ARK_MIMIC_HEADER
    assert ARK_MIMIC_HEADER[0] == "Atelectasis" and ARK_MIMIC_HEADER != CHEXPERT_CLASSES
    assert ark_head("chexpert").ark_classes == tuple(ARK_CHEXPERT_CSV_HEADER.split(",")[5:])


def test_chexpert_head_rows_follow_the_real_train_csv_header(label_files: Path):
    import gzip

    with gzip.open(label_files / "chexpert_train.csv.gz", "rt") as f:
        header = f.readline().strip().split(",")
    assert header[:5] == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]  # what CheXpert.__init__ skips (line[5:])
    assert ark_head("chexpert").ark_classes == tuple(header[5:])


def test_every_head_names_each_of_its_rows_once():
    for dataset in ARK_DATASETS:
        assert sorted(dataset.ark_classes) == sorted(dataset.schema.classes), dataset.name
    assert ark_head("chestxray14").ark_classes == CHESTXRAY14_CLASSES  # Xray14_*_official.txt columns
    assert ark_head("rsna_pneumonia").ark_classes == ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")  # list label 0/1/2
    assert ark_head("vindr_cxr").ark_classes[0] == "Pleural effusion"  # Ark's "PE"
    assert ark_head("covidx").ark_classes == ("normal", "pneumonia", "COVID-19")


def test_released_mimic_head_gives_each_finding_its_own_row(released):
    """A finding's output is the row Ark trained for it: e.g. Pneumonia is Ark's row 11, not CheXpert's 7."""
    path, _, _, heads = released
    mimic = load_file_heads(path)["mimic_cxr"]
    z = torch.randn(4, 24)
    with torch.no_grad():
        out, ark_rows = mimic(z), heads[0](z)
    for finding in CHEXPERT_CLASSES:
        assert torch.allclose(out[:, mimic.classes.index(finding)], ark_rows[:, ARK_MIMIC_HEADER.index(finding)], atol=1e-6), finding
    assert ARK_MIMIC_HEADER.index("Pneumonia") == 11 and CHEXPERT_CLASSES.index("Pneumonia") == 7


def test_head_orders_match_the_plugins_readers_of_arks_split_lists():
    """The same Ark list columns name the head rows and the plugins' split lists."""
    from arkfed.datasets._plugin import get_plugin

    for name in ("chestxray14", "rsna_pneumonia", "shenzhen"):
        assert get_plugin(name).split_list_format.classes == ark_head(name).ark_classes, name
