"""The run configuration: what the coordinator decides before any site trains (the visit plan
built from it is :mod:`arkfed.run.plan`).

Everything here is plain pydantic data and arithmetic, so the local coordinator and the Flower
ServerApp plan a run identically and can ship :class:`TrainSettings` and :class:`VisitPlan` as JSON.

Learning rate: one global warm-up + cosine schedule indexed by *site visit* (timm's scheduler,
evaluated at the visit index), or with ``lr_schedule="ark-as-run"`` the per-round lr Ark's code
actually set (see the field's description; the loop fills it in from the validation losses). By
default each visit builds a fresh optimizer with that visit's lr, because optimizer state
(momentum, Adam moments) would otherwise be per-site data that has to travel with the model; the
visit is then a pure function of (weights, settings, plan). ``optimizer_state="carry"`` (local
runs only) keeps Ark's one optimizer instead.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arkfed.spec import ModelSpec

ViewsMode = Literal["ark", "ark+", "independent"]
EmaMode = Literal["visit", "iteration"]
OrderMode = Literal["fixed", "shuffle"]
CropSource = Literal["original", "resized"]
LrSchedule = Literal["cosine", "ark-as-run"]
OptimizerState = Literal["reset", "carry"]
MulticlassLoss = Literal["ce", "bce"]
ConsistencySchedule = Literal["cosine", "momentum"]
FederationMode = Literal["cyclic", "parallel"]
Weighting = Literal["equal", "samples"]
Aggregation = Literal["median", "trimmed-mean", "krum", "mean"]


class TrainSettings(BaseModel):
    """Hyper-parameters of a site visit (sent to every site in federated runs). The hardware a
    site trains on is the site's own (:class:`arkfed.site.config.ComputeSettings`), not part of this."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=32, ge=1, description="images per step at a site")
    local_epochs: int = Field(default=1, ge=1, description="epochs over a site's training split per visit")
    lr: float = Field(default=1e-3, gt=0, description="peak learning rate (warm-up + cosine over visits)")
    min_lr: float = Field(default=1e-5, ge=0, description="final learning rate of the cosine")
    optimizer: Literal["sgd", "momentum", "adamw"] = Field(
        default="adamw",
        description="sgd (SGD with Nesterov momentum, Ark's --opt sgd) | momentum (classical SGD) | adamw (timm create_optimizer_v2)",
    )
    optimizer_state: OptimizerState = Field(
        default="reset",
        description="reset: a fresh optimizer every visit (arkfed's default; nothing but weights travels) | carry: one "
        "optimizer state over student and every head, carried from visit to visit and in the checkpoint, as Ark's code "
        "keeps one optimizer for all datasets (Ark_MICCAI2023/engine.py line 100); a head's state moves only in its own "
        "site's visits (Ark's one optimizer under torch >= 2.0, where zero_grad leaves other heads' gradients None). "
        "Local cyclic runs on one GPU per visit only: federated runs use reset, because the momentum buffers are derived "
        "from a site's gradients and would leave the site with the model",
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(default=0.05, ge=0, description="weight decay (not on biases and norms)")
    warmup_visits: int = Field(default=0, ge=0, description="linear lr warm-up, in visits")
    warmup_rounds: int = Field(
        default=0, ge=0, description="linear lr warm-up in rounds (Ark's warm-up epochs), added to warmup_visits"
    )
    warmup_lr: float | None = Field(default=None, ge=0, description="lr at the start of the warm-up (default lr / 100; Ark: 1e-6)")
    lr_schedule: LrSchedule = Field(
        default="cosine",
        description="cosine: timm's warm-up + cosine, stepped per visit (Ark's README) | ark-as-run: the lr Ark's code sets, "
        "per round: timm's CosineLRScheduler evaluated at epoch = the mean validation loss of the previous round, because "
        "Ark_MICCAI2023/engine.py line 169 (Ark_Plus/Pretraining/engine.py line 176) calls lr_scheduler.step(val_loss), "
        "whose first argument is the epoch: lr = warmup_lr + L * (lr - warmup_lr) / warmup_rounds while L < warmup_rounds "
        "(L: the mean over sites of the student's task loss on eval_split after the previous round, as engine.py averages "
        "its datasets' validation losses; the same in federated runs, from the losses the sites report with their "
        "evaluation; sites that report none are left out, and with none at all the lr stays), the cosine "
        "min_lr + (lr - min_lr) (1 + cos(pi L / rounds)) / 2 up to L = rounds, then min_lr; the first round, before any "
        "validation loss, runs at warmup_lr (lr without a warm-up), where timm's scheduler starts",
    )
    crop_scale: tuple[float, float] = Field(default=(0.08, 1.0), description="random-resized-crop area range MIN,MAX")
    crop_source: CropSource = Field(
        default="original",
        description="cut the random crop from the source image (Ark) | from it squashed to train_resize (faster, less detail)",
    )
    train_resize: int | None = Field(
        default=None, ge=16, description="crop_source=resized: the square the image is squashed to first (default img_size; Ark+: 896)"
    )
    dataset_resize: dict[str, int] = Field(
        default_factory=dict,
        description="per dataset plugin (the site YAML's dataset:), the square its training images are squashed to before the "
        "crop, overriding crop_source for it; NAME=SIZE,NAME=SIZE (Ark-6's code: chestxray14=224,vindr_cxr=224, "
        "Ark_MICCAI2023/dataloader.py lines 130 and 346; evaluation still reads the source image)",
    )
    views: ViewsMode = Field(
        default="ark", description="ark (teacher: same crop, student: + jitter) | ark+ (teacher: whole image) | independent")
    jitter_p: float = Field(default=0.3, ge=0, le=1, description="probability of the student's intensity jitter")
    ema: EmaMode = Field(default="visit", description="teacher EMA after each visit (Ark) | iteration")
    momentum_teacher: float = Field(default=0.9, ge=0, le=1, description="teacher momentum at the first visit (cosine to 1)")
    max_consistency: float = Field(default=0.5, ge=0, le=1, description="final consistency weight c (cosine from 0); 0 = no teacher term")
    consistency_schedule: ConsistencySchedule = Field(
        default="cosine",
        description="cosine: c rises 0 -> max_consistency (Ark) | momentum: c = (m - 0.9) * 5 from the teacher momentum m (Ark+)",
    )
    multiclass_loss: MulticlassLoss = Field(
        default="ce",
        description="task loss of multiclass datasets (RSNA Pneumonia's 3 classes), in training and in the evaluation loss: "
        "ce (softmax cross-entropy; Ark+'s code, Ark_Plus/Pretraining/engine.py line 161) | bce (BCE-with-logits on the "
        "one-hot targets; Ark-6's code uses BCEWithLogitsLoss for every dataset, Ark_MICCAI2023/engine.py line 68)",
    )
    max_steps_per_visit: int | None = Field(default=None, ge=1, description="cap on batches per visit (quick trials)")

    @field_validator("crop_scale")
    @classmethod
    def _check_crop(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {value}")
        return value

    @field_validator("dataset_resize", mode="before")
    @classmethod
    def _parse_resize(cls, value: object) -> object:
        """NAME=SIZE,NAME=SIZE (the command line) -> {NAME: SIZE}; an empty string is no resize."""
        if not isinstance(value, str):
            return value
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"expected NAME=SIZE,NAME=SIZE, got {value!r}")
        return {name.strip(): size.strip() for name, size in pairs}

    @field_validator("dataset_resize")
    @classmethod
    def _check_resize(cls, value: dict[str, int]) -> dict[str, int]:
        small = {name: size for name, size in value.items() if size < 16}
        if small:
            raise ValueError(f"resize sizes must be at least 16, got {small}")
        return value

    @model_validator(mode="after")
    def _check_schedules(self) -> "TrainSettings":
        if self.train_resize is not None and self.crop_source != "resized":
            raise ValueError("train_resize applies only with crop_source='resized'")
        if self.lr_schedule == "ark-as-run" and self.warmup_visits:
            raise ValueError("lr_schedule 'ark-as-run' warms up in rounds (Ark's epochs): use warmup_rounds, not warmup_visits")
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
    schedule_offset: int = Field(default=0, ge=0, description="the run's TrainConfig.schedule_offset (per-step teacher EMA)")
    rounds: int = Field(default=1, ge=1, description="the run's rounds (every site is visited once per round): a DP site "
                        "spreads its privacy budget over its visits left, rounds - round")


class TrainConfig(BaseModel):
    """A whole run: sites, rounds, model, init and settings (written as the run's config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    sites: list[str] = Field(min_length=1, description="site names, in visiting order")
    recipe: str | None = Field(default=None, description="the recipe the settings started from")
    rounds: int = Field(default=1, ge=1, description="rounds; each visits every site once")
    mode: FederationMode = Field(default="cyclic", description=(
        "cyclic (Ark: one site after another, teacher EMA after each) | "
        "parallel (every site from the same student, averaged, one teacher EMA per round)"))
    weighting: Weighting = Field(default="samples", description="parallel mode's mean: samples (FedAvg) | equal (Ark+); "
                                 "only --aggregation mean uses it")
    aggregation: Aggregation = Field(default="median", description=(
        "parallel mode's rule, Flower's own functions: median (coordinate-wise; the default: one bad site among three "
        "or more cannot steer it) | trimmed-mean (20 percent cut at each end, so none below 5 sites) | krum (the one update "
        "closest to the others) | mean (weighted by --weighting; one site can steer it)"))
    update_norm_factor: float = Field(default=4.0, ge=0, description=(
        "refuse a returned student that moved more than this many times the median of the updates accepted so far "
        "(scaled up for visits with more steps or a higher lr; before any, 10x the model's own norm); 0 = off"))
    min_update_cosine: float = Field(default=-0.5, ge=-1, le=1, description=(
        "refuse a returned student whose update points against the same site's accepted updates: cosine with their "
        "mean direction below this (a reversed update); -1 = off"))
    secure_aggregation: bool = Field(default=False, description=(
        "parallel mode, federated runs only: Flower's SecAgg+ masks every site's student update, so the coordinator "
        "sees only the weighted mean of the round's updates, never one site's. Robust rules then cannot work (they "
        "need single updates): aggregation is mean, and instead of the coordinator checking each update, each site "
        "checks its own (finite) and clips it to --max-update-norm before masking; a site that sends a wrong but "
        "finite update within that bound is not caught. Cyclic mode cannot hide a site's update (use differential privacy)"))
    order: OrderMode = Field(default="fixed", description="site order per round: fixed | shuffle")
    seed: int = Field(default=0, ge=0, description="seed of initialisation, data order and augmentation")
    model: ModelSpec = Field(default_factory=ModelSpec)
    init: str = Field(
        default="random",
        description="random | imagenet (local timm weights: $ARKFED_PRETRAINED or the Hugging Face cache; never downloaded) | "
        "imagenet:PATH | PATH (weights file, export, run folder, or a released Ark .pth.tar)",
    )
    eval_split: str = Field(default="val", description="the split every site evaluates after each round")
    min_sites: int | None = Field(default=None, ge=1, description=(
        "quorum: start once this many of the listed sites are there (default: all of them). A federated run starts "
        "when that many have joined; a listed site that joins later enters at the next round with the head it would "
        "have had at the start, and every visit it missed is recorded as a skip with reason absent. A local run "
        "goes on without the sites whose data cannot be loaded, as long as this many load (each named in a "
        "warning; their visits are absent skips)"))
    max_absent: int | None = Field(default=None, ge=1, description=(
        "report a site as dropped after this many consecutive turns it missed (absent, offline or no reply) and stop "
        "waiting for it: its turns are skipped (reason dropped) at once until it joins again (default: never)"))
    settings: TrainSettings = Field(default_factory=TrainSettings)
    restart_schedules: bool = Field(default=False, description=(
        "with --from RELEASE: start the teacher's EMA momentum and the consistency weight c from their first values "
        "instead of continuing them from where the release stopped"))
    schedule_offset: int = Field(default=0, ge=0, description=(
        "teacher schedule steps (visits; rounds in parallel mode) taken before this run: set from the release's "
        "lineage by --from unless --restart-schedules; the momentum and c cosines then run over offset + this run's steps"))
    admitted: dict[str, int] = Field(default_factory=dict, description=(
        "sites admitted into the running federation by a signed membership change (`arkfed coordinator admit`): "
        "site -> the first round it is visited (0-based); left out of earlier rounds"))

    @field_validator("sites")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"site names must be unique, got {value}")
        return value

    @model_validator(mode="after")
    def _carry_is_cyclic(self) -> "TrainConfig":
        if self.settings.optimizer_state == "carry" and self.mode != "cyclic":
            raise ValueError("optimizer_state 'carry' needs mode 'cyclic' (one optimizer stepping through one visit after another)")
        return self

    @model_validator(mode="after")
    def _secure_is_parallel_mean(self) -> "TrainConfig":
        """Secure aggregation hides single updates: parallel mode, the plain mean, the teacher's EMA at the coordinator."""
        if not self.secure_aggregation:
            return self
        if len(self.sites) < 2:
            raise ValueError("secure_aggregation needs at least two sites: the mean of one site's update is that update")
        if self.mode != "parallel":
            raise ValueError("secure_aggregation needs mode 'parallel': in cyclic mode the coordinator receives each site's "
                             "whole student, so no aggregation can hide a site's update (differential privacy can bound it)")
        if self.aggregation != "mean":
            if "aggregation" in self.model_fields_set:
                raise ValueError(f"secure_aggregation cannot be combined with aggregation {self.aggregation!r}: robust rules "
                                 "need every single update, which secure aggregation hides from the coordinator; use "
                                 "aggregation 'mean' (each site clips its own update to max_update_norm before masking)")
            self.aggregation = "mean"  # the default (median) gives way; an explicit robust rule is refused above
        if self.settings.ema != "visit":
            raise ValueError("secure_aggregation needs settings.ema 'visit' (the teacher's EMA step at the coordinator from "
                             "the aggregated student); with 'iteration' each site's teacher would have to travel too")
        return self

    @model_validator(mode="after")
    def _admitted_are_sites(self) -> "TrainConfig":
        strays = sorted(set(self.admitted) - set(self.sites))
        if strays:
            raise ValueError(f"admitted sites {strays} are not in sites")
        return self

    def round_sites(self, rnd: int) -> list[str]:
        """The sites visited in round ``rnd`` (in listed order): all but those admitted later."""
        return [s for s in self.sites if self.admitted.get(s, 0) <= rnd]

    @model_validator(mode="after")
    def _quorum_is_listed(self) -> "TrainConfig":
        if self.min_sites is not None and self.min_sites > len(self.sites):
            raise ValueError(f"min_sites {self.min_sites} is more than the {len(self.sites)} listed sites")
        return self

    @property
    def total_visits(self) -> int:
        return sum(len(self.round_sites(r)) for r in range(self.rounds))

    @property
    def quorum(self) -> int:
        """How many listed sites a run needs to start (``min_sites``, default all)."""
        return self.min_sites or len(self.sites)


class TeacherClock(BaseModel):
    """The teacher EMA steps a run has taken, so that each site's teacher head can be caught up
    with the steps it missed (see :mod:`arkfed.ark.tasks`).

    ``events``: (visit index after which the teacher moved, momentum: with ``ema: iteration`` the
    product of the visit's per-step momenta); ``last``: per site, the event that included its last
    accepted visit (its teacher head is current up to there).
    """

    model_config = ConfigDict(extra="forbid")

    events: list[tuple[int, float]] = Field(default_factory=list)
    last: dict[str, int] = Field(default_factory=dict)

    def record(self, visit: int, momentum: float, sites: Sequence[str]) -> None:
        self.events.append((visit, momentum))
        for site in sites:
            self.last[site] = visit

    def pending(self, site: str) -> float:
        """The product of the momenta of every teacher step since the site's own last one."""
        since = self.last.get(site, -1)
        product = 1.0
        for visit, momentum in self.events:
            if visit > since:
                product *= momentum
        return product


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (run seed, visit index, ...), independent of hashing salt."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


