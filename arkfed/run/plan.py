"""The visit plan: which site is visited when, with which lr, consistency weight, momentum and seed.

Plain arithmetic over a :class:`~arkfed.config.TrainConfig`, so the local loop and the Flower
ServerApp plan a run identically (the schedules are :mod:`arkfed.schedules`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from arkfed.config import OrderMode, TrainConfig, VisitPlan, derive_seed
from arkfed.schedules import schedule_values, visit_lrs


def visit_order(sites: Sequence[str], rounds: int, order: OrderMode, seed: int,
                admitted: Mapping[str, int] | None = None) -> list[list[str]]:
    """The sites visited in each round: the given order, or a seeded shuffle per round. A site
    ``admitted`` from round R is left out of earlier rounds (their order is as before it came)."""
    rng = np.random.default_rng(derive_seed(seed, "order"))
    rounds_order = []
    for rnd in range(rounds):
        names = [s for s in sites if (admitted or {}).get(s, 0) <= rnd]
        if order == "shuffle":
            names = [names[i] for i in rng.permutation(len(names))]
        rounds_order.append(names)
    return rounds_order


def plan_visits(config: TrainConfig) -> list[VisitPlan]:
    """Every visit of a run, with its schedule values; identical in local and federated mode."""
    total = config.total_visits
    settings = config.settings
    lrs = visit_lrs(settings, total, len(config.round_sites(0)))
    plans = []
    for rnd, names in enumerate(visit_order(config.sites, config.rounds, config.order, config.seed, config.admitted)):
        for name in names:
            v = len(plans)
            c, momentum = schedule_values(settings, config.schedule_offset + v, config.schedule_offset + total)
            plans.append(VisitPlan(
                round=rnd, visit=v, total_visits=total, site=name, consistency=c, momentum=momentum,
                lr=lrs[v], seed=derive_seed(config.seed, "visit", v), schedule_offset=config.schedule_offset, rounds=config.rounds,
            ))
    return plans


def plan_groups(config: TrainConfig) -> list[list[VisitPlan]]:
    """The run as groups of visits that start from the same student and end in one teacher
    update: one visit per group in cyclic mode (Ark), every site of a round in parallel mode.

    Parallel mode (the federated variant of Ark+) indexes its schedules by round: all sites of a
    round share the round's lr, consistency weight and teacher momentum. Visit indices still count
    site visits (round * sites + position), so checkpoints, metrics and resume work alike.

    A run continued from a release (``schedule_offset`` > 0) places its steps after the release's:
    the teacher momentum and c continue from where the release stopped, along cosines stretched
    over the whole lineage.
    """
    if config.mode == "cyclic":
        return [[plan] for plan in plan_visits(config)]
    rounds, settings, total = config.rounds, config.settings, config.total_visits
    lrs = visit_lrs(settings, rounds)
    groups, first = [], 0
    for rnd, names in enumerate(visit_order(config.sites, rounds, config.order, config.seed, config.admitted)):
        c, momentum = schedule_values(settings, config.schedule_offset + rnd, config.schedule_offset + rounds)
        groups.append([
            VisitPlan(
                round=rnd, visit=first + i, total_visits=total, site=name, consistency=c, momentum=momentum,
                lr=lrs[rnd], seed=derive_seed(config.seed, "visit", first + i), schedule_offset=config.schedule_offset, rounds=rounds,
            )
            for i, name in enumerate(names)
        ])
        first += len(names)
    return groups


def round_of_visit(config: TrainConfig, visit: int) -> int:
    """The round of visit index ``visit`` (-1 before the first), rounds having their own site counts
    when sites were admitted during the run."""
    done = 0
    for rnd in range(config.rounds):
        done += len(config.round_sites(rnd))
        if visit < done:
            return rnd if visit >= 0 else -1
    return config.rounds - 1
