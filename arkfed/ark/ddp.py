"""One site visit on several GPUs: DistributedDataParallel, one process per GPU, same result as one.

``compute.gpus = N > 1`` (the site YAML's ``compute:``, or ``--gpus N``) makes
:func:`arkfed.ark.tasks.train_visit` call :func:`run_visit_on_gpus`,
which starts N processes (``torch.multiprocessing``, no torchrun: the rendezvous is a free TCP
port on 127.0.0.1). Each rank trains the same :class:`~arkfed.ark.pair.ArkPair` (student and head
wrapped in DDP) on its share of every *global* batch:

- global batch = N x ``settings.batch_size`` (the batch size is per GPU, so memory per GPU is
  that of a one-GPU visit). The visit's draws are those of a one-process visit with the global
  batch, and rank ``r`` takes positions ``[r*b, (r+1)*b)`` of each global batch; every sample keeps
  its draw number, so augmentation and label-smoothing draws are the one-process ones.
- Loss, lr, consistency weight and teacher EMA are unchanged: gradients are averaged over ranks,
  which equals the gradient of the global batch's mean loss when every rank's batch counts the
  same number of labelled entries (always, unless a label policy ignores uncertain or missing
  entries: then each rank's masked mean is weighted equally, a small difference). The teacher
  forward is local (no gradients) and the per-iteration EMA is applied identically on every rank.
- BatchNorm layers become SyncBatchNorm (statistics over the global batch, as one process
  would compute them) on CUDA; gloo (CPU) has no SyncBatchNorm, so CPU runs are exact only for
  models without BatchNorm (ViT/Swin use LayerNorm).
- Only rank 0 writes: its pair's weights and the :class:`~arkfed.ark.visit.VisitResult` (losses averaged
  over all ranks) go through a temporary file back to the calling process, which loads them into
  its own pair in place; it alone talks to Flower and writes run files.
- Files between the processes hold tensors and JSON only: weights as a ``state_dict`` loaded with
  ``torch.load(weights_only=True)`` (no pickled objects, so nothing in them can run code), settings,
  plan, model spec and the result as JSON. The site (its tables) goes to the ranks as a process
  argument, in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from arkfed.ark.pair import PARTS
from arkfed.ark.ranks import RankContext
from arkfed.ark.visit import VisitResult, train_site_visit
from arkfed.errors import ArkfedError
from arkfed.ports import free_port  # the rendezvous of the ranks, on 127.0.0.1: never exposed

if TYPE_CHECKING:
    from arkfed.ark.pair import ArkPair
    from arkfed.ark.visit import VisitProgress
    from arkfed.config import TrainSettings, VisitPlan
    from arkfed.site.config import ComputeSettings
    from arkfed.site.load import Site


def _portable_site(site: "Site") -> "Site":
    """The site without its plugin instance (plugins load from files a child cannot import by name)."""
    return replace(site, plugin=None)


def _job(pair: "ArkPair", settings: "TrainSettings", plan: "VisitPlan", compute: "ComputeSettings", cuda: bool) -> dict:
    """Everything a rank needs besides the site and the weights, as JSON."""
    head = pair.head
    return {"settings": settings.model_dump(mode="json"), "plan": plan.model_dump(mode="json"), "compute": compute.model_dump(mode="json"),
            "cuda": cuda, "head": {"site": head.site, "schema": head.schema.model_dump(mode="json")},
            "specs": {part: getattr(pair, part).spec.model_dump(mode="json") for part in ("student", "teacher")},
            "frozen": {part: [name for name, p in getattr(pair, part).named_parameters() if not p.requires_grad] for part in PARTS}}


def _rebuild_pair(job: dict, state: dict) -> "ArkPair":
    """The caller's pair from the job's JSON and its weights (a ``state_dict`` per part)."""
    from arkfed.ark.pair import ArkPair, SiteHeads
    from arkfed.data.schema import LabelSchema
    from arkfed.model.ark import ArkModel, SiteHead
    from arkfed.spec import ModelSpec

    models = {}
    for part in ("student", "teacher"):
        spec = ModelSpec.model_validate(job["specs"][part])
        models[part] = ArkModel(spec)
        models[part].spec = spec  # exactly the caller's (normalisation included)
    schema = LabelSchema.model_validate(job["head"]["schema"])
    embed_dim = models["student"].embed_dim
    heads = SiteHeads(SiteHead(job["head"]["site"], schema, embed_dim), SiteHead(job["head"]["site"], schema, embed_dim))
    pair = ArkPair(models["student"], models["teacher"], heads)
    pair.load_state_dict(state)
    for part in PARTS:
        frozen = set(job["frozen"][part])
        for name, parameter in getattr(pair, part).named_parameters():
            parameter.requires_grad_(name not in frozen)
    return pair


def _rank_main(rank: int, world_size: int, port: int, folder: str, threads: int, site: "Site") -> None:
    import torch.distributed as dist

    from arkfed.config import TrainSettings, VisitPlan
    from arkfed.site.config import ComputeSettings

    torch.set_num_threads(threads)
    job = json.loads((Path(folder) / "job.json").read_text())
    state = torch.load(Path(folder) / "job.pt", map_location="cpu", weights_only=True)
    compute = ComputeSettings.model_validate(job["compute"])
    cuda = job["cuda"]
    if cuda:
        torch.cuda.set_device(rank)
        compute = compute.model_copy(update={"device": f"cuda:{rank}"})
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        pair = _rebuild_pair(job, state)
        if cuda:
            pair.student = nn.SyncBatchNorm.convert_sync_batchnorm(pair.student)
        context = RankContext(rank, world_size)
        progress = _progress_to_file(Path(folder)) if rank == 0 else None
        settings, plan = TrainSettings.model_validate(job["settings"]), VisitPlan.model_validate(job["plan"])
        result = train_site_visit(pair, site, settings, plan, compute=compute, progress=progress, rank=context)
        if rank == 0:
            (Path(folder) / "result.json").write_text(json.dumps(result.model_dump(), allow_nan=True))
            torch.save(pair.state_dict(), Path(folder) / "result.tmp")
            os.replace(Path(folder) / "result.tmp", Path(folder) / "result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _progress_to_file(folder: Path) -> Callable[[int, int, float], None]:
    path = folder / "progress"

    def report(step: int, steps: int, loss: float) -> None:
        path.with_suffix(".tmp").write_text(f"{step} {steps} {loss!r}")
        os.replace(path.with_suffix(".tmp"), path)

    return report


def run_visit_on_gpus(pair: "ArkPair", site: "Site", settings: "TrainSettings", plan: "VisitPlan", compute: "ComputeSettings",
                      progress: "VisitProgress | None" = None) -> "VisitResult":
    """Run :func:`arkfed.ark.visit.train_site_visit` in ``compute.gpus`` processes; load rank 0's weights
    into ``pair`` in place and return its :class:`VisitResult`.

    On a machine without CUDA the ranks run on CPU with gloo (for tests); with CUDA, ``gpus`` must
    not exceed the visible devices.
    """
    import torch.multiprocessing as mp

    from arkfed.devices import resolve_device

    gpus = compute.gpus
    device = resolve_device(compute.device)
    cuda = device.type == "cuda"
    if cuda and gpus > torch.cuda.device_count():
        raise ArkfedError(f"--gpus {gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible", site=site.name)
    n_train = len(site.split("train"))
    if n_train < gpus * settings.batch_size:
        raise ArkfedError(f"{n_train} training images are fewer than one global batch ({gpus} GPUs x batch "
                          f"{settings.batch_size}); lower --batch-size or --gpus", site=site.name)
    threads = max(1, torch.get_num_threads() // gpus)
    with tempfile.TemporaryDirectory(prefix="arkfed-ddp-") as folder:
        job = _job(pair, settings, plan, compute.model_copy(update={"gpus": 1}), cuda)
        (Path(folder) / "job.json").write_text(json.dumps(job))
        torch.save(pair.state_dict(), Path(folder) / "job.pt")
        # CUDA cannot be forked; a CPU (gloo) run forks, which skips re-importing torch in each rank
        method = "spawn" if cuda or not hasattr(os, "fork") else "fork"
        context = mp.start_processes(_rank_main, args=(gpus, free_port(), folder, threads, _portable_site(site)), nprocs=gpus,
                                     join=False, start_method=method)
        _wait(context, Path(folder), progress)
        state = torch.load(Path(folder) / "result.pt", map_location="cpu", weights_only=True)
        result = VisitResult.model_validate(json.loads((Path(folder) / "result.json").read_text()))
    pair.load_state_dict(state)
    return result


def _wait(context, folder: Path, progress) -> None:
    """Join the ranks, relaying rank 0's progress to the caller's callback meanwhile."""
    last = None
    done = False
    while not done:
        done = context.join(timeout=0.5)
        if progress is None:
            continue
        try:
            text = (folder / "progress").read_text()
        except OSError:
            continue
        if text != last:
            last = text
            step, steps, loss = text.split()
            progress(int(step), int(steps), float(loss))
