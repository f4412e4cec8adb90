"""The local coordinator: Ark's cycle over sites in one process, with a resumable run folder.

A round visits every site once (:func:`arkfed.training.plan_visits`); each visit is
:func:`arkfed.visit.train_site_visit` followed, in Ark's default visit-wise mode, by the teacher
EMA update. After each round every site's validation split is evaluated for student and teacher.
Each site's head is kept apart and only its own visits touch it, as a site would keep it.

The pieces (:func:`initial_state`, :func:`after_visit`, :func:`evaluate_round`,
:func:`finish_run`) are what the Flower ServerApp reuses around remote visits.
"""

from __future__ import annotations

import copy
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import torch

from arkfed.errors import ArkfedError
from arkfed.io import json_safe
from arkfed.metrics import evaluate_site
from arkfed.model import ArkModel, SiteHead
from arkfed.runs import RunFolder, RunState
from arkfed.schedules import ema_update
from arkfed.site import Site, load_site
from arkfed.training import TrainConfig, VisitPlan, derive_seed, plan_visits
from arkfed.visit import VisitResult, train_site_visit

VisitHook = Callable[[VisitPlan, VisitResult], None]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_sites(config: TrainConfig, plugins_dirs=()) -> dict[str, Site]:
    """The run's sites from their YAMLs, keyed by name, checked against ``config.sites``."""
    sites = {}
    for ref in config.site_configs:
        site = load_site(ref, plugins_dirs)
        sites[site.name] = site
    missing = [name for name in config.sites if name not in sites]
    if missing:
        raise ArkfedError(f"no site config for {missing} (configs given: {config.site_configs})")
    return {name: sites[name] for name in config.sites}


def _init_model(config: TrainConfig) -> ArkModel:
    from arkfed.weights import load_ark_model

    if config.init == "random":
        return ArkModel(config.model)
    if config.init == "imagenet":
        return ArkModel(config.model, pretrained=True)
    return load_ark_model(config.init, "teacher", spec=config.model)


def _init_heads(config: TrainConfig, schemas: Mapping[str, object], embed_dim: int) -> dict[str, SiteHead]:
    """Fresh heads, except that continual accrual reuses an earlier run's head for a known site
    whose classes are unchanged."""
    from arkfed.weights import load_heads

    previous: dict[str, SiteHead] = {}
    if config.init not in ("random", "imagenet"):
        folder = Path(config.init) / "heads"
        if folder.is_dir():
            previous = load_heads(folder)
    heads = {}
    for name in config.sites:
        head = SiteHead(name, schemas[name], embed_dim)
        old = previous.get(name)
        if old is not None and old.classes == head.classes and old.in_features == embed_dim:
            head.load_state_dict(old.state_dict())
        heads[name] = head
    return heads


def initial_state(config: TrainConfig, schemas: Mapping[str, object]) -> RunState:
    """Seeded student, teacher (a copy of the student, as in Ark) and one head per site."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        student = _init_model(config)
        heads = _init_heads(config, schemas, student.embed_dim)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return RunState(student, teacher, heads, 0)


def after_visit(state: RunState, plan: VisitPlan, config: TrainConfig) -> None:
    """Ark's visit-wise teacher update (skipped with per-iteration EMA, done inside the visit)."""
    if config.settings.ema == "visit":
        ema_update(state.teacher, state.student, plan.momentum)
    state.visits_done = plan.visit + 1


def visit_record(plan: VisitPlan, result: VisitResult) -> dict:
    return {"kind": "visit", "round": plan.round, "visit": plan.visit, "site": plan.site, "time": now(),
            **result.model_dump(exclude={"site", "round", "visit"})}


def eval_record(rnd: int, site: str, model: str, split: str, result: dict) -> dict:
    """One evaluation line; absent AUCs (one-valued classes) are ``null``."""
    return {"kind": "eval", "round": rnd, "site": site, "model": model, "split": split, "time": now(), **json_safe(result)}


def evaluate_at_site(models: Mapping[str, ArkModel], head: SiteHead, site: Site, settings, split: str) -> dict[str, dict]:
    """One site's evaluation of each named model with its head (empty without that split); the
    federated ClientApp calls this at the site, so both modes score identically."""
    table = site.splits.get(split)
    if table is None or len(table) == 0:
        return {}
    calibration = site.splits.get("train")
    return {label: evaluate_site(model, head, table, site.schema, settings, calibration=calibration) for label, model in models.items()}


def evaluate_round(state: RunState, sites: Mapping[str, Site], config: TrainConfig, rnd: int) -> list[dict]:
    """Student and teacher on every site's evaluation split, with that site's head (BatchNorm
    statistics re-estimated on the site's own training images, see
    :func:`arkfed.metrics.recalibrate_batchnorm`)."""
    records = []
    for name, site in sites.items():
        models = {"student": state.student, "teacher": state.teacher}
        for label, result in evaluate_at_site(models, state.heads[name], site, config.settings, config.eval_split).items():
            records.append(eval_record(rnd, name, label, config.eval_split, result))
    return records


def round_record(rnd: int, seconds: float) -> dict:
    """Marks round ``rnd``'s evaluation as complete (what resume trusts)."""
    return {"kind": "round", "round": rnd, "time": now(), "seconds": seconds}


def trim_metrics(records: list[dict], visits_done: int) -> tuple[list[dict], set[int]]:
    """Keep what the checkpoint covers: visits before it and rounds whose evaluation completed
    (marked by a ``"kind": "round"`` line); returns the kept records and those rounds."""
    complete = {r["round"] for r in records if r.get("kind") == "round"}
    kept = [
        r for r in records
        if (r.get("kind") == "visit" and r["visit"] < visits_done) or (r.get("kind") in ("eval", "round") and r["round"] in complete)
    ]
    return kept, complete


def build_summary(config: TrainConfig, records: list[dict], seconds: float) -> dict:
    """Final (last evaluated round) metrics per site, plus the run's size and time."""
    evals = [r for r in records if r.get("kind") == "eval"]
    last = max((r["round"] for r in evals), default=None)
    sites: dict[str, dict] = {name: {} for name in config.sites}
    for r in evals:
        if r["round"] == last:
            sites[r["site"]][r["model"]] = {k: r[k] for k in ("loss", "mean_auc", "auc", "num_examples", "accuracy") if k in r}
    return {"rounds": config.rounds, "visits": config.total_visits, "evaluated_round": last,
            "split": config.eval_split, "seconds": seconds, "sites": sites}


def finish_run(run: RunFolder, state: RunState, config: TrainConfig, seconds: float) -> dict:
    run.save_weights(state)
    summary = build_summary(config, run.read_metrics(), seconds)
    for name, entry in summary["sites"].items():
        entry["task"] = state.heads[name].schema.task
    run.write_summary(summary)
    return summary


def open_run(run: RunFolder, config: TrainConfig, schemas: Mapping[str, object], resume: bool) -> tuple[RunState, set[int]]:
    """The state to start from and the rounds already evaluated: a fresh run writes its config;
    a resumed one continues from its checkpoint with metrics trimmed back to it (a run killed
    before its first checkpoint starts over)."""
    if resume:
        if not run.has_run():
            raise ArkfedError(f"{run.path}: nothing to resume (no config.yaml)")
        if run.has_checkpoint():
            state = run.load_checkpoint()
            records, evaluated = trim_metrics(run.read_metrics(), state.visits_done)
            run.rewrite_metrics(records)
            return state, evaluated
        run.rewrite_metrics([])
        return initial_state(config, schemas), set()
    if run.has_run():
        raise ArkfedError(f"{run.path} already holds a run; pass --resume {run.path} or choose another --out")
    run.write_config(config)
    return initial_state(config, schemas), set()


def train_local(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    sites: Mapping[str, Site] | None = None,
    progress=None,
    on_visit: VisitHook | None = None,
) -> dict:
    """Run (or resume) a local Ark training into ``out``; returns the summary.

    ``on_visit`` is called after each visit's checkpoint is on disk (an exception raised there
    interrupts the run exactly as a kill would).
    """
    from arkfed.progress import QuietProgress

    run = RunFolder(out)
    progress = progress or QuietProgress()
    sites = dict(sites) if sites is not None else load_sites(config)
    state, evaluated = open_run(run, config, {name: site.schema for name, site in sites.items()}, resume)
    plans = plan_visits(config)
    start = time.perf_counter()
    progress.start(len(plans), state.visits_done)
    try:
        for rnd in range(config.rounds):
            for plan in (p for p in plans if p.round == rnd and p.visit >= state.visits_done):
                progress.visit_started(plan)
                result = train_site_visit(
                    state.student, state.teacher, state.heads[plan.site], sites[plan.site], config.settings, plan,
                    progress=progress.step,
                )
                after_visit(state, plan, config)
                run.append_metrics(visit_record(plan, result))  # before the checkpoint: resume trims it if the checkpoint is lost
                run.save_checkpoint(state)
                progress.visit_finished(plan, result)
                if on_visit is not None:
                    on_visit(plan, result)
            if rnd not in evaluated:
                records = evaluate_round(state, sites, config, rnd)
                for record in records:
                    run.append_metrics(record)
                run.save_weights(state)
                run.append_metrics(round_record(rnd, time.perf_counter() - start))
                progress.round_evaluated(rnd, config.rounds, records)
    finally:
        progress.close()
    return finish_run(run, state, config, time.perf_counter() - start)

