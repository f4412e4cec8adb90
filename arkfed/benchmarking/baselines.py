"""Ark's ablations as plain functions over the same sites, loaders and losses as a site visit.

- :func:`train_pooled`: multi-task pooled training, Ark+'s ``AblationStudy/Concurrent``: every
  epoch interleaves all sites' batches (each site contributes exactly the batches a visit would
  draw from it), each batch trains the shared student and *its own* site head with the task loss
  only; no teacher, no consistency term, one optimizer for the whole run. It answers "what does
  cycling with a teacher buy over simply pooling the tasks?" (the pooled model is its student).
- :func:`train_parallel`: parallel federation (FedAvg-style, Ark+'s federated experiment): each
  round every site trains one visit (:func:`arkfed.visit.train_site_visit`, unchanged) from the
  same student, and the students are averaged with equal or sample-count weights
  (:func:`arkfed.federation.protocol.weighted_average`), on the round-indexed schedule of
  :func:`arkfed.federation.protocol.parallel_plans`.

Both take the benchmark's :class:`arkfed.training.TrainConfig` so their budget (epochs per site,
batch size, lr schedule, seed) is the cyclic run's; neither writes a run folder.
"""

from __future__ import annotations

import copy
from typing import Literal, Mapping

import numpy as np
import torch

from arkfed.data import make_train_loader
from arkfed.losses import task_loss
from arkfed.runs import RunState
from arkfed.site import Site
from arkfed.training import TrainConfig, derive_seed, resolve_device, visit_lrs

Weighting = Literal["equal", "samples"]


def _initial(config: TrainConfig, sites: Mapping[str, Site]) -> RunState:
    from arkfed.coordinator import initial_state

    return initial_state(config, {name: site.schema for name, site in sites.items()})


def pooled_schedule(steps: Mapping[str, int], seed: int) -> list[str]:
    """The site of every step of one pooled epoch: each site's batches, interleaved at random."""
    order = [name for name, n in steps.items() for _ in range(n)]
    rng = np.random.default_rng(seed)
    return [order[i] for i in rng.permutation(len(order))]


def train_pooled(config: TrainConfig, sites: Mapping[str, Site]) -> RunState:
    """Multi-task pooled training for ``config.rounds`` epochs of every site (see the module doc).

    The lr follows the same warm-up + cosine schedule as the cyclic run, stepped per epoch.
    Returns the state with ``teacher`` set to the student (pooling has no teacher).
    """
    from arkfed.visit import make_optimizer

    settings = config.settings
    device = resolve_device(settings.device)
    state = _initial(config, sites)
    student, heads = state.student.to(device).train(), {n: h.to(device).train() for n, h in state.heads.items()}
    optimizer = make_optimizer(student, torch.nn.ModuleDict(heads), settings, settings.lr)
    lrs = visit_lrs(settings, config.rounds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "pooled"))  # dropout / drop-path draws
        for epoch in range(config.rounds):
            for group in optimizer.param_groups:
                group["lr"] = lrs[epoch]
            loaders = {
                name: make_train_loader(
                    site.split("train"), site.schema, student.spec, settings.batch_size, epochs=settings.local_epochs,
                    seed=derive_seed(config.seed, "pooled", epoch, name), crop_scale=settings.crop_scale,
                    views=settings.views, jitter_p=settings.jitter_p, max_steps=settings.max_steps_per_visit,
                )
                for name, site in sites.items()
            }
            batches = {name: iter(loader) for name, loader in loaders.items()}
            schedule = pooled_schedule({name: len(loader) for name, loader in loaders.items()}, derive_seed(config.seed, "order", epoch))
            for name in schedule:
                batch = next(batches[name])
                logits = heads[name](student(batch.student.to(device)))
                loss = task_loss(logits.float(), batch.targets.to(device), batch.mask.to(device), sites[name].schema.task)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    student.eval()
    return RunState(student, student, heads, config.total_visits)


def train_parallel(config: TrainConfig, sites: Mapping[str, Site], weighting: Weighting = "equal") -> RunState:
    """Parallel federation: per round, one visit per site from the same student, then the average.

    ``weighting="samples"`` weights each site's student by the images it trained on in the round,
    ``"equal"`` weights sites equally (Ark+'s choice). With a per-iteration EMA teacher
    (``settings.ema == "iteration"``) each site's visit updates its own copy of the round's
    teacher and the copies are averaged with the same weights; with Ark's visit-wise EMA the
    teacher is updated once per round from the averaged student.
    """
    from arkfed.federation.protocol import parallel_plans, weighted_average
    from arkfed.schedules import ema_update
    from arkfed.visit import train_site_visit

    if weighting not in ("equal", "samples"):
        raise ValueError(f"weighting must be 'equal' or 'samples', got {weighting!r}")
    state = _initial(config, sites)
    per_iteration = config.settings.ema == "iteration"
    for plans in parallel_plans(config):
        students, teachers, weights = [], [], []
        for plan in plans:
            student = copy.deepcopy(state.student)
            teacher = copy.deepcopy(state.teacher) if per_iteration else state.teacher
            result = train_site_visit(student, teacher, state.heads[plan.site], sites[plan.site], config.settings, plan)
            students.append(student.state_dict())
            teachers.append(teacher.state_dict())
            weights.append(1.0 if weighting == "equal" else float(result.num_examples))
        state.student.load_state_dict(weighted_average(students, weights))
        if per_iteration:
            state.teacher.load_state_dict(weighted_average(teachers, weights))
        else:
            ema_update(state.teacher, state.student, plans[0].momentum)
        state.visits_done = plans[-1].visit + 1
    state.student.eval()
    state.teacher.eval()
    return state
