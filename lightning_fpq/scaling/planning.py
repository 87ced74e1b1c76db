"""Compute-optimal precision: the planners shared by the precision-aware laws (Capybara, Kumar).

Under the compute model C = k P N D (k = :data:`~lightning_fpq.scaling.law.COMPUTE_FACTOR`),
:meth:`PrecisionLaw.optimal_precision` minimises a law's loss over the free variables and
:meth:`PrecisionLaw.plan_format` evaluates one format at a budget. A law plugs in through
the hooks below (its loss as a function of a precision factor, the factor of a format and of
a real-valued bit width, the widest precision it knows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from lightning_fpq.formats import FormatLike, FPFormat

from .inputs import MIN_BITS, positive_array
from .law import COMPUTE_FACTOR, DEFAULT_BLOCK_SIZE, Law
from .optimise import minimise

__all__ = ["REGIMES", "PrecisionLaw", "PrecisionPlan"]

REGIMES = ("joint", "fixed_N", "fixed_D")


@dataclass(frozen=True)
class PrecisionPlan:
    """The answer of ``optimal_precision``. Scalars for a scalar compute, arrays for an array.

    ``bits``, ``params``, ``tokens``, ``loss``: the optimum with precision treated as a real
    number (the paper's analysis; for the Capybara law each precision uses its real-valued
    best E/M split). ``format`` (an :class:`FPFormat`, or an object array of them) and
    ``format_params``, ``format_tokens``, ``format_loss``: the best *integer* bit width, with
    its best integer E/M split, re-optimised: what one would actually run.
    In the fixed-N and fixed-D regimes, ``params`` / ``tokens`` echo the fixed value.
    """

    regime: str  # "joint" (N, D, P free), "fixed_N" or "fixed_D"
    compute: Any  # FLOPs
    block_size: Union[int, str]
    bits: Any
    params: Any
    tokens: Any
    loss: Any
    format: Any
    format_params: Any
    format_tokens: Any
    format_loss: Any


def _regime(compute, N, D) -> tuple[str, Optional[float], np.ndarray]:
    """Which regime the arguments ask for, the fixed value if any, and compute as a (K, 1) array."""
    if N is not None and D is not None:
        raise ValueError(
            "give at most one of N and D: with compute, N and D fixed the precision is C/(k N D), nothing to optimise"
        )
    C = positive_array("compute", compute).reshape(-1)[:, None]  # (K, 1): the trailing axis carries grids
    if N is not None:
        return "fixed_N", float(positive_array("N", N)), C
    if D is not None:
        return "fixed_D", float(positive_array("D", D)), C
    return "joint", None, C


def _shaped(x, compute):
    x = np.asarray(x, dtype=float)
    return float(x.reshape(-1)[0]) if np.ndim(compute) == 0 else x.reshape(np.shape(compute))


class PrecisionLaw(Law):
    """A law with a precision term: the planners, over the hooks a subclass provides."""

    # ------------------------------------------------------------------ hooks
    def _log2b(self, block_size: Union[int, str], shared_elements: Optional[float] = None) -> float:
        """log2(B) as this law uses it (validates the block size and ``shared_elements``)."""
        raise NotImplementedError

    def _format_factor(self, fmt: Optional[FPFormat]) -> float:
        """The precision factor of a format (``None``: unquantized)."""
        raise NotImplementedError

    def _relaxed_factor(self, bits: np.ndarray) -> np.ndarray:
        """The precision factor of a real-valued bit width (its best real-valued split)."""
        raise NotImplementedError

    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        raise NotImplementedError

    def _max_bits(self) -> int:
        raise NotImplementedError

    def optimal_format(self, bits: int, *, any_split: bool = False) -> FPFormat:
        raise NotImplementedError

    def _plan_formats(self, any_split: bool = False) -> list[FPFormat]:
        """The integer candidates: each bit width's best format."""
        return [self.optimal_format(p, any_split=any_split) for p in range(MIN_BITS, self._max_bits() + 1)]

    # --------------------------------------------------------------- planners
    def _evaluate(self, regime: str, fixed: Optional[float], c, bits, factor, log2b: float):
        """(N, D, loss) at compute c and precision ``bits`` (with the law's precision ``factor``).

        joint: D = C/(kPN) and N minimises the loss; this inner problem is convex in log N for
        both precision laws (a sum of exponentials in log N), searched on [1, C/(kP)] so that
        N >= 1 and D >= 1. fixed_N: D = C/(kPN). fixed_D: N = C/(kPD). k = COMPUTE_FACTOR.
        """
        k = COMPUTE_FACTOR
        c, bits, factor = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (c, bits, factor)))
        if regime == "joint":
            c3, bits3, factor3 = c[..., None], bits[..., None], factor[..., None]

            def f(ln_n):
                n_ = np.exp(ln_n)
                return self._loss_from_factor(n_, c3 / (k * bits3 * n_), factor3, log2b)

            n_ = np.exp(minimise(f, np.zeros_like(c3), np.log(c3 / (k * bits3)))[..., 0])
            d_ = c / (k * bits * n_)
        elif regime == "fixed_N":
            n_ = np.full_like(c, fixed)
            d_ = c / (k * bits * fixed)
        else:
            d_ = np.full_like(c, fixed)
            n_ = c / (k * bits * fixed)
        return n_, d_, self._loss_from_factor(n_, d_, factor, log2b)

    def optimal_precision(
        self,
        compute,
        *,
        N=None,
        D=None,
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        formats: Union[None, str, Sequence[FormatLike]] = None,
        shared_elements: Optional[float] = None,
    ) -> PrecisionPlan:
        """Compute-optimal precision under C = (6/16) P N D FLOPs (arXiv 2501.02423, section 4).

        Three regimes: neither N nor D given -> minimise L over N, D and P (joint; returns N
        and D too); N given -> over P with D = C/(kPN); D given -> over P with N = C/(kPD).
        The continuous optimum ``bits`` searches log P on [2, the law's widest precision] bits
        (no further than keeps N >= 1 and D >= 1) with the law's real-valued best precision
        factor at every P (the paper's analysis); ``format`` is the best of the candidate formats,
        its N/D re-optimised. Candidates: ``None`` -> the law's default (for the Capybara law the
        formats in use, :data:`~lightning_fpq.scaling.capybara.FORMATS_IN_USE`; for Kumar's law
        every integer width); ``"any"`` -> every width's best split; or a list of formats
        (e.g. the ones your hardware runs). Warns
        :class:`~lightning_fpq.scaling.law.ExtrapolationWarning` when the planned N or D lies beyond
        2x the range the law was fitted on. ``shared_elements``: elements per scale for a
        ``"channel"``/``"tensor"`` block (:func:`~lightning_fpq.scaling.law.log2_block_size`).
        """
        regime, fixed, C = _regime(compute, N, D)
        k = COMPUTE_FACTOR
        log2b = self._log2b(block_size, shared_elements)
        hi = np.full_like(C, math.log(self._max_bits()))
        if regime != "joint":
            what = "token" if regime == "fixed_N" else "parameter"
            if np.any(C / (k * MIN_BITS * fixed) < 1.0):
                raise ValueError(
                    f"compute={float(C.min()):.3g} FLOPs buys less than one {what} with {regime[-1]}={fixed:.3g} "
                    f"at {MIN_BITS} bits: need compute > {k * MIN_BITS * fixed:.3g}"
                )
            hi = np.minimum(hi, np.log(C / (k * fixed)))

        def outer(ln_p):
            bits = np.exp(ln_p)
            return self._evaluate(regime, fixed, C, bits, self._relaxed_factor(bits), log2b)[2]

        # 40 iterations leave a bracket of ~1e-9 in log P: relative precision 1e-9 on the bits
        bits = np.exp(minimise(outer, np.full_like(C, math.log(MIN_BITS)), hi, iters=40)[:, 0])
        n_c, d_c, loss_c = self._evaluate(regime, fixed, C[:, 0], bits, self._relaxed_factor(bits), log2b)

        if isinstance(formats, str) and formats != "any":
            raise ValueError(f"formats={formats!r} is not valid: expected None, 'any' or a list of formats")
        if formats is None or formats == "any":
            candidates = self._plan_formats(any_split=formats == "any")
        else:
            candidates = [FPFormat.parse(f) for f in formats]
        if not candidates:
            raise ValueError("formats is empty: give at least one format, or None for every bit width")
        cand_bits = np.array([f.bits for f in candidates], dtype=float)[None, :]  # (1, L)
        cand_factor = np.array([self._format_factor(f) for f in candidates])[None, :]
        n_i, d_i, loss_i = self._evaluate(regime, fixed, C, cand_bits, cand_factor, log2b)  # (K, L)
        loss_i = np.where((n_i >= 1.0) & (d_i >= 1.0), loss_i, np.inf)  # infeasible widths lose
        j = np.argmin(loss_i, axis=1)
        rows = np.arange(C.shape[0])
        best = np.empty(C.shape[0], dtype=object)
        best[:] = [candidates[jj] for jj in j]
        self.check_range(np.concatenate([n_c, n_i[rows, j]]), np.concatenate([d_c, d_i[rows, j]]))
        return PrecisionPlan(
            regime=regime,
            compute=_shaped(C[:, 0], compute),
            block_size=block_size,
            bits=_shaped(bits, compute),
            params=_shaped(n_c, compute),
            tokens=_shaped(d_c, compute),
            loss=_shaped(loss_c, compute),
            format=best[0] if np.ndim(compute) == 0 else best.reshape(np.shape(compute)),
            format_params=_shaped(n_i[rows, j], compute),
            format_tokens=_shaped(d_i[rows, j], compute),
            format_loss=_shaped(loss_i[rows, j], compute),
        )

    def plan_format(
        self,
        compute,
        fmt: FormatLike,
        *,
        N=None,
        D=None,
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        shared_elements: Optional[float] = None,
    ):
        """(N, D, loss) for training in ``fmt`` with ``compute`` FLOPs, C = (6/16) P N D.

        Same regimes as :meth:`optimal_precision`: N optimised when neither N nor D is given.
        """
        regime, fixed, C = _regime(compute, N, D)
        fmt = FPFormat.parse(fmt)
        n_, d_, loss = self._evaluate(
            regime, fixed, C[:, 0], float(fmt.bits), self._format_factor(fmt), self._log2b(block_size, shared_elements)
        )
        if np.any(n_ < 1.0) or np.any(d_ < 1.0):
            raise ValueError(
                f"compute={float(C.min()):.3g} FLOPs is too small for {fmt.name} in regime {regime}: fewer than one token or parameter"
            )
        self.check_range(n_, d_)
        return _shaped(n_, compute), _shaped(d_, compute), _shaped(loss, compute)
