"""What a site does when the loop asks: one visit, or one evaluation of student and teacher.

These two functions are the only site-side work there is. In-process sites
(:class:`arkfed.run.local.InProcessSites`) call them directly; the Flower ClientApp calls them on the
weights it received. So a site trains and scores identically in local and federated runs.

A site holds two heads per run: the student's head (trained in its visits) and the teacher's
head, an EMA of it. In Ark the teacher's heads are EMA'd with the rest of the teacher after every
dataset visit, including the heads of sites that were not visited (reference ``trainer.py``). A
site only hears of its own visits, so the updates it missed are applied when it is next asked:
between two of its visits its student head does not change, and ``k`` EMA steps with momenta
``m_1..m_k`` towards a constant target equal one step with momentum ``m_1 * ... * m_k`` (the
coordinator sends that product as ``pending``). The result equals Ark's per-visit EMA of every head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arkfed.ark.updates import NonFiniteError, check_finite  # a site sends its category (issue 8), never the values
from arkfed.errors import ArkfedError
from arkfed.schedules import ema_update

if TYPE_CHECKING:
    from arkfed.ark.visit import VisitProgress, VisitResult
    from arkfed.config import TrainSettings, VisitPlan
    from arkfed.model.ark import ArkModel, SiteHead
    from arkfed.site.config import ComputeSettings
    from arkfed.site.load import Site


@dataclass
class SiteHeads:
    """A site's two heads in one run: the student's and the teacher's (its EMA)."""

    student: "SiteHead"
    teacher: "SiteHead"

    @classmethod
    def fresh(cls, head: "SiteHead") -> "SiteHeads":
        """A new run's heads: the teacher's starts as a copy of the student's, as the teacher does."""
        teacher = copy.deepcopy(head)
        teacher.requires_grad_(False)
        return cls(head, teacher)

    def clone(self) -> "SiteHeads":
        return SiteHeads(copy.deepcopy(self.student), copy.deepcopy(self.teacher))


def catch_up(heads: SiteHeads, pending: float) -> None:
    """Apply the teacher-head EMA steps this site missed (``pending``: the product of their momenta)."""
    if not 0.0 <= pending <= 1.0:
        raise ArkfedError(f"pending teacher momentum must be in [0, 1], got {pending}")
    if pending < 1.0:
        ema_update(heads.teacher, heads.student, pending)


def train_visit(student: "ArkModel", teacher: "ArkModel", head: "SiteHead", site: "Site", settings: "TrainSettings",
                plan: "VisitPlan", compute: "ComputeSettings | None" = None, progress: "VisitProgress | None" = None,
                teacher_head: "SiteHead | None" = None) -> "VisitResult":
    """One visit's training on the site's hardware: ``compute.gpus`` > 1 runs it in that many DDP
    processes (:func:`arkfed.ark.ddp.run_visit_on_gpus`), otherwise in this process
    (:func:`arkfed.ark.visit.train_site_visit`). The one place where that is decided."""
    compute = compute or site.config.compute
    if compute.gpus > 1:
        from arkfed.ark.ddp import run_visit_on_gpus

        return run_visit_on_gpus(student, teacher, head, site, settings, plan, compute, progress, teacher_head)
    from arkfed.ark.visit import train_site_visit

    return train_site_visit(student, teacher, head, site, settings, plan, compute, progress, teacher_head)


def visit_site(
    student: "ArkModel",
    teacher: "ArkModel",
    heads: SiteHeads,
    site: "Site",
    settings: "TrainSettings",
    plan: "VisitPlan",
    pending: float = 1.0,
    compute: "ComputeSettings | None" = None,
    progress: "VisitProgress | None" = None,
) -> "VisitResult":
    """One visit at a site: catch the teacher head up, train student + head
    (:func:`train_visit`), then the teacher head's EMA step for this visit."""
    catch_up(heads, pending)
    result = train_visit(student, teacher, heads.student, site, settings, plan, compute, progress, heads.teacher)
    if settings.ema == "visit":
        ema_update(heads.teacher, heads.student, plan.momentum)
    check_finite(student, "student", site.name)
    check_finite(heads.student, "student head", site.name)
    if not math.isfinite(result.loss):
        raise NonFiniteError(f"visit {plan.visit} ended with loss {result.loss}", site=site.name, category="non_finite_loss")
    return result


def evaluate_site_models(
    student: "ArkModel",
    teacher: "ArkModel",
    heads: SiteHeads,
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
    teacher_head = copy.deepcopy(heads.teacher)
    if pending < 1.0:
        ema_update(teacher_head, heads.student, pending)
    calibration = site.splits.get("train")
    pairs = {"student": (student, heads.student), "teacher": (teacher, teacher_head)}
    return {
        label: evaluate_site(model, head, table, site.schema, settings, calibration=calibration, compute=compute or site.config.compute)
        for label, (model, head) in pairs.items()
    }
