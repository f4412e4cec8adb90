"""Ark's released checkpoints as arkfed models: Ark-6 (Swin-B 224, linear or ``projector1376_mlp``)
and Ark+ (Swin-L 768), read as published.

A published file is what Ark's ``engine.py`` saves with ``torch.save``: a ``.pth.tar`` holding
``{"epoch", "state_dict" (student), "teacher", "optimizer", "scheduler", ...}`` -- or a bare state
dict -- with ``module.`` prefixes when trained under ``DataParallel``. The state dict is an
``ArkSwinTransformer`` (``Ark_MICCAI2023/models.py``, ``Ark_Plus/Pretraining/models.py``): a
timm-0.5-era ``SwinTransformer`` (downsample at the *end* of stages 0-2, persistent
``relative_position_index`` and ``attn_mask`` buffers, an unused ImageNet ``head.*``), plus
``projector.*`` (``Linear`` or ``Linear-ReLU-Linear`` with hidden width = output width) and
``omni_heads.N.*``, one linear head per training dataset.

Conversion: ``module.`` is stripped, ``head.*`` dropped, the backbone keys go through the timm
model's own ``checkpoint_filter_fn`` (for Swin: moves downsample to the start of the next stage,
drops the buffers, resizes relative-position tables if the window differs), the projector is kept,
and ``omni_heads.N`` become named :class:`SiteHead` s in Ark's dataset order (:data:`ARK_DATASETS`).
The result loads strictly into the timm model, so an export of it opens in plain timm.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from arkfed.data.findings import CHESTXRAY14_CLASSES, CHEXPERT_CLASSES
from arkfed.data.schema import CHEXPERT_LABELER_SCHEMA, LabelSchema
from arkfed.errors import ArkfedError
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.spec import ModelSpec

WRAPPER_KEYS = {"teacher": ("teacher", "state_dict", "student", "model"), "student": ("state_dict", "student", "model", "teacher")}


@dataclass(frozen=True)
class ArkDataset:
    """One of Ark's training datasets: the arkfed head name, the class order of Ark's head rows and
    the arkfed schema (whose class order the head is permuted to)."""

    name: str
    ark_classes: tuple[str, ...]
    schema: LabelSchema


def _schema(task: str, classes: tuple[str, ...], **kw) -> LabelSchema:
    return LabelSchema(task=task, classes=classes, uncertain=kw.pop("uncertain", "lsr-ones"), missing="zeros", **kw)


# Ark's head order is the order of ``--data_set`` in the training command of the README that
# published the weights (Ark_MICCAI2023/README.md "Train Ark-6", Ark_Plus/README.md "Train Ark+";
# ``ArkSwinTransformer.__init__`` in models.py appends one ``omni_heads`` entry per dataset in that
# order): MIMIC, CheXpert, ChestXray14, RSNAPneumonia, VinDrCXR, Shenzhen (+ COVIDx for Ark+'s
# continual training). The schemas are the arkfed plugins' (tests/model/test_ark_checkpoints.py
# checks them against the plugins).
#
# A head's rows follow the label vector Ark's *loader* builds (``Ark_MICCAI2023/dataloader.py``,
# same code in ``Ark_Plus/Pretraining/dataloader.py``), not ``diseases`` in datasets_config.yaml,
# which Ark uses only to name AUCs in its logs and which is wrong for MIMIC. Each order below names
# its source; the list files are those in Ark's ``dataset/`` folder.

# MIMIC: ``MIMIC.__init__`` takes ``line[5:]`` of its CSV lists (``dataset/mimic-cxr-2.0.0-{train,
# validate,test}.csv``, header "image_path,dicom_id,study_id,subject_id,split,Atelectasis,..."),
# i.e. the columns in the file's alphabetical order (that of PhysioNet's chexpert.csv), not the
# CheXpert order datasets_config.yaml lists for MIMIC.
ARK_MIMIC_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
# CheXpert: ``CheXpert.__init__`` takes ``line[5:]`` of Stanford's train.csv / valid.csv
# (``dataset/CheXpert-v1.0_{train,valid}.csv``: Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14
# observations in Stanford's order, "No Finding" first).
ARK_CHEXPERT_CLASSES: tuple[str, ...] = CHEXPERT_CLASSES
# ChestX-ray14: ``ChestXray14.__init__`` takes ``lineItems[1:15]`` of ``dataset/Xray14_*_official.txt``
# (no header); the columns are NIH's order as datasets_config.yaml lists it (checked against
# Data_Entry_2017_v2020.csv on all 112,120 listed images).
ARK_CHESTXRAY14_CLASSES: tuple[str, ...] = CHESTXRAY14_CLASSES
# RSNA: ``RSNAPneumonia.__init__`` one-hots ``int(lineItems[-1])`` of ``dataset/RSNAPneumonia_*.txt``;
# 0/1/2 as datasets_config.yaml lists them (the lists hold 8,851 / 11,821 / 6,012 images of each,
# Kaggle's Normal / No Lung Opacity / Not Normal / Lung Opacity counts; 2 exactly where Target = 1).
ARK_RSNA_CLASSES: tuple[str, ...] = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
# VinDr-CXR: ``VinDrCXR.__init__`` takes ``lineItems[1:]`` of ``dataset/VinDrCXR_{train,test}_pe_global_one.txt``;
# datasets_config.yaml's ['PE', 'Lung tumor', 'Pneumonia', 'Tuberculosis', 'Other diseases', 'No finding']
# (checked against Ark_Plus/dataset/VinDrCXR/image_labels_{train,test}.csv on every image).
ARK_VINDR_CLASSES: tuple[str, ...] = ("Pleural effusion", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
# Shenzhen: ``ShenzhenCXR.__init__`` takes ``lineItems[1:2]`` of ``dataset/ShenzenCXR_*_data.txt``
# ("name.png,label"): one output, tuberculosis (the label is the file name's last digit).
ARK_SHENZHEN_CLASSES: tuple[str, ...] = ("Tuberculosis",)
# COVIDx (Ark+ only): ``COVIDx.__init__`` in Ark_Plus/Pretraining/dataloader.py one-hots
# ``classes.index(label)`` with ``classes = ['normal', 'pneumonia', 'COVID-19']``.
ARK_COVIDX_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")

ARK_DATASETS: tuple[ArkDataset, ...] = (
    ArkDataset("mimic_cxr", ARK_MIMIC_CLASSES, _schema("multilabel", CHEXPERT_CLASSES, uncertain="ones")),
    ArkDataset("chexpert", ARK_CHEXPERT_CLASSES, CHEXPERT_LABELER_SCHEMA),
    ArkDataset("chestxray14", ARK_CHESTXRAY14_CLASSES, _schema("multilabel", CHESTXRAY14_CLASSES)),
    ArkDataset("rsna_pneumonia", ARK_RSNA_CLASSES, _schema("multiclass", ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal"))),
    ArkDataset("vindr_cxr", ARK_VINDR_CLASSES, _schema("multilabel", ARK_VINDR_CLASSES)),
    ArkDataset("shenzhen", ARK_SHENZHEN_CLASSES, _schema("binary", ("Tuberculosis",))),
    ArkDataset("covidx", ARK_COVIDX_CLASSES, _schema("multiclass", ARK_COVIDX_CLASSES)),
)

# Swin configurations Ark published or may be given: (embed_dim, depths, window) -> timm name, size.
SWIN_MODELS: dict[tuple[int, tuple[int, ...], int], tuple[str, int]] = {
    (96, (2, 2, 6, 2), 7): ("swin_tiny_patch4_window7_224", 224),
    (96, (2, 2, 18, 2), 7): ("swin_small_patch4_window7_224", 224),
    (128, (2, 2, 18, 2), 7): ("swin_base_patch4_window7_224", 224),  # Ark-6
    (128, (2, 2, 18, 2), 12): ("swin_base_patch4_window12_384", 384),
    (192, (2, 2, 18, 2), 7): ("swin_large_patch4_window7_224", 224),
    (192, (2, 2, 18, 2), 12): ("swin_large_patch4_window12_384", 768),  # Ark+: swin_large_768, window 12 at 768 px
}


ARK_CROP_PCT = {224: 224 / 256, 768: 768 / 896}


def read_checkpoint(path: str | Path, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The state dict of ``which`` model in a published file, ``module.`` prefixes stripped."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArkfedError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ArkfedError(f"{path}: not a state dict or checkpoint dict (found {type(data).__name__})")
    state = data
    for key in WRAPPER_KEYS.get(which, WRAPPER_KEYS["teacher"]):
        if isinstance(data.get(key), dict):
            state = data[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArkfedError(f"{path}: no state dict found (keys: {sorted(data)[:8]})")
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def is_ark_state(state: dict[str, torch.Tensor]) -> bool:
    """An ArkSwinTransformer-style state dict: omni_heads, or a projector next to backbone keys."""
    return any(k.startswith("omni_heads.") for k in state) or (
        any(k.startswith("projector.") for k in state) and any(k.startswith("layers.") or k.startswith("stages.") for k in state)
    )


def _projector_spec(state: dict[str, torch.Tensor], num_features: int) -> dict:
    if "projector.weight" in state:
        return {"projector": "linear", "projector_dim": int(state["projector.weight"].shape[0])}
    if "projector.0.weight" in state:
        hidden = int(state["projector.0.weight"].shape[0])
        return {"projector": "mlp", "projector_hidden": hidden, "projector_dim": int(state["projector.2.weight"].shape[0])}
    return {"projector": "linear", "projector_dim": num_features}  # no projector: an identity stands in


def infer_spec(state: dict[str, torch.Tensor]) -> ModelSpec:
    """The arkfed :class:`ModelSpec` of an Ark Swin state dict, from its tensor shapes alone."""
    if "patch_embed.proj.weight" not in state or "layers.0.blocks.0.attn.relative_position_bias_table" not in state:
        raise ArkfedError("not a Swin checkpoint: pass the architecture (--model) to load other Ark backbones")
    embed = int(state["patch_embed.proj.weight"].shape[0])
    depths = tuple(
        len({int(m.group(1)) for k in state if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k))})
        for i in range(len({k.split(".")[1] for k in state if k.startswith("layers.")}))
    )
    table = state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (int(round(table**0.5)) + 1) // 2
    known = SWIN_MODELS.get((embed, depths, window))
    if known is None:
        raise ArkfedError(f"Swin with embed_dim {embed}, depths {depths}, window {window} is not a known timm model: pass --model")
    name, size = known
    mask = next((v for k, v in state.items() if k.startswith("layers.0.") and k.endswith("attn_mask")), None)
    if mask is not None:  # nW = (img / 4 / window)^2 windows in stage 0
        size = int(round(mask.shape[0] ** 0.5)) * window * 4
    num_features = embed * 2 ** (len(depths) - 1)
    # Ark evaluated with Resize(256) + CenterCrop(224) and ten-crop tests; Ark+ with Resize(896) + crop 768
    crop_pct = ARK_CROP_PCT.get(size, 224 / 256)
    return ModelSpec(model=name, img_size=size, crop_pct=crop_pct, test_ten_crop=True, **_projector_spec(state, num_features))


def _filter_backbone(state: dict[str, torch.Tensor], backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter of the backbone's module (old Swin layouts -> today's)."""
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    return filter_fn(state, backbone)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(backbone, projector, heads in omni_heads order) of an Ark state dict; ``head.*`` dropped."""
    backbone, projector, heads = {}, {}, {}
    for key, value in state.items():
        if key.startswith("projector."):
            projector[key.removeprefix("projector.")] = value
        elif match := re.match(r"omni_heads\.(\d+)\.(weight|bias)$", key):
            heads.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif not key.startswith("head.") and not key.startswith("head_dist."):
            backbone[key] = value
    ordered = [(heads[i]["weight"], heads[i]["bias"]) for i in sorted(heads) if {"weight", "bias"} <= heads[i].keys()]
    return backbone, projector, ordered


def model_from_state(state: dict[str, torch.Tensor], source: str | Path, spec: ModelSpec | None = None) -> ArkModel:
    """An :class:`ArkModel` from an Ark state dict, loaded strictly (backbone and projector).

    The architecture is inferred from the tensor shapes (:func:`infer_spec`); ``spec`` (e.g. from
    ``--model``) is used only when the layout is not a known one, with the checkpoint's projector."""
    backbone_state, projector_state, _ = split_state(state)
    try:
        spec = infer_spec(state)
    except ArkfedError:
        if spec is None:
            raise
        projector = _projector_spec(state, 0)
        spec = spec.model_copy(update=projector) if projector["projector_dim"] else spec
    model = ArkModel(spec)
    if not projector_state:  # Ark without --projector_features: heads sit on the features
        projector_state = model.projector.state_dict()
        torch.nn.init.eye_(projector_state["weight"])
        torch.nn.init.zeros_(projector_state["bias"])
    converted = _filter_backbone(backbone_state, model.backbone)
    for part, sub in (("backbone", model.backbone), ("projector", model.projector)):
        result = sub.load_state_dict(converted if part == "backbone" else projector_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ArkfedError(
                f"{source}: Ark checkpoint's {part} does not match {model.spec.model!r}: "
                f"missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}"
            )
    return model


def heads_from_state(state: dict[str, torch.Tensor]) -> dict[str, SiteHead]:
    """``omni_heads.N`` as named heads in Ark's dataset order (:data:`ARK_DATASETS`), rows permuted
    to the arkfed schema's class order. Heads whose size does not fit that order are named
    ``ark_head_N`` with placeholder classes, so nothing is silently mislabelled."""
    _, _, heads = split_state(state)
    named: dict[str, SiteHead] = {}
    matches = len(heads) <= len(ARK_DATASETS) and all(w.shape[0] == len(d.ark_classes) for (w, _), d in zip(heads, ARK_DATASETS))
    for n, (weight, bias) in enumerate(heads):
        if matches:
            dataset = ARK_DATASETS[n]
            order = [dataset.ark_classes.index(c) for c in dataset.schema.classes]
            name, schema = dataset.name, dataset.schema
            weight, bias = weight[order], bias[order]
        else:
            name = f"ark_head_{n}"
            k = weight.shape[0]
            task = "binary" if k == 1 else "multilabel"
            schema = LabelSchema(task=task, classes=tuple(f"class_{i}" for i in range(k)))
        head = SiteHead(name, schema, weight.shape[1])
        head.load_state_dict({"weight": weight, "bias": bias})
        named[name] = head.eval()
    return named


def load_ark_checkpoint(path: str | Path, which: str = "teacher", spec: ModelSpec | None = None) -> tuple[ArkModel, dict[str, SiteHead]]:
    """A published Ark checkpoint file -> (model, named heads)."""
    state = read_checkpoint(path, which)
    if not is_ark_state(state):
        raise ArkfedError(f"{path}: not an Ark checkpoint (no projector.* / omni_heads.* keys)")
    return model_from_state(state, path, spec), heads_from_state(state)
