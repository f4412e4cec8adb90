"""What a site does when the loop asks: one visit, or one evaluation of student and teacher.

These two functions are the only site-side work there is. In-process sites
(:class:`arkfed.run.local.InProcessSites`) call them directly; the Flower ClientApp calls them on the
weights it received. So a site trains and scores identically in local and federated runs.

Both take the site's :class:`arkfed.ark.pair.ArkPair`: the student and the teacher with the site's
two heads (the student's, and the teacher's, its EMA, caught up here with the EMA steps the site
missed since its last visit, see :mod:`arkfed.ark.pair`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from arkfed.ark.updates import check_finite
from arkfed.errors import (
    ArkfedError,
    NonFiniteError,  # a site sends its category (issue 8), never the values
)

if TYPE_CHECKING:
    from arkfed.ark.pair import ArkPair
    from arkfed.ark.visit import OptimizerState, VisitProgress, VisitResult
    from arkfed.config import TrainSettings, VisitPlan
    from arkfed.site.config import ComputeSettings
    from arkfed.site.load import Site


def train_visit(pair: "ArkPair", site: "Site", settings: "TrainSettings", plan: "VisitPlan",
                compute: "ComputeSettings | None" = None, progress: "VisitProgress | None" = None,
                optimizer_state: "OptimizerState | None" = None) -> "VisitResult":
    """One visit's training on the site's hardware: ``compute.gpus`` > 1 runs it in that many DDP
    processes (:func:`arkfed.ark.ddp.run_visit_on_gpus`), otherwise in this process
    (:func:`arkfed.ark.visit.train_site_visit`). The one place where that is decided. A carried
    ``optimizer_state`` (see :mod:`arkfed.ark.visit`) needs one process."""
    compute = compute or site.config.compute
    if compute.gpus > 1:
        if optimizer_state is not None:
            raise ArkfedError("optimizer_state 'carry' trains each visit on one GPU; set compute.gpus to 1", site=site.name)
        from arkfed.ark.ddp import run_visit_on_gpus

        return run_visit_on_gpus(pair, site, settings, plan, compute, progress)
    from arkfed.ark.visit import train_site_visit

    return train_site_visit(pair, site, settings, plan, compute, progress, optimizer_state=optimizer_state)


def visit_site(
    pair: "ArkPair",
    site: "Site",
    settings: "TrainSettings",
    plan: "VisitPlan",
    pending: float = 1.0,
    compute: "ComputeSettings | None" = None,
    progress: "VisitProgress | None" = None,
    optimizer_state: "OptimizerState | None" = None,
) -> "VisitResult":
    """One visit at a site: catch the teacher head up, train student + head
    (:func:`train_visit`; ``optimizer_state``: the carried state, updated in place), then the
    teacher head's EMA step for this visit."""
    pair.catch_up(pending)
    result = train_visit(pair, site, settings, plan, compute, progress, optimizer_state)
    if settings.ema == "visit":
        pair.head_ema_step(plan.momentum)
    check_finite(pair.student, "student", site.name)
    check_finite(pair.head, "student head", site.name)
    if not math.isfinite(result.loss):
        raise NonFiniteError(f"visit {plan.visit} ended with loss {result.loss}", site=site.name, category="non_finite_loss")
    return result


def evaluate_site_models(
    pair: "ArkPair",
    site: "Site",
    settings: "TrainSettings",
    split: str,
    pending: float = 1.0,
    compute: "ComputeSettings | None" = None,
) -> dict[str, dict]:
    """Student (with its head) and teacher (with the teacher's head, caught up to now) on one split;
    empty when the site has no such split. BatchNorm statistics are re-estimated on the site's
    training images (:func:`arkfed.ark.metrics.recalibrate_batchnorm`)."""
    from arkfed.ark.metrics import evaluate_site

    table = site.splits.get(split)
    if table is None or len(table) == 0:
        return {}
    now = pair.caught_up(pending)
    calibration = site.splits.get("train")
    pairs = {"student": (now.student, now.head), "teacher": (now.teacher, now.teacher_head)}
    return {
        label: evaluate_site(model, head, table, site.schema, settings, calibration=calibration, compute=compute or site.config.compute)
        for label, (model, head) in pairs.items()
    }
