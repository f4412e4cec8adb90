"""The visit plan: which site is visited when, with which lr, consistency weight, momentum and seed.

Plain arithmetic over a :class:`~arkfed.config.TrainConfig`, so the local loop and the Flower
ServerApp plan a run identically (the schedules are :mod:`arkfed.schedules`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from arkfed.config import OrderMode, TrainConfig, VisitPlan, derive_seed
from arkfed.schedules import schedule_values, visit_lrs


def visit_order(sites: Sequence[str], rounds: int, order: OrderMode, seed: int) -> list[list[str]]:
    """The sites visited in each round: the given order, or a seeded shuffle per round."""
    rng = np.random.default_rng(derive_seed(seed, "order"))
    rounds_order = []
    for _ in range(rounds):
        names = list(sites)
        if order == "shuffle":
            names = [names[i] for i in rng.permutation(len(names))]
        rounds_order.append(names)
    return rounds_order


def plan_visits(config: TrainConfig) -> list[VisitPlan]:
    """Every visit of a run, with its schedule values; identical in local and federated mode."""
    total = config.total_visits
    settings = config.settings
    lrs = visit_lrs(settings, total, len(config.sites))
    plans = []
    for rnd, names in enumerate(visit_order(config.sites, config.rounds, config.order, config.seed)):
        for name in names:
            v = len(plans)
            c, momentum = schedule_values(settings, v, total)
            plans.append(VisitPlan(
                round=rnd, visit=v, total_visits=total, site=name, consistency=c, momentum=momentum,
                lr=lrs[v], seed=derive_seed(config.seed, "visit", v), rounds=config.rounds,
            ))
    return plans


def plan_groups(config: TrainConfig) -> list[list[VisitPlan]]:
    """The run as groups of visits that start from the same student and end in one teacher
    update: one visit per group in cyclic mode (Ark), every site of a round in parallel mode.

    Parallel mode (the federated variant of Ark+) indexes its schedules by round: all sites of a
    round share the round's lr, consistency weight and teacher momentum. Visit indices still count
    site visits (round * sites + position), so checkpoints, metrics and resume work alike.
    """
    if config.mode == "cyclic":
        return [[plan] for plan in plan_visits(config)]
    rounds, n, settings = config.rounds, len(config.sites), config.settings
    lrs = visit_lrs(settings, rounds)
    groups = []
    for rnd, names in enumerate(visit_order(config.sites, rounds, config.order, config.seed)):
        c, momentum = schedule_values(settings, rnd, rounds)
        groups.append([
            VisitPlan(
                round=rnd, visit=rnd * n + i, total_visits=rounds * n, site=name, consistency=c, momentum=momentum,
                lr=lrs[rnd], seed=derive_seed(config.seed, "visit", rnd * n + i), rounds=rounds,
            )
            for i, name in enumerate(names)
        ])
    return groups
