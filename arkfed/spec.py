"""What an ArkModel is, as plain data: kept free of torch so that light modules (the CLI's
option definitions, configs) can import it without paying for torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ProjectorKind = Literal["linear", "mlp"]


class ModelSpec(BaseModel):
    """Everything needed to rebuild an ArkModel's architecture (stored next to its weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default="swin_base_patch4_window7_224", description="timm backbone")
    projector: ProjectorKind = Field(default="linear", description="linear | mlp")
    projector_dim: int = Field(default=1376, ge=1, description="projector output (embedding) width")
    projector_hidden: int | None = Field(
        default=None, ge=1,
        description="MLP projector's hidden width (default: the backbone width); "
        "Ark's MLP uses projector_dim (1376 in Ark-6's projector1376_mlp)",
    )
    img_size: int = Field(default=224, ge=16, description="input size in pixels")
    crop_pct: float | None = Field(
        default=None, gt=0, le=1,
        description="evaluation view: Resize(img_size / crop_pct) + CenterCrop(img_size), as timm's crop_pct "
        "(Ark: 224/256 = 0.875); unset: the whole image squashed to img_size",
    )
    test_ten_crop: bool = Field(
        default=False, description="`arkfed evaluate --split test` averages ten crops unless told otherwise (Ark's test protocol)"
    )
    norm: Literal["timm", "group"] = Field(
        default="timm", description="normalisation layers: timm's own | group (every BatchNorm replaced by GroupNorm, "
        "Opacus' ModuleValidator.fix: what a site with a privacy budget needs, DP-SGD clips per sample)")
    num_features: int | None = None  # filled in once the backbone is built
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="before")
    @classmethod
    def _timm_normalisation(cls, data):
        """Mean/std not given come from timm's pretrained config of the architecture, which is
        what :class:`arkfed.model.ark.ArkModel` normalises with; so a run's ``config.yaml`` records
        the normalisation that actually ran (timm's ``test_resnet`` uses 0.5, not ImageNet's).
        timm is imported only here, when a spec is validated, so importing this module stays light."""
        if not isinstance(data, dict) or ("mean" in data and "std" in data):
            return data
        cfg = timm_data_config(data.get("model", cls.model_fields["model"].default))
        return {**{k: v for k, v in cfg.items() if k not in data}, **data}


def timm_data_config(name: str) -> dict[str, tuple[float, float, float]]:
    """``{"mean", "std"}`` of timm's default pretrained config for ``name`` (empty if unknown)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # unknown or not a registered architecture: keep the ImageNet defaults
        return {}
    if cfg is None or cfg.mean is None or cfg.std is None:
        return {}
    return {"mean": tuple(float(m) for m in cfg.mean), "std": tuple(float(s) for s in cfg.std)}
