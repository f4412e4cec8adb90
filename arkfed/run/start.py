"""How a run begins: the seeded initial student, teacher and heads (or those an ``init`` source
brings: an earlier run, a release, a released Ark checkpoint), and the checkpoint a resumed run
continues from. Used by the loop (:mod:`arkfed.run.loop`) and by both implementations of its sites."""

from __future__ import annotations

import copy
from typing import Mapping

import torch

from arkfed.ark.pair import SiteHeads
from arkfed.config import TrainConfig, derive_seed
from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.run.folder import RunFolder, RunState
from arkfed.run.records import trim_metrics


def _init_model(config: TrainConfig) -> ArkModel:
    from arkfed.model.weights import load_ark_model

    if config.init == "random":
        return ArkModel(config.model)
    if config.init == "imagenet":
        return ArkModel(config.model, pretrained=True)
    return load_ark_model(config.init, "teacher", spec=config.model)


def init_heads(config: TrainConfig, schemas: Mapping[str, LabelSchema], embed_dim: int, teacher: bool = False) -> dict[str, SiteHead]:
    """The initial heads of the listed sites in ``schemas``: each seeded by the run seed and the
    site's name only, so a site that joins late gets exactly the head it would have had at the
    start, whoever else was there; continual accrual reuses an earlier run's, a release's (or a
    released Ark checkpoint's) head for a known site whose classes are unchanged. ``teacher``: the
    teacher's heads the source brings (a release's, a run's ``teacher-heads/``), only those."""
    from arkfed.model.weights import load_init_heads, load_init_teacher_heads

    previous = load_init_teacher_heads(config.init) if teacher else load_init_heads(config.init)
    heads = {}
    for name in (site for site in config.sites if site in schemas):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "head", name))
            head = SiteHead(name, schemas[name], embed_dim)
        old = previous.get(name)
        if old is not None and old.classes == head.classes and old.in_features == embed_dim:
            head.load_state_dict(old.state_dict())
            heads[name] = head
        elif not teacher:
            heads[name] = head
    return heads


def initial_state(config: TrainConfig, schemas: Mapping[str, LabelSchema]) -> RunState:
    """Seeded student, teacher (a copy of the student, as in Ark) and both heads per site in ``schemas``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        student = _init_model(config)
    heads = init_heads(config, schemas, student.embed_dim)
    kept = init_heads(config, schemas, student.embed_dim, teacher=True)  # an old site's teacher head continues
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher_heads = {name: kept[name] if name in kept else SiteHeads.fresh(head).teacher for name, head in heads.items()}
    for head in kept.values():
        head.requires_grad_(False)
    return RunState(student, teacher, heads, 0, teacher_heads)


def open_run(run: RunFolder, config: TrainConfig, schemas: Mapping[str, LabelSchema], resume: bool) -> tuple[RunState, set[int], bool]:
    """The state to start from, the rounds already evaluated and whether it is fresh: a new run
    writes its config; a resumed one continues from its checkpoint with metrics trimmed back to it
    (a run killed before its first checkpoint starts over)."""
    if resume:
        if not run.has_run():
            raise ArkfedError(f"{run.path}: nothing to resume (no config.yaml)")
        if run.has_checkpoint():
            state = run.load_checkpoint()
            records, evaluated = trim_metrics(run.read_metrics(), state.visits_done)
            run.rewrite_metrics(records)
            return state, evaluated, False
        run.rewrite_metrics([])
        return initial_state(config, schemas), set(), True
    if run.has_run():
        raise ArkfedError(f"{run.path} already holds a run; pass --resume {run.path} or choose another --out")
    run.write_config(config)
    return initial_state(config, schemas), set(), True

