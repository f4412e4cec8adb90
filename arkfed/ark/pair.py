"""Ark's teacher-student pair at one site: the student and the teacher and the site's two heads in
one object, with the teacher's EMA steps as its methods (as dinov2's ``SSLMetaArch`` holds both
networks). A visit (:mod:`arkfed.ark.visit`, :mod:`arkfed.ark.tasks`, :mod:`arkfed.ark.ddp`)
trains the student and its head; the teacher and its head move only by these EMA steps.

A site holds two heads per run: the student's head (trained in its visits) and the teacher's
head, an EMA of it. In Ark the teacher's heads are EMA'd with the rest of the teacher after every
dataset visit, including the heads of sites that were not visited (reference ``trainer.py``). A
site only hears of its own visits, so the updates it missed are applied when it is next asked:
between two of its visits its student head does not change, and ``k`` EMA steps with momenta
``m_1..m_k`` towards a constant target equal one step with momentum ``m_1 * ... * m_k`` (the
coordinator sends that product as ``pending``). The result equals Ark's per-visit EMA of every head.

With ``ema: iteration`` Ark's teacher, heads included, takes one EMA step after every iteration
(``ema_update_teacher`` in trainer.py walks all of ``model.parameters()``, every dataset's head among
them), so a visit is one missed step per iteration for the other sites' heads: the visit reports the
product of its per-step momenta (``VisitResult.momentum_product``), the coordinator's
:class:`~arkfed.config.TeacherClock` records that product for the visit, and ``pending`` is the
product over every missed step. (In Ark's code the per-iteration schedule index restarts at
``epoch * datasets + dataset`` in every dataset-epoch, because ``it`` is a local variable of
``train_one_epoch``, so only the start of the schedule is used; arkfed follows the intended
schedule, the momentum at fractional visit positions. Ark's published runs used the per-epoch EMA.)

The teacher's own EMA step after a visit (``ema: visit``) is the coordinator's: it is taken
after the returned students are checked (and, in parallel mode, averaged), on the run's state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from arkfed.errors import ArkfedError
from arkfed.schedules import ema_update

if TYPE_CHECKING:
    from arkfed.model.ark import ArkModel, SiteHead
    from arkfed.site.load import Site


@dataclass
class SiteHeads:
    """A site's two heads in one run: the student's and the teacher's (its EMA)."""

    student: SiteHead
    teacher: SiteHead

    @classmethod
    def fresh(cls, head: SiteHead) -> SiteHeads:
        """A new run's heads: the teacher's starts as a copy of the student's, as the teacher does."""
        teacher = copy.deepcopy(head)
        teacher.requires_grad_(False)
        return cls(head, teacher)

    def clone(self) -> SiteHeads:
        return SiteHeads(copy.deepcopy(self.student), copy.deepcopy(self.teacher))

    def catch_up(self, pending: float) -> None:
        """Apply the teacher-head EMA steps this site missed (``pending``: the product of their momenta)."""
        if not 0.0 <= pending <= 1.0:
            raise ArkfedError(f"pending teacher momentum must be in [0, 1], got {pending}")
        if pending < 1.0:
            ema_update(self.teacher, self.student, pending)

    def caught_up(self, pending: float) -> SiteHeads:
        """The student's head with a copy of the teacher's, caught up by ``pending``; these heads stay as they are."""
        heads = SiteHeads(self.student, copy.deepcopy(self.teacher))
        heads.catch_up(pending)
        return heads


PARTS = ("student", "teacher", "head", "teacher_head")


@dataclass
class ArkPair:
    """The student and teacher :class:`~arkfed.model.ark.ArkModel` with one site's :class:`SiteHeads`."""

    student: ArkModel
    teacher: ArkModel
    heads: SiteHeads

    @property
    def head(self) -> SiteHead:
        """The student's head (trained with the student)."""
        return self.heads.student

    @property
    def teacher_head(self) -> SiteHead:
        """The teacher's head (an EMA of the student's)."""
        return self.heads.teacher

    def check_head(self, site: Site) -> None:
        """Refuse a head that does not fit the site's classes or the model's embedding."""
        head = self.head
        if head.out_features != site.schema.num_classes or head.in_features != self.student.embed_dim:
            raise ArkfedError(
                f"head has {head.in_features}->{head.out_features} units, but the schema has {site.schema.num_classes} "
                f"classes and the model embeds to {self.student.embed_dim}", site=site.name,
            )

    def to_train(self, device: torch.device, memory_format: torch.memory_format) -> None:
        """On ``device``: student and head in train mode; teacher and its head in eval mode, the teacher without gradients."""
        self.student.to(device, memory_format=memory_format).train()
        self.teacher.to(device, memory_format=memory_format).eval()
        self.teacher.requires_grad_(False)
        self.head.to(device).train()
        self.teacher_head.to(device).eval()

    def ema_step(self, momentum: float) -> None:
        """One EMA step of the teacher, then of its head, towards the student and its head
        (``ema: iteration``: after every training step)."""
        ema_update(self.teacher, self.student, momentum)
        ema_update(self.teacher_head, self.head, momentum)

    def head_ema_step(self, momentum: float) -> None:
        """The teacher head's EMA step after a visit (``ema: visit``; the teacher's own is the coordinator's)."""
        ema_update(self.teacher_head, self.head, momentum)

    def catch_up(self, pending: float) -> None:
        """The teacher-head EMA steps this site missed since its last visit (:meth:`SiteHeads.catch_up`)."""
        self.heads.catch_up(pending)

    def caught_up(self, pending: float) -> ArkPair:
        """The same networks with a caught-up copy of the teacher's head (to evaluate the teacher as of now)."""
        return ArkPair(self.student, self.teacher, self.heads.caught_up(pending))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The four modules' weights, detached on the CPU, keyed ``student``, ``teacher``, ``head``, ``teacher_head``
        (SyncBatchNorm's keys are BatchNorm's, so a DDP rank's state loads into the caller's pair)."""
        return {part: {k: v.detach().cpu() for k, v in getattr(self, part).state_dict().items()} for part in PARTS}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load :meth:`state_dict`'s weights into these modules, in place."""
        for part in PARTS:
            getattr(self, part).load_state_dict(state[part])
