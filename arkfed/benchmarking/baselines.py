"""Ark+'s "concurrent" ablation as a plain function over the same loaders and loss as a site visit.

:func:`train_pooled` is multi-task pooled training (Ark+'s ``AblationStudy/Concurrent``): every
epoch interleaves all sites' batches (each site contributes exactly the batches a visit would draw
from it), each batch trains the shared student and *its own* site head with the task loss only; no
teacher, no consistency term, one optimizer for the whole run. It answers "what does cycling with
a teacher buy over simply pooling the tasks?" (the pooled model is its student). It takes the
benchmark's :class:`arkfed.config.TrainConfig`, so its budget (epochs per site, batch size, lr
schedule, seed) is the cyclic run's, and writes no run folder.

The other ablations need no code of their own: Ark without the consistency term is the loop with
``max_consistency: 0``, and the parallel federation is the loop with ``mode: parallel`` and
``weighting: equal|samples``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from arkfed.ark.losses import task_loss
from arkfed.config import TrainConfig, derive_seed
from arkfed.data.loaders import TrainLoaderOptions, make_train_loader
from arkfed.devices import resolve_device
from arkfed.run.folder import RunState
from arkfed.schedules import visit_lrs
from arkfed.site.config import ComputeSettings
from arkfed.site.load import Site


def _initial(config: TrainConfig, sites: Mapping[str, Site]) -> RunState:
    from arkfed.run.start import initial_state

    return initial_state(config, {name: site.schema for name, site in sites.items()})


def pooled_schedule(steps: Mapping[str, int], seed: int) -> list[str]:
    """The site of every step of one pooled epoch: each site's batches, interleaved at random."""
    order = [name for name, n in steps.items() for _ in range(n)]
    rng = np.random.default_rng(seed)
    return [order[i] for i in rng.permutation(len(order))]


def train_pooled(config: TrainConfig, sites: Mapping[str, Site], compute: ComputeSettings | None = None) -> RunState:
    """Multi-task pooled training for ``config.rounds`` epochs of every site (see the module doc).

    The lr follows the same warm-up + cosine schedule as the cyclic run, stepped per epoch.
    Returns the state with ``teacher`` set to the student (pooling has no teacher).
    """
    from arkfed.ark.visit import make_optimizer

    settings = config.settings
    compute = compute or ComputeSettings()
    device = resolve_device(compute.device)
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
                name: make_train_loader(site.split("train"), site.schema, student.spec, TrainLoaderOptions(
                    settings.batch_size, epochs=settings.local_epochs, seed=derive_seed(config.seed, "pooled", epoch, name),
                    crop_scale=settings.crop_scale, views=settings.views, jitter_p=settings.jitter_p,
                    max_steps=settings.max_steps_per_visit, num_workers=compute.workers(), pin_memory=device.type == "cuda",
                ))
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
