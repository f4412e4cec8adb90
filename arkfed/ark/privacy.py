"""DP-SGD for a site visit, with Opacus: what a visit does differently when its site's policy has a
``privacy:`` block (:class:`arkfed.site.policy.PrivacyPolicy`; the budget: :mod:`arkfed.site.budget`).

:func:`private_training` turns the visit's model, optimizer and data into Opacus' (its
``PrivacyEngine.make_private``): the student and the site's head train as one module whose
per-sample gradients Opacus computes (:func:`grad_sample_mode`), the optimizer clips every
sample's gradient to ``max_grad_norm`` and adds Gaussian noise of ``noise_multiplier *
max_grad_norm``, and the batches are Poisson-sampled (Opacus' ``DPDataLoader``: each training
image joins each step with probability ``q = 1 / ceil(N / batch_size)``). Noise and sampling
are seeded from the visit's seed *and a secret only the site holds*
(:func:`arkfed.site.budget.private_seed`): a visit is reproducible at its site, but the
coordinator, which picks the visit's seed, cannot redraw the noise. The visit takes the steps a plain visit
would take (:func:`arkfed.site.policy.planned_steps`); an empty Poisson batch is still a step
(noise only), as the accountant counts it. The noise multiplier is the ledger's
(:meth:`arkfed.site.budget.BudgetLedger.charge`), charged before the first step; the visit
reports epsilon spent as Opacus' accountant computes it over the site's whole history.

Why Ark's two extra pieces need no extra budget:

- **The teacher's EMA is post-processing.** The teacher (and the teacher's head) is an average of
  students that left DP-SGD steps (and of models from other sites' data, which this site's
  guarantee is not about); computing it reads no training image, so it spends nothing. The
  teacher's *forward pass* on a training image does read that image: it is part of that sample's
  consistency term, below.
- **The consistency loss is a per-sample term, clipped with the task loss.** Sample ``i``'s loss is
  ``(1 - c) * task_i + c * MSE(student(view1_i), teacher(view2_i))``: both terms depend on image
  ``i`` (its two views and labels) and on weights fixed during the step (the teacher takes no
  gradient), never on another image of the batch. So the gradient of sample ``i``'s whole loss
  is one per-sample gradient, clipped as one, and the sensitivity of the summed step to adding or
  removing one image is ``max_grad_norm`` as DP-SGD's analysis requires. For the same reason the
  task loss is each sample's own mean over its counted labels
  (:func:`arkfed.ark.losses.task_loss_per_sample`), not the plain visit's pooled mean, whose
  denominator counts the labels of the whole batch.

What Opacus cannot train is refused before anything trains, naming the layer: BatchNorm mixes the
samples of a batch (its statistics), so a model with BatchNorm is refused with the hint to build
it with ``norm: group`` (:class:`arkfed.spec.ModelSpec`: Opacus' ``ModuleValidator.fix``
replaces every BatchNorm with GroupNorm, for the whole run, coordinator and sites alike, so the
weights still fit together). LayerNorm is per-sample: a ViT trains as it is (Opacus' hook mode,
its class token and position embedding through functorch); Swin does not, as Opacus refuses its
``WindowAttention`` (a trainable bias table beside a buffer), and the refusal names that layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from arkfed.ark.losses import consistency_loss_per_sample, task_loss_per_sample
from arkfed.data.batches import TrainBatch
from arkfed.site.budget import BudgetLedger, PrivacyRefused, VisitCharge, private_seed
from arkfed.site.policy import PrivacyPolicy, Refusal, planned_steps


class StudentWithHead(nn.Module):
    """The trained part of a visit as one module (what Opacus wraps): ``x -> (embedding, logits)``."""

    def __init__(self, student: nn.Module, head: nn.Module):
        super().__init__()
        self.student, self.head = student, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.student(x)
        return z, self.head(z)


def unsupported_layer(module: nn.Module) -> Refusal | None:
    """Why Opacus cannot train ``module`` (its ``ModuleValidator``), naming the first such layer, or None."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(module, strict=False)
    if not errors:
        return None
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            return Refusal("privacy", f"layer {name} ({type(layer).__name__}) mixes the samples of a batch, so DP-SGD cannot "
                           "clip per sample; build the run's model with norm: group (--norm group: BatchNorm -> GroupNorm)")
    return Refusal("privacy", f"Opacus cannot train this model: {' '.join(str(errors[0]).split())[:300]}")


EW_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding,
             nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def grad_sample_mode(module: nn.Module) -> str:
    """Opacus' per-sample gradient mode: ``ew`` (torch's expanded weights) when every parameter lives
    in a layer it supports (CNNs: its hooks cannot follow timm's in-place residual additions),
    else ``hooks`` (ViTs: their class token and position embedding are bare parameters)."""
    owners = (m for m in module.modules() if any(True for _ in m.parameters(recurse=False)))
    return "ew" if all(isinstance(m, EW_LAYERS) for m in owners) else "hooks"


def opacus_layer(exc: BaseException) -> str:
    """Opacus' complaint about a layer, as 'layer NAME (TYPE): ...' when it names one."""
    import re

    text = " ".join(str(exc).split())
    found = re.search(r"\(([\w.]+):(\w+)\(", text)
    if found:
        return f"layer {found.group(1)} ({found.group(2)}) is not supported by Opacus (a trainable layer with buffers)"
    return text[:300]


class TupleCollate:
    """The visit's collate as a plain tuple (Opacus builds empty Poisson batches of the same structure)."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, samples) -> tuple:
        return tuple(self.collate(samples))


@dataclass
class PrivateVisit:
    """One DP visit in progress: Opacus' module, optimizer and Poisson loader, and the visit's charge."""

    engine: object
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    charge: VisitCharge
    policy: PrivacyPolicy
    batch_size: int
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.charge.steps

    @property
    def planned_examples(self) -> int:
        """What the visit reports as its ``num_examples``: steps x the batch size (the Poisson batches'
        mean), as a plain visit would; the drawn count varies and says nothing the plan does not."""
        return self.steps * self.batch_size

    def batches(self) -> Iterator[TrainBatch]:
        """The visit's ``steps`` Poisson batches (Opacus' loader, as many of its epochs as it takes)."""
        done = 0
        while done < self.steps:
            for batch in self.loader:
                yield TrainBatch(*batch)
                done += 1
                if done == self.steps:
                    return

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(x)

    def empty_step(self) -> None:
        """A step on an empty Poisson batch: no sample, so only noise (the accountant counts the step)."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> dict[str, float]:
        """Epsilon spent after the visit, as the engine's accountant (the site's history plus the
        steps just taken) computes it; the per-sample gradient machinery is taken off the model."""
        spent = float(self.engine.accountant.get_epsilon(self.charge.delta))
        self.module.to_standard_module()  # Opacus' hooks and per-sample attributes off the student and head
        return {"epsilon_spent": spent, "epsilon_budget": self.policy.epsilon, "noise_multiplier": self.charge.noise_multiplier}


def private_losses(logits, targets, mask, z_student, z_teacher, c: float, task: str, multiclass_loss: str):
    """(loss, task, consistency) as batch means of per-sample terms (0 for an empty batch; see the module docstring)."""
    per_task = task_loss_per_sample(logits, targets, mask, task, multiclass_loss)
    per_sample = per_task
    zero = per_task.sum() * 0.0
    cons = None
    if z_teacher is not None and c > 0:
        per_cons = consistency_loss_per_sample(z_student, z_teacher)
        per_sample = (1.0 - c) * per_task + c * per_cons
        cons = per_cons.mean() if len(per_cons) else zero
    if not len(per_sample):
        return zero, zero, cons
    return per_sample.mean(), per_task.mean(), cons


def private_training(student: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                     site, settings, plan) -> PrivateVisit:
    """Opacus' DP-SGD around one visit (see the module docstring): checks the model, charges the
    site's budget for the visit (raises :class:`~arkfed.site.budget.PrivacyRefused`) and returns
    the private module, optimizer and Poisson loader. ``loader`` is a plain loader over the
    training split, one draw per image, in :class:`TupleCollate` batches."""
    from opacus import PrivacyEngine

    policy: PrivacyPolicy = site.config.policy.privacy
    module = StudentWithHead(student, head)
    problem = unsupported_layer(module)
    if problem is not None:
        raise PrivacyRefused(problem, site.name)
    train_size = len(loader.dataset)
    sample_rate = 1.0 / len(loader)
    batch_size, steps = planned_steps(settings, train_size)
    with warnings.catch_warnings():  # secure_mode off: said in SECURITY.md, not on every visit
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=policy.accountant)
    state_dir = site.config.local_state_dir
    noise = torch.Generator(device=next(student.parameters()).device).manual_seed(private_seed(state_dir, plan.seed, "noise"))
    loader.generator.manual_seed(private_seed(state_dir, plan.seed, "sampling"))  # Opacus' Poisson sampler draws from it
    try:  # Opacus wraps the model first: what it cannot train is refused before the budget is charged
        module, optimizer, private_loader = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=policy.max_grad_norm,
            poisson_sampling=True, grad_sample_mode=grad_sample_mode(module), noise_generator=noise,
        )
    except NotImplementedError as exc:
        raise PrivacyRefused(Refusal("privacy", f"Opacus cannot train this model: {opacus_layer(exc)}"), site.name) from None
    ledger = BudgetLedger(state_dir, policy, train_size, site.name)
    engine.accountant.history = ledger.history()  # the site's data has this history already
    charge = ledger.charge(sample_rate, steps, plan.rounds - plan.round, label=f"visit {plan.visit} (round {plan.round}) of a run")
    optimizer.noise_multiplier = charge.noise_multiplier  # what the accountant's step hook records, and the noise drawn
    params = [p for p in module.parameters() if p.requires_grad]
    return PrivateVisit(engine, module, optimizer, private_loader, charge, policy, batch_size, params)
