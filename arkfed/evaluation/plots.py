"""What every arkfed figure shares: 95% intervals drawn as intervals, and figures that cannot cost the numbers.

A percentile-bootstrap interval need not contain its point estimate, so an error bar computed as
``estimate - lower`` can be negative (matplotlib refuses it). :func:`draw_intervals` draws the
interval itself, from its lower to its upper end, whatever the estimate; missing ends (None,
NaN) leave that interval out. :func:`try_figure` draws a figure after the results are written:
when drawing still fails, one warning line replaces the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np


def as_floats(values: Iterable) -> np.ndarray:
    """Numbers as a float array, None as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def interval_bounds(intervals: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ends of ``[low, high]`` pairs; a missing pair or end is NaN, a reversed pair is put in order."""
    pairs = [c if c is not None and len(c) == 2 else (None, None) for c in intervals]
    low, high = as_floats(c[0] for c in pairs), as_floats(c[1] for c in pairs)
    return np.minimum(low, high), np.maximum(low, high)


def draw_intervals(ax, positions, lower, upper, horizontal: bool = False, **style):
    """The intervals ``[lower, upper]`` at ``positions`` as capped segments (vertical, or horizontal
    for a barh chart); intervals with a missing end are left out. Returns the container, or None."""
    pos, low, high = as_floats(positions), as_floats(lower), as_floats(upper)
    low, high = np.minimum(low, high), np.maximum(low, high)
    ok = np.isfinite(pos) & np.isfinite(low) & np.isfinite(high)
    if not ok.any():
        return None
    middle, half = (low[ok] + high[ok]) / 2, (high[ok] - low[ok]) / 2  # errorbar around the middle: exactly [low, high]
    style = {"fmt": "none", "ecolor": "black", "elinewidth": 0.8, "capsize": 2, **style}
    if horizontal:
        return ax.errorbar(middle, pos[ok], xerr=half, **style)
    return ax.errorbar(pos[ok], middle, yerr=half, **style)


def try_figure(draw: Callable[[], Path], name: str) -> Path | None:
    """``draw()`` the figure ``name``; if that fails, warn in one line on stderr and return None
    (callers write their results before, so a figure can never lose the numbers)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    before = set(pyplot.get_fignums()) if pyplot else set()
    try:
        return draw()
    except Exception as exc:  # any failure of a figure: the results are already on disk
        message = " ".join(str(exc).split()) or "no message"
        print(f"warning: figure {name} not drawn ({type(exc).__name__}: {message}); the results are kept", file=sys.stderr)
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot:  # close what the failed figure left open
            for number in set(pyplot.get_fignums()) - before:
                pyplot.close(number)
        return None
