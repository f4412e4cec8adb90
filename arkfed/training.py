"""Training configuration and the visit plan: what the coordinator decides before any site trains.

Everything here is plain pydantic data and arithmetic, so the local coordinator and the Flower
ServerApp plan a run identically and can ship :class:`TrainSettings` and :class:`VisitPlan` as JSON.

Learning rate: one global warm-up + cosine schedule indexed by *site visit* (timm's scheduler,
evaluated at the visit index). Each visit builds a fresh optimizer with that visit's lr, because
optimizer state (momentum, Adam moments) would otherwise be per-site data that has to travel
with the model; the visit is then a pure function of (weights, settings, plan).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arkfed.model import ModelSpec
from arkfed.schedules import consistency_from_momentum, consistency_weight, teacher_momentum

ViewsMode = Literal["ark", "ark+", "independent"]
EmaMode = Literal["visit", "iteration"]
OrderMode = Literal["fixed", "shuffle"]
CropSource = Literal["original", "resized"]
ConsistencySchedule = Literal["cosine", "momentum"]


class TrainSettings(BaseModel):
    """Hyper-parameters of a site visit (sent to every site in federated runs)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=32, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    min_lr: float = Field(default=1e-5, ge=0)
    optimizer: Literal["sgd", "momentum", "adamw"] = Field(
        default="adamw", description="timm names: sgd = SGD with Nesterov momentum (Ark's --opt sgd), momentum = classical SGD"
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_visits: int = Field(default=0, ge=0)
    warmup_rounds: int = Field(
        default=0, ge=0, description="warm-up in rounds (Ark's warm-up epochs): adds rounds x sites visits to warmup_visits"
    )
    warmup_lr: float | None = Field(default=None, ge=0, description="lr at the start of the warm-up (None: lr / 100; Ark: 1e-6)")
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_source: CropSource = Field(
        default="original", description="cut the random crop from the source image (Ark) or from it squashed to train_resize"
    )
    train_resize: int | None = Field(
        default=None, ge=16, description="crop_source=resized: the square the image is squashed to first (default img_size; Ark+: 896)"
    )
    views: ViewsMode = "ark"
    jitter_p: float = Field(default=0.3, ge=0, le=1)
    ema: EmaMode = "visit"
    momentum_teacher: float = Field(default=0.9, ge=0, le=1)
    max_consistency: float = Field(default=0.5, ge=0, le=1)
    consistency_schedule: ConsistencySchedule = Field(
        default="cosine", description="cosine: c rises 0 -> max_consistency (Ark); momentum: c = (m - 0.9) * 5 from the teacher momentum m (Ark+)"
    )
    device: str = "cpu"
    num_workers: int = Field(default=0, ge=0)
    max_steps_per_visit: int | None = Field(default=None, ge=1)

    @field_validator("crop_scale")
    @classmethod
    def _check_crop(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _check_schedules(self) -> "TrainSettings":
        if self.train_resize is not None and self.crop_source != "resized":
            raise ValueError("train_resize applies only with crop_source='resized'")
        return self


class VisitPlan(BaseModel):
    """The schedule values of one site visit: everything that changes from visit to visit."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=0)
    visit: int = Field(ge=0, description="global visit index, 0-based")
    total_visits: int = Field(ge=1)
    site: str
    consistency: float = Field(ge=0, le=1, description="consistency weight c")
    momentum: float = Field(ge=0, le=1, description="teacher EMA momentum for this visit")
    lr: float = Field(ge=0)
    seed: int = Field(ge=0)


class TrainConfig(BaseModel):
    """A whole run: sites, rounds, model, init and settings (written as the run's config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    sites: list[str] = Field(min_length=1, description="site names, in visiting order")
    site_configs: list[str] = Field(default_factory=list, description="site YAML paths (local mode)")
    rounds: int = Field(default=1, ge=1)
    order: OrderMode = "fixed"
    seed: int = Field(default=0, ge=0)
    model: ModelSpec = Field(default_factory=ModelSpec)
    init: str = "random"
    eval_split: str = "val"
    settings: TrainSettings = Field(default_factory=TrainSettings)

    @field_validator("sites")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"site names must be unique, got {value}")
        return value

    @property
    def total_visits(self) -> int:
        return self.rounds * len(self.sites)


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (run seed, visit index, ...), independent of hashing salt."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def visit_lrs(settings: TrainSettings, total_visits: int, visits_per_round: int = 1) -> list[float]:
    """The lr of every visit from timm's warm-up + cosine scheduler, stepped per visit.

    The warm-up lasts ``warmup_visits + warmup_rounds * visits_per_round`` steps (so Ark's 20
    warm-up epochs are 20 rounds whatever the number of sites)."""
    import torch
    from timm.scheduler import create_scheduler_v2

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.lr)
    warmup = settings.warmup_visits + settings.warmup_rounds * visits_per_round
    warmup = min(warmup, max(total_visits - 1, 0))
    warmup_lr = settings.lr * 0.01 if settings.warmup_lr is None else settings.warmup_lr
    scheduler, _ = create_scheduler_v2(
        dummy, sched="cosine", num_epochs=total_visits, warmup_epochs=warmup,
        warmup_lr=warmup_lr, min_lr=settings.min_lr,
    )
    lrs = []
    for visit in range(total_visits):
        scheduler.step(visit)
        lrs.append(float(dummy.param_groups[0]["lr"]))
    return lrs


def schedule_values(settings: TrainSettings, step: float, total: int) -> tuple[float, float]:
    """(consistency weight c, teacher momentum) at ``step`` of ``total`` schedule steps: c from its
    own cosine (Ark) or tied to the momentum (Ark+, ``consistency_schedule="momentum"``)."""
    momentum = teacher_momentum(step, total, settings.momentum_teacher)
    if settings.consistency_schedule == "momentum":
        return consistency_from_momentum(momentum), momentum
    return consistency_weight(step, total, settings.max_consistency), momentum


def visit_order(sites: Sequence[str], rounds: int, order: OrderMode, seed: int) -> list[list[str]]:
    """The sites visited in each round: the given order, or a seeded shuffle per round."""
    rng = np.random.default_rng(derive_seed(seed, "order"))
    rounds_order = []
    for _ in range(rounds):
        names = list(sites)
        if order == "shuffle":
            names = [names[i] for i in rng.permutation(len(names))]
        rounds_order.append(names)
    return rounds_order


def plan_visits(config: TrainConfig) -> list[VisitPlan]:
    """Every visit of a run, with its schedule values; identical in local and federated mode."""
    total = config.total_visits
    settings = config.settings
    lrs = visit_lrs(settings, total, len(config.sites))
    plans = []
    for rnd, names in enumerate(visit_order(config.sites, config.rounds, config.order, config.seed)):
        for name in names:
            v = len(plans)
            c, momentum = schedule_values(settings, v, total)
            plans.append(VisitPlan(
                round=rnd, visit=v, total_visits=total, site=name, consistency=c, momentum=momentum,
                lr=lrs[v], seed=derive_seed(config.seed, "visit", v),
            ))
    return plans


def resolve_device(name: str):
    """``auto`` -> CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from arkfed.errors import ArkfedError

        raise ArkfedError(f"device {name!r} requested but CUDA is not available (use --device cpu or auto)")
    return device


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fast and range-safe); a no-op on CPU, which stays fp32 and exact."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device):
    import torch

    return torch.channels_last if device.type == "cuda" else torch.contiguous_format
