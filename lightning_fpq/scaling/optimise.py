"""One-dimensional minimisation for the planners, elementwise over numpy arrays (no scipy):
a coarse grid finds the basin, a bracketed golden-section search refines it."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["golden_section", "minimise"]

_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


def golden_section(
    f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, iters: int = 64
) -> np.ndarray:
    """Elementwise golden-section search for the minimum of a unimodal f on [lo, hi].

    ``lo`` and ``hi`` have a trailing axis of length 1; both probes go to f in one call,
    stacked along that axis. 64 iterations shrink the bracket by 0.618^64 ~ 4e-14: below
    what the log-space brackets used here need.
    """
    lo, hi = np.array(lo, dtype=float), np.array(hi, dtype=float)
    for _ in range(iters):
        x1 = hi - _INVPHI * (hi - lo)
        x2 = lo + _INVPHI * (hi - lo)
        both = f(np.concatenate([x1, x2], axis=-1))
        left = both[..., :1] <= both[..., 1:]  # the minimum lies in [lo, x2]
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
    return 0.5 * (lo + hi)


def minimise(
    f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, grid: int = 24, iters: int = 64
) -> np.ndarray:
    """Minimise f elementwise on [lo, hi]: a grid finds the basin, golden-section refines it.

    ``lo`` and ``hi`` have a trailing axis of length 1; the grid is laid along that axis, so
    f must be elementwise and broadcast against it. Returns the minimiser, shaped like lo.
    The grid makes the search robust to a function that is unimodal only near its minimum.
    """
    t = np.linspace(0.0, 1.0, grid)
    xs = lo + (hi - lo) * t  # (..., grid)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        vals = f(xs)
    vals = np.where(np.isfinite(vals), vals, np.inf)
    i = np.argmin(vals, axis=-1)[..., None]
    step = (hi - lo) / (grid - 1)
    best = np.take_along_axis(xs, i, axis=-1)
    return golden_section(f, np.maximum(best - step, lo), np.minimum(best + step, hi), iters)
