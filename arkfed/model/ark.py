"""The Ark model: a shared timm backbone + projector, and one private head per site.

:class:`ArkModel` is the part that travels between sites and becomes the foundation model
(student and teacher are two ArkModels). :class:`SiteHead` is a site's task head; it sits on the
projector output, as in Ark's reference code, and never leaves its site in federated runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.spec import ModelSpec, ProjectorKind

__all__ = ["ArkModel", "ModelSpec", "ProjectorKind", "SiteHead", "create_backbone", "create_projector"]

PRETRAINED_ENV = "ARKFED_PRETRAINED"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin", ".pt")


def _weights_in(folder: Path, name: str) -> Path | None:
    """A weights file in ``folder``: ``model.safetensors`` / ``pytorch_model.bin`` (timm's Hugging
    Face layout), the same inside a sub-folder named for the model, or the folder's only weights file."""
    for sub in (folder, folder / name, *sorted(folder.glob(f"{name}.*"))):
        for file in WEIGHT_FILES:
            if (sub / file).is_file():
                return sub / file
    files = [f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)] if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def _hub_id(name: str) -> str | None:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def find_pretrained_weights(name: str, location: str | Path | None = None) -> Path:
    """The local ImageNet weights of timm model ``name``, without touching the network.

    Looks, in order, at ``location`` (a file or folder, from ``--init imagenet:PATH``), at
    ``$ARKFED_PRETRAINED`` (file or folder) and at the Hugging Face cache for timm's default
    weights of ``name`` (``timm/<model>.<tag>``: ``model.safetensors`` / ``pytorch_model.bin``).
    Raises one line naming every place it looked."""
    looked: list[str] = []
    for label, value in (("imagenet:PATH", location), (f"${PRETRAINED_ENV}", os.environ.get(PRETRAINED_ENV))):
        if not value:
            if label.startswith("$"):
                looked.append(f"{label} (unset)")
            continue
        path = Path(value).expanduser()
        if path.is_file():
            return path
        found = _weights_in(path, name) if path.is_dir() else None
        if found is not None:
            return found
        looked.append(f"{label}={path}" + ("" if path.exists() else " (does not exist)"))
    hub_id = _hub_id(name)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for file in WEIGHT_FILES:
            cached = try_to_load_from_cache(hub_id, file)
            if isinstance(cached, str) and Path(cached).is_file():
                return Path(cached)
        from huggingface_hub.constants import HF_HUB_CACHE

        looked.append(f"the Hugging Face cache {HF_HUB_CACHE} for {hub_id}")
    else:
        looked.append(f"no Hugging Face id: timm has no default weights for {name!r}")
    raise ArkfedError(
        f"no local ImageNet weights for {name!r} (arkfed never downloads them): looked at {'; '.join(looked)}. "
        f"Pass --init imagenet:PATH or set {PRETRAINED_ENV} to timm's model.safetensors or the original .pth (or a folder holding it)"
    )


def create_backbone(name: str, img_size: int, pretrained: bool | str | Path = False) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): forward returns pooled features.

    ``pretrained``: False, True (local ImageNet weights found by :func:`find_pretrained_weights`)
    or a file/folder to look in. Never downloads: timm loads the file through its own
    ``checkpoint_filter_fn`` (so original checkpoints such as Microsoft's Swin ``.pth`` load too)."""
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ArkfedError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs: dict = {"num_classes": 0}
    if pretrained is not False:
        file = find_pretrained_weights(name, None if pretrained is True else pretrained)
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(file)}}
    try:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # CNNs take any input size and have no img_size argument
            return timm.create_model(name, **kwargs)
    except ArkfedError:
        raise
    except Exception as exc:
        if pretrained is not False:
            file = kwargs["pretrained_cfg_overlay"]["file"]
            raise ArkfedError(f"{file}: not ImageNet weights of {name!r} ({type(exc).__name__}: {str(exc)[:200]})") from None
        raise


def create_projector(kind: ProjectorKind, in_dim: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    """Linear, or Ark's MLP ``Linear(in, hidden) - ReLU - Linear(hidden, out)``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    hidden = hidden or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class ArkModel(nn.Module):
    """Backbone + projector. ``forward`` gives the projected embedding the heads and the
    consistency loss use; ``features`` gives the backbone's pooled features."""

    def __init__(self, spec: ModelSpec, pretrained: bool | str | Path = False):
        super().__init__()
        self.backbone = create_backbone(spec.model, spec.img_size, pretrained)
        if spec.norm == "group":  # BatchNorm -> GroupNorm (Opacus' own conversion), for DP-SGD at the sites
            from opacus.validators import ModuleValidator

            self.backbone = ModuleValidator.fix(self.backbone)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        self.spec = spec.model_copy(
            update={
                "num_features": int(self.backbone.num_features),
                "mean": tuple(cfg.get("mean", spec.mean)),
                "std": tuple(cfg.get("std", spec.std)),
            }
        )
        self.projector = create_projector(spec.projector, self.backbone.num_features, spec.projector_dim, spec.projector_hidden)

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

