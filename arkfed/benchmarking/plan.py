"""The accrual benchmark's plan vocabulary: which arms, orderings and subsets a run trains and
how their records are keyed. The runner (:mod:`.accrual`) and the tables (:mod:`.report`) both
import it, so neither imports the other."""

from __future__ import annotations

from typing import Sequence

OWN_METRICS = ("teacher", "student", "finetune")


def orderings(sources: Sequence[str], count: int) -> list[tuple[str, ...]]:
    """``count`` rotations of the source list (each site comes first once, up to N-1 of them)."""
    n = len(sources)
    return [tuple(sources[i:]) + tuple(sources[:i]) for i in range(min(max(count, 1), n))]


def curve_subsets(sources: Sequence[str], count: int) -> dict[int, list[tuple[str, ...]]]:
    """k -> the distinct federations (in the first ordering's visiting order) on the curve."""
    out: dict[int, list[tuple[str, ...]]] = {}
    for k in range(1, len(sources) + 1):
        seen: dict[frozenset, tuple[str, ...]] = {}
        for order in orderings(sources, count):
            seen.setdefault(frozenset(order[:k]), order[:k])
        if k == 1:  # every single site is a point at k = 1, whatever the orderings
            seen = {frozenset([s]): (s,) for s in sources}
        out[k] = list(seen.values())
    return out


def run_key(arm: str, names: Sequence[str], seed: int) -> str:
    return f"{arm}:{'+'.join(names)}:s{seed}"
