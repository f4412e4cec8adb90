"""One Ark site visit: the only training step there is, in local and in federated runs.

:func:`train_site_visit` trains the student backbone+projector and the site's private head for
``local_epochs`` over the site's training split, with Ark's loss
``(1 - c) * task_loss + c * MSE(student(view1), teacher(view2))``. It holds no coordinator state
and is deterministic given (weights, settings, plan): data order, augmentation, label-smoothing
draws and dropout are all seeded from ``plan.seed`` (the caller's global RNG is left untouched).

Optimizer: a timm optimizer per visit with ``plan.lr`` (the run's lr at this visit). By default it
starts fresh, so nothing but weights travels between visits and a resumed or federated run
matches a local one exactly. With ``optimizer_state="carry"`` (local runs) the caller passes the
run's :data:`OptimizerState`: it is loaded into the visit's optimizer for the student's and this
site's head's parameters and updated in place afterwards, which equals one optimizer over the
student and every head stepping through the visits one after another (Ark's), because a head
outside the visit has no gradient and is not stepped.

The networks come as one :class:`arkfed.ark.pair.ArkPair` (student, teacher, the site's two heads).
The teacher gets no gradients and stays in eval mode (its BatchNorm statistics come only from
the EMA). With ``settings.ema == "visit"`` (Ark's default) the *caller* applies
:func:`arkfed.schedules.ema_update` with ``plan.momentum`` after the visit; with ``"iteration"``
the visit updates the teacher and the site's teacher head after every step
(:meth:`~arkfed.ark.pair.ArkPair.ema_step`), the momentum following the cosine schedule at
fractional visit positions, and reports the product of those momenta (``momentum_product``): the
decay the other sites' teacher heads missed (see :mod:`arkfed.ark.pair`).

Hardware (device, workers, precision) is the site's own :class:`arkfed.site.config.ComputeSettings`,
never part of what the coordinator sends.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import DataLoader

from arkfed.ark.losses import ark_loss, consistency_loss, task_loss
from arkfed.ark.pair import ArkPair
from arkfed.ark.privacy import private_losses
from arkfed.ark.ranks import SINGLE, RankContext
from arkfed.config import TrainSettings, VisitPlan
from arkfed.data.device_views import DeviceViews
from arkfed.data.loaders import TrainLoaderOptions, make_train_loader
from arkfed.devices import autocast, memory_format, resolve_device
from arkfed.errors import ArkfedError, NonFiniteError
from arkfed.schedules import teacher_momentum
from arkfed.site.config import ComputeSettings
from arkfed.site.load import Site

VisitProgress = Callable[[int, int, float], None]
"""Called after every step with (step done, steps in this visit, loss of the step)."""

OptimizerState = dict[str, torch.Tensor]
"""A carried optimizer's state, flat: ``"<parameter>.<state key>"`` -> tensor (on the CPU), the
parameters named ``student.<name>`` and ``heads.<site>.<name>`` (``optimizer_state="carry"``)."""


class VisitResult(BaseModel):
    """Scalar outcome of a visit (all a site ever reports besides the weights)."""

    site: str
    round: int
    visit: int
    loss: float
    task_loss: float
    consistency_loss: float
    num_examples: int
    steps: int
    seconds: float
    images_per_s: float
    lr: float
    consistency: float
    momentum: float
    momentum_product: float | None = Field(
        default=None, ge=0, le=1,
        description="product of the teacher EMA momenta of this visit: one per step with ema 'iteration', else the plan's momentum")
    epsilon_spent: float | None = Field(
        default=None, ge=0, description="DP visits: epsilon spent of the site's budget on its training data, this visit included")
    epsilon_budget: float | None = Field(default=None, gt=0, description="DP visits: the site's total epsilon (policy privacy.epsilon)")
    noise_multiplier: float | None = Field(default=None, gt=0, description="DP visits: the Gaussian noise's std in units of max_grad_norm")


def make_optimizer(student: nn.Module, head: nn.Module, settings: TrainSettings, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over student + head (no weight decay on biases and norm layers)."""
    from timm.optim import create_optimizer_v2

    kwargs = {"momentum": settings.momentum} if settings.optimizer in ("sgd", "momentum") else {}
    return create_optimizer_v2(
        nn.ModuleDict({"student": student, "head": head}), opt=settings.optimizer, lr=lr,
        weight_decay=settings.weight_decay, **kwargs,
    )


def carried_parameters(student: nn.Module, head: nn.Module, site: str) -> dict[str, nn.Parameter]:
    """The visit's parameters under their :data:`OptimizerState` names."""
    named = {f"student.{name}": p for name, p in student.named_parameters()}
    return named | {f"heads.{site}.{name}": p for name, p in head.named_parameters()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], carried: OptimizerState) -> None:
    """Put the carried state of ``params`` (those it has) into ``optimizer``, copied to each parameter's device."""
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in carried.items():
        name, field = key.rsplit(".", 1)
        if name in params:
            fields.setdefault(name, {})[field] = value
    for name, state in fields.items():
        device = params[name].device
        optimizer.state[params[name]] = {k: v.clone() if k == "step" else v.to(device, copy=True) for k, v in state.items()}


def read_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> OptimizerState:
    """The optimizer's tensor state of ``params``, on the CPU, under their :data:`OptimizerState` names."""
    return {f"{name}.{field}": value.detach().cpu().clone()
            for name, p in params.items() for field, value in optimizer.state.get(p, {}).items() if torch.is_tensor(value)}


def loader_options(settings: TrainSettings, plan: VisitPlan, compute: ComputeSettings, rank: int = 0,
                   world_size: int = 1, dataset: str | None = None) -> TrainLoaderOptions:
    """A site visit's loader: the run's settings, the visit's seed, the site's hardware, this rank's share.
    ``dataset`` (the site's plugin name) listed in ``settings.dataset_resize`` squashes its images to that
    square before the crop, whatever ``crop_source`` says (Ark-6: ChestX-ray14 and VinDr-CXR at 224)."""
    crop_source, train_resize = settings.crop_source, settings.train_resize
    if dataset in settings.dataset_resize:
        crop_source, train_resize = "resized", settings.dataset_resize[dataset]
    return TrainLoaderOptions(
        batch_size=settings.batch_size, epochs=settings.local_epochs, seed=plan.seed, crop_scale=settings.crop_scale,
        views=settings.views, jitter_p=settings.jitter_p, max_steps=settings.max_steps_per_visit,
        crop_source=crop_source, train_resize=train_resize, num_workers=compute.workers(),
        pin_memory=resolve_device(compute.device).type == "cuda", augment=compute.augment, rank=rank, world_size=world_size,
    )


def train_site_visit(
    pair: ArkPair,
    site: Site,
    settings: TrainSettings,
    plan: VisitPlan,
    compute: ComputeSettings | None = None,
    progress: VisitProgress | None = None,
    rank: RankContext | None = None,
    optimizer_state: OptimizerState | None = None,
) -> VisitResult:
    """Train ``pair``'s student and head in place on ``site``'s training split for one visit, in this
    process (as one of ``rank.world_size`` DDP ranks when given). Whether a visit runs on several
    GPUs is decided once, by :func:`arkfed.ark.tasks.train_visit`. ``optimizer_state`` (carried
    optimizer state) is loaded into the visit's optimizer and updated in place with its state after."""
    pair.check_head(site)
    compute = compute or site.config.compute
    rank = rank or SINGLE
    device = resolve_device(compute.device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(plan.seed + rank.rank)  # dropout / drop-path draws (own stream per rank)
        return _run_visit(pair, site, settings, plan, device, compute, progress, rank, optimizer_state)


def _plain_losses(logits, targets, mask, z_student, z_teacher, c: float, task: str, multiclass_loss: str):
    """(loss, task, consistency) of a plain visit: Ark's loss over the batch."""
    task_value = task_loss(logits.float(), targets, mask, task, multiclass_loss)
    cons = consistency_loss(z_student.float(), z_teacher.float()) if z_teacher is not None else None
    return ark_loss(task_value, cons, c), task_value, cons


def _private_visit(pair: ArkPair, site, settings, plan, compute, optimizer, rank):
    """The visit's DP-SGD (:mod:`arkfed.ark.privacy`) when the site's policy has ``privacy:``, else None."""
    if site.config.policy.privacy is None:
        return None
    from arkfed.ark.privacy import TupleCollate, private_training
    from arkfed.data.loaders import TrainCollate, TrainDataset
    from arkfed.data.transforms import ViewPair

    if rank.world_size > 1 or compute.augment == "device":
        raise ArkfedError("a site with a privacy budget trains each visit in one process with CPU views: set compute.gpus 1 "
                          "and compute.augment cpu", site=site.name)
    table, spec = site.split("train"), pair.student.spec
    o = loader_options(settings, plan, compute, dataset=site.config.dataset)
    views = ViewPair(spec.img_size, o.crop_scale, o.views, o.jitter_p)
    dataset = TrainDataset(table, site.schema, spec.img_size, views, np.arange(len(table)), o.seed, o.crop_source, o.train_resize)
    loader = DataLoader(dataset, batch_size=min(o.batch_size, len(table)), collate_fn=TupleCollate(TrainCollate(spec)),
                        num_workers=o.num_workers, generator=torch.Generator().manual_seed(plan.seed))
    return private_training(pair.student, pair.head, optimizer, loader, site, settings, plan)


def _run_visit(pair: ArkPair, site, settings, plan, device, compute, progress, rank=SINGLE, carried=None) -> VisitResult:
    fmt = memory_format(device)
    pair.to_train(device, fmt)
    student, teacher, head = pair.student, pair.teacher, pair.head
    optimizer = make_optimizer(student, head, settings, plan.lr)
    params = carried_parameters(student, head, site.name)
    if carried is not None:
        load_optimizer_state(optimizer, params, carried)
    private = _private_visit(pair, site, settings, plan, compute, optimizer, rank)
    views = None
    if private is not None:
        batches, steps, optimizer, losses = private.batches(), private.steps, private.optimizer, private_losses
        forward = private.forward
    else:
        options = loader_options(settings, plan, compute, rank.rank, rank.world_size, site.config.dataset)
        loader = make_train_loader(site.split("train"), site.schema, student.spec, options)
        student_forward, head_forward = rank.wrap(student, device, compute.compile), rank.wrap(head, device)
        views = DeviceViews(student.spec.mean, student.spec.std) if compute.augment == "device" else None
        batches, steps, losses = loader, len(loader), _plain_losses

        def forward(x):
            z = student_forward(x)
            return z, head_forward(z)
    c = plan.consistency
    totals = torch.zeros(3, dtype=torch.float64)
    examples = 0
    start = time.perf_counter()
    product = 1.0  # of the per-step teacher momenta (ema: iteration)
    for step, batch in enumerate(batches):
        if views is not None:  # the loader sent uint8 images + view parameters: make the views here
            batch = views.batch(batch, device)
        xs = batch.student.to(device, non_blocking=True).contiguous(memory_format=fmt)
        n = len(xs)
        if n == 0:  # an empty Poisson batch (DP): the step adds noise only
            private.empty_step()
            value = 0.0
        else:
            value, parts = _train_step(forward, teacher, batch, xs, device, fmt, compute, optimizer, losses, c, site, settings, plan, step)
            totals += parts * n
        if settings.ema == "iteration":
            offset = plan.schedule_offset  # a run continued from a release: after the release's steps
            momentum = teacher_momentum(offset + plan.visit + (step + 1) / steps, offset + plan.total_visits, settings.momentum_teacher)
            pair.ema_step(momentum)
            product *= momentum
        examples += n
        if progress is not None:
            progress(step + 1, steps, value)
    seconds = time.perf_counter() - start
    if carried is not None:
        carried.update(read_optimizer_state(optimizer if private is None else optimizer.original_optimizer, params))
    summed = rank.sum(torch.cat([totals, torch.tensor([examples], dtype=torch.float64)]))  # over DDP ranks
    totals, examples = summed[:3], int(summed[3])
    mean = (totals / max(examples, 1)).tolist()
    return VisitResult(
        site=site.name, round=plan.round, visit=plan.visit, loss=mean[0], task_loss=mean[1], consistency_loss=mean[2],
        num_examples=examples if private is None else private.planned_examples, steps=steps, seconds=seconds,
        images_per_s=examples / seconds if seconds > 0 else 0.0,
        lr=plan.lr, consistency=c, momentum=plan.momentum, momentum_product=product if settings.ema == "iteration" else plan.momentum,
        **(private.finish() if private is not None else {}),
    )


def _train_step(forward, teacher, batch, xs, device, fmt, compute, optimizer, losses, c, site, settings, plan, step):
    """One optimizer step on one batch; returns the step's loss and its (loss, task, consistency) parts."""
    targets = batch.targets.to(device, non_blocking=True)
    mask = batch.mask.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)  # before the forward: DP's per-sample gradients must start empty
    with autocast(device, compute.precision):
        z_student, logits = forward(xs)
        z_teacher = None
        if c > 0:
            xt = batch.teacher.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with torch.no_grad():
                z_teacher = teacher(xt)
    loss, task, cons = losses(logits.float(), targets, mask, z_student.float(), None if z_teacher is None else z_teacher.float(),
                              c, site.schema.task, settings.multiclass_loss)
    zero = torch.zeros((), device=loss.device)
    parts = torch.stack([loss.detach(), task.detach(), cons.detach() if cons is not None else zero]).double().cpu()
    value = float(parts[0])  # one device sync per step (all three losses at once)
    if not math.isfinite(value):  # stop before the step corrupts the weights; the last checkpoint stays good
        raise NonFiniteError(f"loss became {value} in visit {plan.visit} step {step}; lower --lr", site=site.name,
                             category="non_finite_loss")
    loss.backward()
    optimizer.step()
    return value, parts
