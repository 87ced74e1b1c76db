"""What every scaling law shares: constants, provenance, validation, YAML, and loading by kind.

The laws themselves are :class:`~lightning_fpq.scaling.capybara.CapybaraLaw` (floating-point
quantized training, arXiv 2501.02423), :class:`~lightning_fpq.scaling.kumar.KumarLaw`
(integer precision, arXiv 2411.04330) and :class:`~lightning_fpq.scaling.chinchilla.ChinchillaLaw`
(the precision-unaware baseline, arXiv 2203.15556). They share one interface, so a user can
compare them on the same question; each is a frozen dataclass of its constants (with their
:class:`Provenance`) and saves to / loads from YAML.

Units: N in parameters, D in tokens, compute in FLOPs, precision P in bits, loss in nats
per token (the paper's validation loss). Only numpy, OmegaConf and :mod:`lightning_fpq.formats`
are imported (no Lightning, no scipy).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional, Union

import numpy as np

from lightning_fpq import _config
from lightning_fpq.formats import FormatLike

from .inputs import format_or_none, positive_array, scalar_or_array

__all__ = [
    "CHANNEL_LOG2_BLOCK",
    "COMPUTE_FACTOR",
    "DEFAULT_BLOCK_SIZE",
    "EXTRAPOLATION_FACTOR",
    "NAMED_LAWS",
    "ExtrapolationWarning",
    "Law",
    "LawFileError",
    "NoCriticalDataSize",
    "Provenance",
    "load_law",
    "log2_block_size",
    "named_law_path",
    "resolve_named_law",
]

EXTRAPOLATION_FACTOR = 2.0
"""A law warns (:class:`ExtrapolationWarning`) when N or D lies beyond this factor outside the range it
was fitted on: below low / 2 or above 2 * high."""


class ExtrapolationWarning(UserWarning):
    """N or D lies beyond 2x the range a law was fitted on: its prediction is an extrapolation.

    Attributes: ``quantity`` ("N" or "D"), ``value`` (the most extreme value asked about), ``low`` and
    ``high`` (the fitted range). The message carries no value, so that a caller stepping through
    values (a monitor) sees it once per call site.
    """

    def __init__(self, quantity: str, value: float, low: float, high: float, law: str = "the law"):
        self.quantity, self.value, self.low, self.high = quantity, float(value), float(low), float(high)
        side = "below" if value < low else "above"
        what = "parameters" if quantity == "N" else "tokens"
        super().__init__(
            f"{law}: {quantity} {side} the range it was fitted on ({quantity} = {low:.3g}..{high:.3g} {what}) "
            f"by more than {EXTRAPOLATION_FACTOR:g}x: the prediction is an extrapolation"
        )

    def line(self) -> str:
        """One line with the value, for a command line."""
        what = "parameters" if self.quantity == "N" else "tokens"
        return (
            f"warning: {self.quantity} = {self.value:.3g} {what} lies beyond {EXTRAPOLATION_FACTOR:g}x the range the law "
            f"was fitted on ({self.low:.3g}..{self.high:.3g}): the prediction is an extrapolation"
        )


# ----------------------------------------------------------------------------- constants

COMPUTE_FACTOR = 6.0 / 16.0
"""k in the compute model C = k * P * N * D (FLOPs per parameter, per token, per bit):
6 FLOPs per parameter per token at 16 bits, scaled linearly with the precision P
(arXiv 2501.02423; docs/science.md section 4)."""

CHANNEL_LOG2_BLOCK = 13.1567
"""log2(B) that channel-wise scaling behaves like, as fitted in arXiv 2501.02423 (dimensionless)."""

DEFAULT_BLOCK_SIZE = 128
"""Block size used when none is given: the plugin's default (128 elements per FP32 scale)."""


def log2_block_size(
    block_size: Union[int, str],
    *,
    channel_log2: float = CHANNEL_LOG2_BLOCK,
    shared_elements: Optional[float] = None,
) -> float:
    """log2(B) for the Capybara law's block-size term.

    - an int B >= 1: log2(B) (B = 1, one scale per element, has no quantization penalty);
    - ``"channel"``: the paper's fitted value, ``channel_log2`` (13.1567 for the published law,
      fitted where the wgrad operand's channel spans a 2M-token batch);
    - ``"tensor"``: ``2 * channel_log2``. *Our approximation, not fitted in the paper*: one
      scale per tensor covers about (channel length)^2 elements of a square weight matrix,
      where a channel-wise scale covers one row, so its log2(B) is doubled. Refit with
      tensor-wise runs (``lightning_fpq.scaling.fitting.fit``) before relying on it.

    ``shared_elements``: for ``"channel"`` or ``"tensor"``, the number of elements that share
    one scale in the layer and batch at hand (e.g. the reduction length of a channel, or a
    tensor's numel); then log2(B) = log2(shared_elements) instead of the paper's constant.
    For an int block it must be None or equal to the block. ``None`` (no scaling) as a block
    is refused: the law was fitted on scaled blocks.
    """
    try:
        block = _config.block_size(block_size, allow_none=False)
    except ValueError as err:
        if block_size is None:
            raise ValueError(f"{err} (no scaling is outside the law, which was fitted on scaled blocks)") from None
        raise
    if shared_elements is not None:
        if (
            isinstance(shared_elements, bool)
            or not isinstance(shared_elements, (int, float, np.integer, np.floating))
            or not (math.isfinite(shared_elements) and shared_elements >= 1)
        ):
            raise ValueError(
                f"shared_elements={shared_elements!r} is not valid: expected a number >= 1 "
                "(the elements that share one scale), or None for the paper's constant"
            )
        if isinstance(block, int) and shared_elements != block:
            raise ValueError(
                f"shared_elements={shared_elements!r} contradicts block_size={block}: an int block is the number of "
                "elements per scale; give shared_elements only with 'channel' or 'tensor'"
            )
        return math.log2(shared_elements)
    if block == "channel":
        return float(channel_log2)
    if block == "tensor":
        return 2.0 * float(channel_log2)
    return math.log2(block)


# ------------------------------------------------------------------------ provenance


@dataclass(frozen=True)
class Provenance:
    """Where a law's constants come from: ``source`` is ``"paper"``, ``"fit"`` or ``"user"``.

    For a fit: ``rows`` used, the fit's ``rmse`` (nats, on the fitted rows), ``r2``, and
    ``heldout_rmse`` (nats, on rows kept out of the fit) when rows were held out.
    ``n_range`` and ``d_range``: the (smallest, largest) N and D the constants were fitted on
    (None: unknown, no extrapolation warning). ``block_sizes``: the block sizes of the fitted
    quantized rows (ints, ``"channel"``, ``"tensor"``; None: unknown). ``extra``: a mapping of further results, e.g. a
    fit's bootstrap intervals and its precision-unaware baseline (``fitting.fit``).
    """

    source: str = "user"
    citation: str = ""
    rows: Optional[int] = None
    rmse: Optional[float] = None
    r2: Optional[float] = None
    heldout_rmse: Optional[float] = None
    note: str = ""
    n_range: Optional[tuple[float, float]] = None
    d_range: Optional[tuple[float, float]] = None
    block_sizes: Optional[tuple[Union[int, str], ...]] = None
    extra: Optional[dict] = field(default=None, hash=False)

    SOURCES: ClassVar[tuple[str, ...]] = ("paper", "fit", "user")

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _config.choice(self.source, self.SOURCES, what="Provenance source"))
        _config.integer(self.rows, what="Provenance rows", low=0, optional=True)
        for name in ("n_range", "d_range"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                low = high = math.nan
            if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
                raise ValueError(
                    f"Provenance {name}={value!r} is not valid: expected None or [low, high] with 0 < low <= high"
                )
            object.__setattr__(self, name, (low, high))
        if self.block_sizes is not None:
            blocks = [_config.block_size(b, allow_none=False, what="Provenance block_sizes") for b in self.block_sizes]
            # ints ascending, then "channel" and "tensor": one order for equal sets
            order = sorted(set(blocks), key=lambda b: (isinstance(b, str), b if isinstance(b, int) else 0, str(b)))
            object.__setattr__(self, "block_sizes", tuple(order))
        if self.extra is not None and not isinstance(self.extra, dict):
            raise ValueError(f"Provenance extra={self.extra!r} is not valid: expected None or a mapping")

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


# ------------------------------------------------------------------ shared behaviour


class Law:
    """Constants, provenance, validation and YAML for every law (subclasses are frozen dataclasses).

    A subclass sets ``kind`` (the YAML ``kind``), ``PAPER`` (the published constants) and
    ``PAPER_PROVENANCE`` (their citation); constants named in ``_nonnegative`` may be 0, the
    others must be > 0.
    """

    kind: ClassVar[str] = ""
    _nonnegative: ClassVar[frozenset[str]] = frozenset()  # constants that may be 0 (others > 0)
    PAPER: ClassVar[dict[str, float]] = {}
    PAPER_PROVENANCE: ClassVar[Provenance] = Provenance(source="paper")

    # dataclass fields provided by subclasses
    provenance: Provenance

    def __post_init__(self) -> None:
        self._validate_constants()

    @classmethod
    def paper(cls) -> Law:
        """The law with its published constants (``PAPER``), cited in its provenance."""
        return cls(**cls.PAPER, provenance=cls.PAPER_PROVENANCE)

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
                raise ValueError(
                    f"{type(self).__name__} constant {name}={value!r} is not valid: expected a finite number {need}"
                )
        if not isinstance(self.provenance, Provenance):
            raise ValueError(f"provenance={self.provenance!r} is not a Provenance")

    def constants(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.constant_names()}

    def resampled(self) -> list[Law]:
        """The laws of a fit's bootstrap refits (``provenance.extra["bootstrap"]["samples"]``), to
        put an interval on any prediction: empty when the law has none."""
        boot = (self.provenance.extra or {}).get("bootstrap") or {}
        out = []
        for sample in boot.get("samples") or []:
            consts = {**self.constants(), **{k: v for k, v in sample.items() if k in self.constant_names()}}
            out.append(type(self)(**consts, provenance=Provenance(source="fit", note="bootstrap refit")))
        return out

    def extrapolation(self, N=None, D=None) -> list[ExtrapolationWarning]:
        """The warnings for N (parameters) and D (tokens) beyond 2x the range the law was fitted
        on (``provenance.n_range``/``d_range``); empty when inside or when the range is unknown."""
        out = []
        for name, values, rng in (("N", N, self.provenance.n_range), ("D", D, self.provenance.d_range)):
            if values is None or rng is None:
                continue
            arr = np.asarray(values, dtype=float)
            if arr.size == 0:
                continue
            low, high = rng
            lo_v, hi_v = float(np.nanmin(arr)), float(np.nanmax(arr))
            if lo_v < low / EXTRAPOLATION_FACTOR:
                out.append(ExtrapolationWarning(name, lo_v, low, high, type(self).__name__))
            elif hi_v > high * EXTRAPOLATION_FACTOR:
                out.append(ExtrapolationWarning(name, hi_v, low, high, type(self).__name__))
        return out

    def check_range(self, N=None, D=None, *, stacklevel: int = 3) -> list[ExtrapolationWarning]:
        """Warn (``warnings.warn``) each :meth:`extrapolation` warning; returns them."""
        found = self.extrapolation(N, D)
        for w in found:
            warnings.warn(w, stacklevel=stacklevel)
        return found

    def short_str(self) -> str:
        consts = ", ".join(f"{k}={v:.6g}" for k, v in self.constants().items())
        return f"{type(self).__name__}({consts}; {self.provenance.short_str()})"

    # ---------------------------------------------------------------- YAML
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "constants": self.constants(), "provenance": asdict(self.provenance)}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "law data") -> Law:
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
    def load(cls, path: Union[str, os.PathLike]) -> Law:
        """Read a law saved by :meth:`save`; :class:`LawFileError` (a ValueError) if it cannot."""
        return cls.from_dict(_read_law_file(path), source=f"law file {os.fspath(path)!r}")


NAMED_LAWS = ("paper", "demo-calibration")
"""Laws known by name: ``paper`` (the Capybara law's published constants) and the calibrations shipped
in ``lightning_fpq/scaling/calibrations/`` (``demo-calibration``: fitted to this project's CPU sweep)."""


def named_law_path(name: str) -> str:
    """The YAML shipped in ``lightning_fpq/scaling/calibrations/`` for a named law (``"demo-calibration"``)."""
    from importlib.resources import files

    path = files("lightning_fpq.scaling") / "calibrations" / f"{name.replace('-', '_')}.yaml"
    if not path.is_file():
        raise ValueError(f"law {name!r} is not shipped with this installation (no {path})")
    return str(path)


def resolve_named_law(law: Union[None, str, os.PathLike]) -> Law:
    """None or ``"paper"`` -> the paper's Capybara law; another name of :data:`NAMED_LAWS` -> its shipped
    calibration; else the path of a law YAML file (any kind). ValueError naming the choices otherwise."""
    from .capybara import CapybaraLaw

    if law is None or law == "paper":
        return CapybaraLaw.paper()
    if isinstance(law, str) and law in NAMED_LAWS:
        return load_law(named_law_path(law))
    if isinstance(law, (str, os.PathLike)):
        if not os.path.isfile(law):
            raise LawFileError(
                f"cannot read law file {os.fspath(law)!r}: no such file (named laws: {', '.join(NAMED_LAWS)})"
            )
        return load_law(law)
    raise ValueError(
        f"law={law!r} is not valid: expected one of {list(NAMED_LAWS)} or the path of an existing law YAML file "
        "(written by law.save or lightning-fpq fit --out)"
    )


class NoCriticalDataSize:
    """For a law without a D-dependent quantization penalty (Kumar, Chinchilla): the loss falls
    monotonically in D, so there is no critical data size and every token is worth a full one."""

    def critical_data_size(self, N, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """inf (tokens): without a D-dependent penalty the loss falls monotonically in D."""
        N = positive_array("N", N)
        format_or_none(fmt), log2_block_size(block_size)
        return scalar_or_array(np.full_like(N, np.inf))

    def token_value(self, N, D, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """1.0: this law has no D-dependent quantization penalty, so a token is worth what it is unquantized."""
        N, D = positive_array("N", N), positive_array("D", D)
        format_or_none(fmt), log2_block_size(block_size)
        return scalar_or_array(np.ones(np.broadcast_shapes(N.shape, D.shape)))


def _read_law_file(path: Union[str, os.PathLike]) -> dict:
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


def load_law(path: Union[str, os.PathLike]) -> Law:
    """Load any law saved with ``law.save(path)``, dispatching on its ``kind`` field."""
    from .capybara import CapybaraLaw, CeilingLaw  # the laws import this module: import them when asked
    from .chinchilla import ChinchillaLaw
    from .kumar import KumarLaw

    data = _read_law_file(path)
    kinds = {cls.kind: cls for cls in (CapybaraLaw, KumarLaw, ChinchillaLaw, CeilingLaw)}
    kind = data.get("kind")
    if kind not in kinds:
        raise LawFileError(f"law file {os.fspath(path)!r}: kind {kind!r} is not one of {sorted(kinds)}")
    return kinds[kind].from_dict(data, source=f"law file {os.fspath(path)!r}")
