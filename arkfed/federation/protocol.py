"""The federated protocol's plain parts: its settings record, parallel-mode plans and averaging.

Cyclic mode (Ark) uses :func:`arkfed.training.plan_visits` unchanged: one visit per site per
round, the teacher EMA after each visit. Parallel mode (the federated variant of Ark+) trains every
site from the same student at once; the coordinator averages the returned students weighted by
their sample counts and then updates the teacher once. Its schedules are therefore indexed by
round: all sites of a round share the round's lr, consistency weight and teacher momentum.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from arkfed.errors import ArkfedError
from arkfed.schedules import consistency_weight, teacher_momentum
from arkfed.training import TrainConfig, VisitPlan, derive_seed, visit_lrs, visit_order

if TYPE_CHECKING:
    import torch

FederationMode = Literal["cyclic", "parallel"]
FEDERATION_FILE = "federation.json"


class FederationSettings(BaseModel):
    """How the coordinator runs the federation (``RUN/federation.json``, next to config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    mode: FederationMode = "cyclic"
    run_uid: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    join_timeout: float = Field(default=600.0, gt=0, description="seconds to wait for the listed sites to join")
    visit_timeout: float = Field(default=3600.0, gt=0, description="seconds one visit (or evaluation) may take")
    rejoin_wait: float = Field(default=30.0, ge=0, description="seconds a retry waits for a vanished site to come back")
    schemas: dict[str, dict] = Field(default_factory=dict, description="the run's record: each site's label schema")
    max_update_norm: float | None = Field(default=None, gt=0, description="reject a returned student farther than this from the one sent")

    def write(self, run_dir: Path) -> None:
        from arkfed.io import atomic_write

        text = self.model_dump_json(indent=2)
        atomic_write(Path(run_dir) / FEDERATION_FILE, lambda tmp: tmp.write_text(text))

    @classmethod
    def read(cls, run_dir: Path) -> "FederationSettings":
        path = Path(run_dir) / FEDERATION_FILE
        if not path.is_file():
            raise ArkfedError(f"{run_dir}: not a federated run folder (no {FEDERATION_FILE})")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except Exception as exc:
            raise ArkfedError(f"{path}: invalid federation settings: {exc}") from None


def parallel_plans(config: TrainConfig) -> list[list[VisitPlan]]:
    """Per round, one plan per site; schedule values indexed by round (one teacher update per round).

    Visit indices still count site visits (round * sites + position), so checkpoints, metrics
    lines and resume work as in cyclic mode; seeds differ per site and round.
    """
    rounds, n = config.rounds, len(config.sites)
    settings = config.settings
    lrs = visit_lrs(settings, rounds)
    plans = []
    for rnd, names in enumerate(visit_order(config.sites, rounds, config.order, config.seed)):
        plans.append([
            VisitPlan(
                round=rnd, visit=rnd * n + i, total_visits=rounds * n, site=name,
                consistency=consistency_weight(rnd, rounds, settings.max_consistency),
                momentum=teacher_momentum(rnd, rounds, settings.momentum_teacher),
                lr=lrs[rnd], seed=derive_seed(config.seed, "visit", rnd * n + i),
            )
            for i, name in enumerate(names)
        ])
    return plans


def weighted_average(states: Sequence[Mapping[str, "torch.Tensor"]], weights: Sequence[float]) -> dict[str, "torch.Tensor"]:
    """FedAvg of state dicts: floating tensors weighted by ``weights`` (sample counts); integer
    buffers (BatchNorm's ``num_batches_tracked``) take the largest value."""
    import torch

    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state, and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    out = {}
    for key, first in states[0].items():
        if first.dtype.is_floating_point:
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, weight in zip(states, weights):
                acc += state[key].to(torch.float64) * (weight / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).max(dim=0).values
    return out
