"""Scaling laws for quantized training: when does a low-precision format stop paying off?

Three laws share one interface, so a user can compare them on the same question:

- :class:`CapybaraLaw`: the floating-point quantization training law of Sun et al.,
  "Scaling Laws for Floating-Point Quantization Training", arXiv 2501.02423 (ICML 2025)::

      L(N, D, E, M, B) = n / N^a + d / D^b + eps
                         + (D^b / N^a) * log2(B) / (g * (E + 0.5)^dl * (M + 0.5)^nu)

  N = parameters, D = training tokens, E/M = exponent/mantissa bits, B = block size.
  The last term (the *quantization penalty*) grows with D, so the loss has a minimum in D:
  the critical data size ``D_crit``, past which more tokens make the model worse.
- :class:`KumarLaw`: the precision-aware law for integer formats of Kumar et al.,
  arXiv 2411.04330 (quantized training, forward pass only).
- :class:`ChinchillaLaw`: Hoffmann et al., arXiv 2203.15556, the precision-unaware baseline.

Every formula is a small pure function of numpy arrays; the law classes hold the constants
(with their provenance), convert formats and block sizes, and save to / load from YAML.
Only numpy, OmegaConf and :mod:`lightning_fpq.formats` are imported (no Lightning, no scipy);
the optimisers here are bracketed golden-section searches in log space.

Units: N in parameters, D in tokens, compute in FLOPs, precision P in bits, loss in nats
per token (the paper's validation loss).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import numpy as np

from lightning_fpq.formats import MAX_EBITS, MAX_MBITS, FormatLike, FPFormat, as_format

__all__ = [
    "BLOCK_CHOICES",
    "CHANNEL_LOG2_BLOCK",
    "COMPUTE_FACTOR",
    "DEFAULT_BLOCK_SIZE",
    "CapybaraLaw",
    "ChinchillaLaw",
    "KumarLaw",
    "LawFileError",
    "PrecisionPlan",
    "Provenance",
    "capybara_critical_data_size",
    "capybara_loss",
    "count_params",
    "load_law",
    "log2_block_size",
]

# ----------------------------------------------------------------------------- constants

COMPUTE_FACTOR = 6.0 / 16.0
"""k in the compute model C = k * P * N * D (FLOPs per parameter, per token, per bit):
6 FLOPs per parameter per token at 16 bits, scaled linearly with the precision P
(arXiv 2501.02423; SCIENCE.md section 4)."""

CHANNEL_LOG2_BLOCK = 13.1567
"""log2(B) that channel-wise scaling behaves like, as fitted in arXiv 2501.02423 (dimensionless)."""

DEFAULT_BLOCK_SIZE = 128
"""Block size used when none is given: the plugin's default (128 elements per FP32 scale)."""

BLOCK_CHOICES = "an int >= 1 (elements per scale), 'channel' or 'tensor'"

MIN_BITS = 2
"""Narrowest precision the planners consider: 1 sign bit + one exponent or mantissa bit."""


def log2_block_size(block_size: Union[int, str], *, channel_log2: float = CHANNEL_LOG2_BLOCK) -> float:
    """log2(B) for the Capybara law's block-size term.

    - an int B >= 1: log2(B) (B = 1, one scale per element, has no quantization penalty);
    - ``"channel"``: the paper's fitted value, ``channel_log2`` (13.1567 for the published law);
    - ``"tensor"``: ``2 * channel_log2``. *Our approximation, not fitted in the paper*: one
      scale per tensor covers about (channel length)^2 elements of a square weight matrix,
      where a channel-wise scale covers one row, so its log2(B) is doubled. Refit with
      tensor-wise runs (``lightning_fpq.scaling.fitting.fit``) before relying on it.
    """
    if block_size is None:
        raise ValueError(
            f"block_size=None (unscaled quantization) is outside the law, which was fitted on scaled blocks: expected {BLOCK_CHOICES}"
        )
    if isinstance(block_size, str):
        key = block_size.strip().lower()
        if key == "channel":
            return float(channel_log2)
        if key == "tensor":
            return 2.0 * float(channel_log2)
        raise ValueError(f"block_size={block_size!r} is not valid: expected {BLOCK_CHOICES}")
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not valid: expected {BLOCK_CHOICES}")
    return math.log2(int(block_size))


# --------------------------------------------------------------------- input checking


def _positive(name: str, value: Any) -> np.ndarray:
    """``value`` as a float array, every entry finite and > 0, else ValueError naming it."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number: expected a finite number > 0 (or an array of them)") from None
    good = np.isfinite(arr) & (arr > 0)
    if not np.all(good):
        bad = arr[~good].flat[0] if arr.ndim else arr.item()
        raise ValueError(f"{name}={bad!r} is not valid: expected a finite number > 0")
    return arr


def _out(x: np.ndarray) -> Union[float, np.ndarray]:
    """Scalars in, a Python float out; arrays in, an array out."""
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def _format_or_none(fmt: Optional[FormatLike]) -> Optional[FPFormat]:
    return None if fmt is None else as_format(fmt)


# ------------------------------------------------------------- the Capybara formulas


def capybara_precision_factor(E: Any, M: Any, dl: float, nu: float) -> np.ndarray:
    """(E + 0.5)^dl * (M + 0.5)^nu: how much a format's bits shrink the penalty (arXiv 2501.02423, eq. of section 4)."""
    return (np.asarray(E, dtype=float) + 0.5) ** dl * (np.asarray(M, dtype=float) + 0.5) ** nu


def capybara_loss(N, D, E, M, log2b, *, n, a, d, b, eps, g, dl, nu, **_unused) -> np.ndarray:
    """The Capybara law, elementwise over broadcastable arrays (arXiv 2501.02423).

    L = n/N^a + d/D^b + eps + (D^b/N^a) * log2b / (g (E+0.5)^dl (M+0.5)^nu), in nats/token.
    """
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    penalty = D**b / N**a * np.asarray(log2b, dtype=float) / (g * capybara_precision_factor(E, M, dl, nu))
    return n / N**a + d / D**b + eps + penalty


def capybara_critical_data_size(N, E, M, log2b, *, d, a, b, g, dl, nu, **_unused) -> np.ndarray:
    """D_crit = [d g N^a (E+0.5)^dl (M+0.5)^nu / log2 B]^(1/(2b)), tokens (arXiv 2501.02423).

    It solves dL/dD = 0: -b d D^(-b-1) + b D^(b-1) log2B / (g N^a Q) = 0. log2 B = 0 (B = 1)
    has no penalty and no minimum: D_crit = inf.
    """
    with np.errstate(divide="ignore"):
        base = d * g * np.asarray(N, dtype=float) ** a * capybara_precision_factor(E, M, dl, nu) / np.asarray(log2b, dtype=float)
    return base ** (1.0 / (2.0 * b))


# ------------------------------------------------------------------------ provenance


@dataclass(frozen=True)
class Provenance:
    """Where a law's constants come from: ``source`` is ``"paper"``, ``"fit"`` or ``"user"``.

    For a fit: ``rows`` used, the fit's ``rmse`` (nats, on the fitted rows), ``r2``, and
    ``heldout_rmse`` (nats, on rows kept out of the fit) when rows were held out.
    """

    source: str = "user"
    citation: str = ""
    rows: Optional[int] = None
    rmse: Optional[float] = None
    r2: Optional[float] = None
    heldout_rmse: Optional[float] = None
    note: str = ""

    SOURCES: ClassVar[tuple[str, ...]] = ("paper", "fit", "user")

    def __post_init__(self) -> None:
        if self.source not in self.SOURCES:
            raise ValueError(f"Provenance source={self.source!r} is not one of {self.SOURCES}")
        if self.rows is not None and (isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 0):
            raise ValueError(f"Provenance rows={self.rows!r} must be an int >= 0 or None")

    def short_str(self) -> str:
        parts = [self.source]
        if self.rows is not None:
            parts.append(f"{self.rows} rows")
        if self.rmse is not None:
            parts.append(f"RMSE {self.rmse:.4g}")
        if self.heldout_rmse is not None:
            parts.append(f"held-out RMSE {self.heldout_rmse:.4g}")
        return ", ".join(parts)


class LawFileError(ValueError):
    """A law YAML file that cannot be read or does not describe a law."""


# ------------------------------------------------------------------- the plan result


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


# ------------------------------------------------------------------ shared behaviour

REGIMES = ("joint", "fixed_N", "fixed_D")


class _Law:
    """Constants, provenance, validation and YAML for every law (subclasses are frozen dataclasses)."""

    kind: ClassVar[str] = ""
    _nonnegative: ClassVar[frozenset[str]] = frozenset()  # constants that may be 0 (others > 0)

    # dataclass fields provided by subclasses
    provenance: Provenance

    @classmethod
    def constant_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "provenance")

    def _validate_constants(self) -> None:
        for name in self.constant_names():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ValueError(f"{type(self).__name__} constant {name}={value!r} is not a number")
            value = float(value)
            object.__setattr__(self, name, value)
            floor_ok = value >= 0 if name in self._nonnegative else value > 0
            if not (math.isfinite(value) and floor_ok):
                need = ">= 0" if name in self._nonnegative else "> 0"
                raise ValueError(f"{type(self).__name__} constant {name}={value!r} is not valid: expected a finite number {need}")
        if not isinstance(self.provenance, Provenance):
            raise ValueError(f"provenance={self.provenance!r} is not a Provenance")

    def constants(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.constant_names()}

    def short_str(self) -> str:
        consts = ", ".join(f"{k}={v:.6g}" for k, v in self.constants().items())
        return f"{type(self).__name__}({consts}; {self.provenance.short_str()})"

    # ---------------------------------------------------------------- YAML
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "constants": self.constants(), "provenance": asdict(self.provenance)}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "law data") -> "_Law":
        if not isinstance(data, dict):
            raise LawFileError(f"{source}: expected a mapping with keys 'kind', 'constants', 'provenance'")
        kind = data.get("kind")
        if kind != cls.kind:
            raise LawFileError(f"{source}: kind {kind!r} is not {cls.kind!r} (use load_law to dispatch on kind)")
        constants = data.get("constants")
        if not isinstance(constants, dict):
            raise LawFileError(f"{source}: 'constants' must be a mapping of {list(cls.constant_names())}")
        missing = [k for k in cls.constant_names() if k not in constants]
        extra = [k for k in constants if k not in cls.constant_names()]
        if missing or extra:
            raise LawFileError(
                f"{source}: constants must be exactly {list(cls.constant_names())}; missing {missing}, unexpected {extra}"
            )
        prov = data.get("provenance") or {}
        if not isinstance(prov, dict):
            raise LawFileError(f"{source}: 'provenance' must be a mapping")
        known = {f.name for f in fields(Provenance)}
        unknown = [k for k in prov if k not in known]
        if unknown:
            raise LawFileError(f"{source}: unknown provenance keys {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**constants, provenance=Provenance(**prov))
        except (TypeError, ValueError) as err:
            raise LawFileError(f"{source}: {err}") from None

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the law (kind, constants, provenance) as YAML; returns the path."""
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(self.to_dict()), os.fspath(path))
        return os.fspath(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "_Law":
        """Read a law saved by :meth:`save`; :class:`LawFileError` (a ValueError) if it cannot."""
        return cls.from_dict(_read_yaml(path), source=f"law file {os.fspath(path)!r}")

    # --------------------------------------------- precision-dependent hooks (Capybara, Kumar)
    def _format_factor(self, fmt: Optional[FPFormat]) -> float:
        raise NotImplementedError

    def _relaxed_factor(self, bits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        raise NotImplementedError

    def _plan_formats(self) -> list[FPFormat]:
        raise NotImplementedError

    def _max_bits(self) -> int:
        raise NotImplementedError


def _read_yaml(path: Union[str, os.PathLike]) -> dict:
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.load(os.fspath(path))
        data = OmegaConf.to_container(conf, resolve=True)
    except Exception as err:  # OSError, YAML syntax errors, decode errors: all "cannot read"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LawFileError(f"cannot read law file {os.fspath(path)!r}: {reason}") from None
    if not isinstance(data, dict):
        raise LawFileError(f"law file {os.fspath(path)!r} does not hold a mapping")
    return data


def load_law(path: Union[str, os.PathLike]) -> "_Law":
    """Load any law saved with ``law.save(path)``, dispatching on its ``kind`` field."""
    data = _read_yaml(path)
    kinds = {cls.kind: cls for cls in (CapybaraLaw, KumarLaw, ChinchillaLaw)}
    kind = data.get("kind")
    if kind not in kinds:
        raise LawFileError(f"law file {os.fspath(path)!r}: kind {kind!r} is not one of {sorted(kinds)}")
    return kinds[kind].from_dict(data, source=f"law file {os.fspath(path)!r}")


# --------------------------------------------------------- one-dimensional optimisers

_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


def _golden(f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, iters: int = 64) -> np.ndarray:
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


def _minimise(f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, grid: int = 24, iters: int = 64) -> np.ndarray:
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
    return _golden(f, np.maximum(best - step, lo), np.minimum(best + step, hi), iters)


def _regime(compute, N, D) -> tuple[str, Optional[float], np.ndarray]:
    """Which regime the arguments ask for, the fixed value if any, and compute as a (K, 1) array."""
    if N is not None and D is not None:
        raise ValueError("give at most one of N and D: with compute, N and D fixed the precision is C/(k N D), nothing to optimise")
    C = _positive("compute", compute).reshape(-1)[:, None]  # (K, 1): the trailing axis carries grids
    if N is not None:
        return "fixed_N", float(_positive("N", N)), C
    if D is not None:
        return "fixed_D", float(_positive("D", D)), C
    return "joint", None, C


def _evaluate(law: "_Law", regime: str, fixed: Optional[float], c, bits, factor, log2b: float):
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
            return law._loss_from_factor(n_, c3 / (k * bits3 * n_), factor3, log2b)

        n_ = np.exp(_minimise(f, np.zeros_like(c3), np.log(c3 / (k * bits3)))[..., 0])
        d_ = c / (k * bits * n_)
    elif regime == "fixed_N":
        n_ = np.full_like(c, fixed)
        d_ = c / (k * bits * fixed)
    else:
        d_ = np.full_like(c, fixed)
        n_ = c / (k * bits * fixed)
    return n_, d_, law._loss_from_factor(n_, d_, factor, log2b)


def _shaped(x, compute):
    x = np.asarray(x, dtype=float)
    return float(x.reshape(-1)[0]) if np.ndim(compute) == 0 else x.reshape(np.shape(compute))


def _optimal_precision(law: "_Law", compute, N, D, block_size, formats) -> PrecisionPlan:
    """Minimise the law's loss at fixed compute C = k P N D over the free variables.

    The continuous optimum searches log P on [2, law._max_bits()] bits (no further than keeps
    N >= 1 and D >= 1); the integer optimum compares every candidate format (by default each
    bit width's best format) with its own N/D re-optimised.
    """
    regime, fixed, C = _regime(compute, N, D)
    k = COMPUTE_FACTOR
    log2b = law._log2b(block_size)
    hi = np.full_like(C, math.log(law._max_bits()))
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
        return _evaluate(law, regime, fixed, C, bits, law._relaxed_factor(bits), log2b)[2]

    # 40 iterations leave a bracket of ~1e-9 in log P: relative precision 1e-9 on the bits
    bits = np.exp(_minimise(outer, np.full_like(C, math.log(MIN_BITS)), hi, iters=40)[:, 0])
    n_c, d_c, loss_c = _evaluate(law, regime, fixed, C[:, 0], bits, law._relaxed_factor(bits), log2b)

    candidates = law._plan_formats() if formats is None else [as_format(f) for f in formats]
    if not candidates:
        raise ValueError("formats is empty: give at least one format, or None for every bit width")
    cand_bits = np.array([f.bits for f in candidates], dtype=float)[None, :]  # (1, L)
    cand_factor = np.array([law._format_factor(f) for f in candidates])[None, :]
    n_i, d_i, loss_i = _evaluate(law, regime, fixed, C, cand_bits, cand_factor, log2b)  # (K, L)
    loss_i = np.where((n_i >= 1.0) & (d_i >= 1.0), loss_i, np.inf)  # infeasible widths lose
    j = np.argmin(loss_i, axis=1)
    rows = np.arange(C.shape[0])
    best = np.empty(C.shape[0], dtype=object)
    best[:] = [candidates[jj] for jj in j]
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


def _plan_format(law: "_Law", compute, fmt, N, D, block_size) -> tuple[Any, Any, Any]:
    regime, fixed, C = _regime(compute, N, D)
    fmt = as_format(fmt)
    n_, d_, loss = _evaluate(law, regime, fixed, C[:, 0], float(fmt.bits), law._format_factor(fmt), law._log2b(block_size))
    if np.any(n_ < 1.0) or np.any(d_ < 1.0):
        raise ValueError(f"compute={float(C.min()):.3g} FLOPs is too small for {fmt.name} in regime {regime}: fewer than one token or parameter")
    return _shaped(n_, compute), _shaped(d_, compute), _shaped(loss, compute)


# -------------------------------------------------------------------- Capybara law


@dataclass(frozen=True)
class CapybaraLaw(_Law):
    """The floating-point quantization training law of Sun et al., arXiv 2501.02423 (ICML 2025).

    ``L(N, D, E, M, B) = n/N^a + d/D^b + eps + (D^b/N^a) log2(B) / (g (E+0.5)^dl (M+0.5)^nu)``

    Constants (dimensionless; loss in nats/token): ``n``, ``a`` (parameter term), ``d``, ``b``
    (data term), ``eps`` (irreducible loss), ``g``, ``dl``, ``nu`` (quantization penalty:
    exponent and mantissa weights), and ``channel_log2_block``, the log2(B) that channel-wise
    scaling behaves like. :meth:`paper` holds the published values, fitted on LLaMA models
    of 41M-679M parameters trained on 10B-100B Dolma tokens (358 runs): for another model
    family, tokenizer or data set, refit (:func:`lightning_fpq.scaling.fitting.fit`).

    A format argument is an :class:`FPFormat`, a name ("e2m1", "fp8", ...) or ``None`` (no
    quantization: the penalty term is 0). Only E and M matter to the law, not the
    special-value mode. A block size is an int >= 1, ``"channel"`` or ``"tensor"`` (see
    :func:`log2_block_size` for the tensor-wise approximation). N and D accept numpy arrays
    (broadcast together); scalars in give floats out.

    >>> law = CapybaraLaw.paper()
    >>> round(law.critical_data_size(1e9, "e2m1", 128) / 1e9)  # tokens
    393
    """

    n: float
    a: float
    d: float
    b: float
    eps: float
    g: float
    dl: float
    nu: float
    channel_log2_block: float = CHANNEL_LOG2_BLOCK
    provenance: Provenance = Provenance()

    kind: ClassVar[str] = "capybara"
    _nonnegative: ClassVar[frozenset[str]] = frozenset({"eps", "dl", "nu"})
    FITTED: ClassVar[tuple[str, ...]] = ("n", "a", "d", "b", "eps", "g", "dl", "nu")

    def __post_init__(self) -> None:
        self._validate_constants()

    @classmethod
    def paper(cls) -> "CapybaraLaw":
        """The published constants of Sun et al., arXiv 2501.02423, eq. (the unified law), SCIENCE.md section 4."""
        return cls(
            n=69.2343,
            a=0.2368,
            d=68973.0621,
            b=0.5162,
            eps=1.9061,
            g=11334.5197,
            dl=3.1926,
            nu=2.9543,
            channel_log2_block=CHANNEL_LOG2_BLOCK,
            provenance=Provenance(
                source="paper",
                citation="Sun et al., Scaling Laws for Floating-Point Quantization Training, arXiv 2501.02423 (ICML 2025)",
                rows=358,
                note="LLaMA 41M-679M parameters, 10B-100B Dolma tokens, AdamW lr 3e-4 cosine, 2M-token batches",
            ),
        )

    # -------------------------------------------------------------- hooks
    def _log2b(self, block_size: Union[int, str]) -> float:
        return log2_block_size(block_size, channel_log2=self.channel_log2_block)

    def _format_factor(self, fmt: Optional[FPFormat]) -> float:
        if fmt is None:
            return math.inf  # no quantization: the penalty term vanishes
        return float(capybara_precision_factor(fmt.ebits, fmt.mbits, self.dl, self.nu))

    def _relaxed_factor(self, bits: np.ndarray) -> np.ndarray:
        # real-valued best split: E + 0.5 = dl P/(dl+nu), M + 0.5 = nu P/(dl+nu)
        s = self.dl + self.nu
        bits = np.asarray(bits, dtype=float)
        return (self.dl * bits / s) ** self.dl * (self.nu * bits / s) ** self.nu

    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        with np.errstate(divide="ignore"):
            penalty = D**self.b / N**self.a * log2b / (self.g * np.asarray(factor, dtype=float))
        return self.n / N**self.a + self.d / D**self.b + self.eps + penalty

    def _max_bits(self) -> int:
        return 1 + MAX_EBITS + MAX_MBITS

    def _plan_formats(self) -> list[FPFormat]:
        return [self.optimal_format(p) for p in range(MIN_BITS, self._max_bits() + 1)]

    # -------------------------------------------------------------- the law
    def loss(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Predicted final loss (nats/token) of N parameters trained on D tokens in ``fmt``."""
        N, D = _positive("N", N), _positive("D", D)
        return _out(self._loss_from_factor(N, D, self._format_factor(_format_or_none(fmt)), self._log2b(block_size)))

    def quantization_penalty(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The law's last term (nats/token): the loss ``fmt`` adds over unquantized training."""
        N, D = _positive("N", N), _positive("D", D)
        factor = self._format_factor(_format_or_none(fmt))
        return _out(D**self.b / N**self.a * self._log2b(block_size) / (self.g * factor))

    def critical_data_size(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """D_crit (tokens): where the loss is lowest; more tokens in ``fmt`` past it raise the loss.

        ``D_crit = [d g N^a (E+0.5)^dl (M+0.5)^nu / log2 B]^(1/(2b))`` (arXiv 2501.02423).
        Unquantized (``fmt=None``) or B = 1: inf.
        """
        N = _positive("N", N)
        fmt = _format_or_none(fmt)
        log2b = self._log2b(block_size)
        if fmt is None or log2b == 0.0:
            return _out(np.full_like(N, np.inf))
        return _out(capybara_critical_data_size(N, fmt.ebits, fmt.mbits, log2b, **self.constants()))

    def token_value(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """What one more token is worth in ``fmt``, relative to unquantized training (dimensionless).

        The ratio of dL/dlog D with and without the penalty term:
        ``(b T_D - b T_Q) / (b T_D) = 1 - (D / D_crit)^(2b)``, where T_D = d/D^b is the data
        term and T_Q the penalty. 1 = as useful as unquantized; 0 at D_crit; negative past
        it (more tokens raise the loss).
        """
        N, D = _positive("N", N), _positive("D", D)
        d_crit = np.asarray(self.critical_data_size(N, fmt, block_size), dtype=float)
        return _out(1.0 - (D / d_crit) ** (2.0 * self.b))

    def min_loss(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The lowest loss N parameters reach in ``fmt`` (nats/token): the loss at D_crit.

        At D_crit the data term equals the penalty, so L_min = n/N^a + eps + 2 d / D_crit^b.
        """
        N = _positive("N", N)
        d_crit = np.asarray(self.critical_data_size(N, fmt, block_size), dtype=float)
        with np.errstate(divide="ignore"):
            return _out(self.n / N**self.a + self.eps + 2.0 * self.d / d_crit**self.b)

    def optimal_split(self, bits: int) -> tuple[float, float]:
        """Real-valued best (E, M) for ``bits`` total bits: E_opt = dl P/(dl+nu) - 0.5,
        M_opt = nu P/(dl+nu) - 0.5 (arXiv 2501.02423; they sum to P - 1)."""
        bits = _check_bits(bits, 1 + MAX_EBITS + MAX_MBITS)
        s = self.dl + self.nu
        return self.dl * bits / s - 0.5, self.nu * bits / s - 0.5

    def optimal_format(self, bits: int) -> FPFormat:
        """The best integer E/M split for ``bits`` total bits (1 sign + E + M), as an FPFormat.

        Chosen by evaluating the law's precision term: the integer pair with E + M = bits - 1
        (E <= 8, M <= 23, the FPFormat limits) that minimises the quantization penalty
        1/((E+0.5)^dl (M+0.5)^nu). The result is parsed from its "eXmY" name, so a split that
        is a hardware format carries that format's special-value mode (e4m3 -> OCP E4M3FN,
        e8m7 -> BF16); the law itself ignores the mode.
        """
        bits = _check_bits(bits, 1 + MAX_EBITS + MAX_MBITS)
        best = min(
            ((e, bits - 1 - e) for e in range(0, bits) if e <= MAX_EBITS and bits - 1 - e <= MAX_MBITS),
            key=lambda em: -(em[0] + 0.5) ** self.dl * (em[1] + 0.5) ** self.nu,
        )
        return FPFormat.parse(f"e{best[0]}m{best[1]}")

    def optimal_precision(
        self, compute, *, N=None, D=None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE, formats: Optional[Sequence[FormatLike]] = None
    ) -> PrecisionPlan:
        """Compute-optimal precision under C = (6/16) P N D FLOPs (arXiv 2501.02423, section 4).

        Three regimes: neither N nor D given -> minimise L over N, D and P (joint; returns N
        and D too); N given -> over P with D = C/(kPN); D given -> over P with N = C/(kPD).
        The continuous optimum ``bits`` uses the real-valued best E/M split at every P (the
        paper's analysis); ``format`` is the best integer bit width with its best integer
        split, re-optimised. With the published constants and 128-element blocks the joint
        optimum stays between 4 and 8 bits for C in 1e21..1e31 FLOPs; with channel-wise
        scaling (log2 B = 13.16) it reaches 8.4 bits at 1e31. ``formats`` restricts the
        integer choice to those formats (e.g. the ones your hardware runs).
        """
        return _optimal_precision(self, compute, N, D, block_size, formats)

    def plan_format(self, compute, fmt: FormatLike, *, N=None, D=None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """(N, D, loss) for training in ``fmt`` with ``compute`` FLOPs, C = (6/16) P N D.

        Same regimes as :meth:`optimal_precision`: N optimised when neither N nor D is given.
        """
        return _plan_format(self, compute, fmt, N, D, block_size)

    def precision_parameter_tradeoff(self, P_from, P_to):
        """Factor on N when moving from P_from to P_to bits at fixed compute (dimensionless).

        Runs that end exactly at D_crit with C = k P N D satisfy (substitute D = C/(kPN) in
        D_crit^(2b) ∝ N^a P^(dl+nu), with the real-valued best split)
        ``P^(dl+nu+2b) * N^(a+2b) = const`` (SCIENCE.md section 4), hence
        ``N_to / N_from = (P_from / P_to)^((dl+nu+2b)/(a+2b))``.
        """
        P_from, P_to = _positive("P_from", P_from), _positive("P_to", P_to)
        return _out((P_from / P_to) ** ((self.dl + self.nu + 2 * self.b) / (self.a + 2 * self.b)))

    def effective_params(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """N_eff: the unquantized model size with the same predicted loss at the same D (parameters).

        Solves n/N_eff^a = n/N^a + penalty(N, D, fmt, B):
        ``N_eff = (n / (n N^-a + penalty))^(1/a)``. Unlike Kumar's N_eff it depends on D,
        because the Capybara penalty grows with the data.
        """
        N, D = _positive("N", N), _positive("D", D)
        penalty = np.asarray(self.quantization_penalty(N, D, fmt, block_size), dtype=float)
        return _out((self.n / (self.n * N ** (-self.a) + penalty)) ** (1.0 / self.a))


def _check_bits(bits: Any, hi: int) -> int:
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= hi:
        raise ValueError(f"bits={bits!r} is not valid: expected an int in {MIN_BITS}..{hi} (1 sign bit + exponent + mantissa)")
    return int(bits)


# ----------------------------------------------------------------------- Kumar law


@dataclass(frozen=True)
class KumarLaw(_Law):
    """Precision-aware scaling law for integer formats of Kumar et al., arXiv 2411.04330.

    ``L = A N_eff^-alpha + B D^-beta + E``, with
    ``N_eff = N (1 - exp(-P_w/g_w)) (1 - exp(-P_a/g_a)) (1 - exp(-P_kv/g_kv))``.
    Quantized training only (forward pass: weights, activations, KV cache); the
    post-training-quantization term delta_PTQ is 0 here. A format gives its bit count P to
    all three operands; the law knows integer precision only, so an FP format's E/M split is
    ignored and its block size has no effect (the argument is accepted so that calls are
    interchangeable with :class:`CapybaraLaw`). Having no D-dependent penalty, it has no
    critical data size (inf). With the published constants, alpha = beta and
    C = (6/16) P N D, the joint compute-optimal precision is independent of C: it minimises
    P / f(P), where f is the N_eff factor.
    """

    A: float
    alpha: float
    B: float
    beta: float
    E: float
    g_w: float
    g_a: float
    g_kv: float
    provenance: Provenance = Provenance()

    kind: ClassVar[str] = "kumar"
    _nonnegative: ClassVar[frozenset[str]] = frozenset({"E"})
    FITTED: ClassVar[tuple[str, ...]] = ("A", "alpha", "B", "beta", "E", "g_w", "g_a", "g_kv")

    def __post_init__(self) -> None:
        self._validate_constants()

    @classmethod
    def paper(cls) -> "KumarLaw":
        """The published constants of Kumar et al., arXiv 2411.04330 (SCIENCE.md section 5)."""
        return cls(
            A=4.299e3, alpha=0.4965, B=1.806e4, beta=0.4965, E=2.7648, g_w=2.6745, g_a=2.2102, g_kv=0.9578,
            provenance=Provenance(
                source="paper",
                citation="Kumar et al., Scaling Laws for Precision, arXiv 2411.04330 (ICLR 2025)",
                note="integer formats, quantized training of weights, activations and KV cache",
            ),
        )

    def _log2b(self, block_size: Union[int, str]) -> float:
        return log2_block_size(block_size)  # validated for interchangeability; unused by the law

    def precision_factor(self, P_w, P_a=None, P_kv=None):
        """N_eff / N = prod (1 - exp(-P_x / g_x)) (dimensionless); P_a, P_kv default to P_w."""
        P_w = _positive("P_w", P_w)
        P_a = P_w if P_a is None else _positive("P_a", P_a)
        P_kv = P_w if P_kv is None else _positive("P_kv", P_kv)
        return _out((1 - np.exp(-P_w / self.g_w)) * (1 - np.exp(-P_a / self.g_a)) * (1 - np.exp(-P_kv / self.g_kv)))

    def _format_factor(self, fmt: Optional[FPFormat]) -> float:
        return 1.0 if fmt is None else float(self.precision_factor(float(fmt.bits)))

    def _relaxed_factor(self, bits: np.ndarray) -> np.ndarray:
        bits = np.asarray(bits, dtype=float)
        return (1 - np.exp(-bits / self.g_w)) * (1 - np.exp(-bits / self.g_a)) * (1 - np.exp(-bits / self.g_kv))

    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        n_eff = np.asarray(N, dtype=float) * np.asarray(factor, dtype=float)
        return self.A * n_eff ** (-self.alpha) + self.B * np.asarray(D, dtype=float) ** (-self.beta) + self.E

    def _max_bits(self) -> int:
        return 1 + MAX_MBITS  # an E0My integer format has at most 23 magnitude bits

    def _plan_formats(self) -> list[FPFormat]:
        return [self.optimal_format(p) for p in range(MIN_BITS, self._max_bits() + 1)]

    def loss(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Predicted loss (nats/token); ``fmt=None`` is unquantized (N_eff = N)."""
        N, D = _positive("N", N), _positive("D", D)
        self._log2b(block_size)
        return _out(self._loss_from_factor(N, D, self._format_factor(_format_or_none(fmt)), 0.0))

    def effective_params(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Kumar's N_eff (parameters). D is validated but unused: this N_eff does not depend on data."""
        N, _ = _positive("N", N), _positive("D", D)
        self._log2b(block_size)
        return _out(N * self._format_factor(_format_or_none(fmt)))

    def critical_data_size(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """inf (tokens): without delta_PTQ the loss falls monotonically in D."""
        N = _positive("N", N)
        _format_or_none(fmt), self._log2b(block_size)
        return _out(np.full_like(N, np.inf))

    def token_value(self, N, D, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """1.0: this law has no D-dependent quantization penalty, so a token is worth what it is unquantized."""
        N, D = _positive("N", N), _positive("D", D)
        _format_or_none(fmt), log2_block_size(block_size)
        return _out(np.ones(np.broadcast_shapes(N.shape, D.shape)))

    def min_loss(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The D -> inf limit, A N_eff^-alpha + E (nats/token)."""
        N = _positive("N", N)
        self._log2b(block_size)
        return _out(self.A * (N * self._format_factor(_format_or_none(fmt))) ** (-self.alpha) + self.E)

    def optimal_format(self, bits: int) -> FPFormat:
        """The integer format of ``bits`` bits: sign + (bits - 1) magnitude bits, i.e. E0M(bits-1)."""
        bits = _check_bits(bits, self._max_bits())
        return FPFormat(ebits=0, mbits=bits - 1)

    def optimal_precision(
        self, compute, *, N=None, D=None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE, formats: Optional[Sequence[FormatLike]] = None
    ) -> PrecisionPlan:
        """Compute-optimal precision under C = (6/16) P N D, same regimes as :meth:`CapybaraLaw.optimal_precision`."""
        return _optimal_precision(self, compute, N, D, block_size, formats)

    def plan_format(self, compute, fmt: FormatLike, *, N=None, D=None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """(N, D, loss) for training in ``fmt`` with ``compute`` FLOPs, as :meth:`CapybaraLaw.plan_format`."""
        return _plan_format(self, compute, fmt, N, D, block_size)


# ------------------------------------------------------------------- Chinchilla law


@dataclass(frozen=True)
class ChinchillaLaw(_Law):
    """Hoffmann et al., "Training Compute-Optimal Large Language Models", arXiv 2203.15556.

    ``L = E + A / N^alpha + B / D^beta`` (their eq. 10, approach 3: E = 1.69, A = 406.4,
    B = 410.7, alpha = 0.34, beta = 0.28). Precision-unaware: a format argument is accepted
    and ignored, the law being the unquantized baseline; it has no critical data size (inf).
    Its compute model is C = 6 N D, which is (6/16) P N D at P = 16 bits.
    """

    A: float
    alpha: float
    B: float
    beta: float
    E: float
    provenance: Provenance = Provenance()

    kind: ClassVar[str] = "chinchilla"
    _nonnegative: ClassVar[frozenset[str]] = frozenset({"E"})
    FITTED: ClassVar[tuple[str, ...]] = ("A", "alpha", "B", "beta", "E")

    def __post_init__(self) -> None:
        self._validate_constants()

    @classmethod
    def paper(cls) -> "ChinchillaLaw":
        """The published approach-3 fit of Hoffmann et al., arXiv 2203.15556, eq. (10)."""
        return cls(
            A=406.4, alpha=0.34, B=410.7, beta=0.28, E=1.69,
            provenance=Provenance(
                source="paper",
                citation="Hoffmann et al., Training Compute-Optimal Large Language Models, arXiv 2203.15556",
                note="approach 3 (parametric fit); MassiveText, its tokenizer",
            ),
        )

    def loss(self, N, D, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Predicted loss (nats/token); ``fmt`` and ``block_size`` are validated and ignored."""
        N, D = _positive("N", N), _positive("D", D)
        _format_or_none(fmt), log2_block_size(block_size)
        return _out(self.E + self.A / N**self.alpha + self.B / D**self.beta)

    def critical_data_size(self, N, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """inf (tokens): the loss falls monotonically in D."""
        N = _positive("N", N)
        _format_or_none(fmt), log2_block_size(block_size)
        return _out(np.full_like(N, np.inf))

    def token_value(self, N, D, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """1.0: this law has no D-dependent quantization penalty, so a token is worth what it is unquantized."""
        N, D = _positive("N", N), _positive("D", D)
        _format_or_none(fmt), log2_block_size(block_size)
        return _out(np.ones(np.broadcast_shapes(N.shape, D.shape)))

    def min_loss(self, N, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The D -> inf limit, E + A / N^alpha (nats/token)."""
        N = _positive("N", N)
        _format_or_none(fmt), log2_block_size(block_size)
        return _out(self.E + self.A / N**self.alpha)

    def compute_optimal(self, compute) -> tuple[Any, Any]:
        """(N_opt, D_opt) minimising L under C = 6 N D (arXiv 2203.15556, eq. 4):
        N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G,
        G = (alpha A / (beta B))^(1/(alpha+beta))."""
        C = _positive("compute", compute)
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return _out(G * (C / 6.0) ** (self.beta / s)), _out((C / 6.0) ** (self.alpha / s) / G)


# ------------------------------------------------------------------- model size


def count_params(model: Any, *, include_embeddings: bool = False) -> int:
    """N as the scaling laws expect it: the parameters of a torch ``nn.Module``.

    By default *non-embedding* parameters: the weights of every ``nn.Embedding`` and
    ``nn.EmbeddingBag`` are left out, because a lookup costs no FLOPs and the compute model
    C = 6 N D (times P/16) counts matmul FLOPs. Consequences: a classifier head tied to the
    embedding (the same Parameter) is left out with it; an untied output head is a matmul
    and is counted; position tables stored as a bare ``nn.Parameter`` are counted.
    ``include_embeddings=True`` counts everything. Shared parameters count once; frozen
    parameters count (they still cost compute).
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"count_params expects a torch.nn.Module, got {type(model).__name__}")
    skip: set[int] = set()
    if not include_embeddings:
        for module in model.modules():
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                skip.update(id(p) for p in module.parameters(recurse=False))
    total = 0
    for name, p in model.named_parameters():  # named_parameters() yields a shared Parameter once
        if id(p) in skip:
            continue
        if isinstance(p, torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"parameter {name!r} is uninitialized (a lazy module): run one forward pass before count_params")
        total += p.numel()
    return int(total)
