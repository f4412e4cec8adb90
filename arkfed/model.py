"""The Ark model: a shared timm backbone + projector, and one private head per site.

:class:`ArkModel` is the part that travels between sites and becomes the foundation model
(student and teacher are two ArkModels). :class:`SiteHead` is a site's task head; it sits on the
projector output, as in Ark's reference code, and never leaves its site in federated runs.
"""

from __future__ import annotations

import torch
from torch import nn

from arkfed.errors import ArkfedError
from arkfed.schema import LabelSchema
from arkfed.spec import ModelSpec, ProjectorKind

__all__ = ["ArkModel", "ModelSpec", "ProjectorKind", "SiteHead", "create_backbone", "create_projector"]

def create_backbone(name: str, img_size: int, pretrained: bool = False) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): forward returns pooled features."""
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ArkfedError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs = {"pretrained": pretrained, "num_classes": 0}
    try:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # CNNs take any input size and have no img_size argument
            return timm.create_model(name, **kwargs)
    except Exception as exc:
        if pretrained:
            raise ArkfedError(
                f"could not fetch ImageNet weights for {name!r} ({type(exc).__name__}); this needs network "
                "access: on an offline machine pass --init PATH with a local weights file"
            ) from None
        raise


def create_projector(kind: ProjectorKind, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class ArkModel(nn.Module):
    """Backbone + projector. ``forward`` gives the projected embedding the heads and the
    consistency loss use; ``features`` gives the backbone's pooled features."""

    def __init__(self, spec: ModelSpec, pretrained: bool = False):
        super().__init__()
        self.backbone = create_backbone(spec.model, spec.img_size, pretrained)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        self.spec = spec.model_copy(
            update={
                "num_features": int(self.backbone.num_features),
                "mean": tuple(cfg.get("mean", spec.mean)),
                "std": tuple(cfg.get("std", spec.std)),
            }
        )
        self.projector = create_projector(spec.projector, self.backbone.num_features, spec.projector_dim)

    @property
    def embed_dim(self) -> int:
        return self.spec.projector_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class SiteHead(nn.Linear):
    """A site's task head: a linear layer on the embedding that knows its site and schema."""

    def __init__(self, site: str, schema: LabelSchema, embed_dim: int):
        super().__init__(embed_dim, schema.num_classes)
        self.site = site
        self.schema = schema

    @property
    def classes(self) -> tuple[str, ...]:
        return self.schema.classes

