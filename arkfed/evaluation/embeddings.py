"""Running a model over a dataset split: frozen embeddings, head outputs, ten-crop averaging.

Images come through the training area's evaluation pipeline (:func:`arkfed.data.loaders.make_eval_loader`)
so evaluation sees exactly what validation during training saw (same resize, normalisation and
label policies). Outputs are numpy arrays, row-aligned with the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from arkfed.ark.metrics import Predictions, infer
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.spec import ModelSpec

FeatureKind = Literal["projector", "backbone"]
TEN_CROP_RESIZE = 256 / 224  # the usual ten-crop protocol: resize by 256/224, crop back to size


@dataclass
class Embeddings:
    """Frozen features of a split with its targets and mask (N x D, N x K, N x K)."""

    features: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def ten_crops(images: torch.Tensor) -> list[torch.Tensor]:
    """The ten test-time crops (4 corners + centre, and their mirror images) at the input size."""
    from torchvision.transforms.v2 import functional as TF

    size = images.shape[-1]
    big = round(size * TEN_CROP_RESIZE)
    enlarged = torch.nn.functional.interpolate(images, size=(big, big), mode="bilinear", align_corners=False, antialias=True)
    return list(TF.ten_crop(enlarged, [size, size]))


def _run(fn: Callable[[torch.Tensor], torch.Tensor], modules: tuple[torch.nn.Module, ...], table: DatasetTable,
         schema: LabelSchema, spec: ModelSpec, batch_size: int, device: str,
         ten_crop: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from arkfed.data.loaders import make_eval_loader

    return infer(fn, modules, make_eval_loader(table, schema, spec, batch_size, ten_crop=ten_crop), device)


def embed_table(
    model: ArkModel, table: DatasetTable, schema: LabelSchema, kind: FeatureKind = "projector",
    batch_size: int = 64, device: str = "cpu",
) -> Embeddings:
    """Projector output (what Ark's heads see; the default) or pooled backbone features."""
    model = model.to(device)
    fn = model if kind == "projector" else model.features
    features, targets, mask = _run(fn, (model,), table, schema, model.spec, batch_size, device)
    return Embeddings(features, targets, mask)


def _mean_probability_logits(logits: list[torch.Tensor], task: str) -> torch.Tensor:
    """Average the crops' probabilities and express the mean as logits again (so scoring,
    losses and AUCs treat ten-crop outputs exactly like single-crop ones)."""
    stacked = torch.stack(logits)
    if task == "multiclass":
        return stacked.softmax(dim=-1).mean(0).clamp_min(1e-7).log()
    p = stacked.sigmoid().mean(0).clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def head_predictions(
    model: ArkModel, head: SiteHead, table: DatasetTable, schema: LabelSchema,
    ten_crop: bool = False, batch_size: int = 64, device: str = "cpu",
) -> Predictions:
    """``head(model(x))`` over a split; with ``ten_crop`` the probabilities of Ark's ten crops, cut
    from the source image by the data pipeline (:func:`arkfed.data.loaders.ten_crop_views`), are averaged."""
    model, head = model.to(device), head.to(device)

    def forward(images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 4:
            return head(model(images))
        b, n = images.shape[:2]
        logits = head(model(images.flatten(0, 1))).view(b, n, -1)
        return _mean_probability_logits(list(logits.unbind(1)), schema.task)

    logits, targets, mask = _run(forward, (model, head), table, schema, model.spec, batch_size, device, ten_crop)
    return Predictions(logits, targets, mask)
