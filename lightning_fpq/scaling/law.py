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
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Optional, Union

import numpy as np

from lightning_fpq import _config
from lightning_fpq.formats import FormatLike

from .inputs import format_or_none, positive_array, scalar_or_array

__all__ = [
    "CHANNEL_LOG2_BLOCK",
    "COMPUTE_FACTOR",
    "DEFAULT_BLOCK_SIZE",
    "Law",
    "LawFileError",
    "NoCriticalDataSize",
    "Provenance",
    "load_law",
    "log2_block_size",
]

# ----------------------------------------------------------------------------- constants

COMPUTE_FACTOR = 6.0 / 16.0
"""k in the compute model C = k * P * N * D (FLOPs per parameter, per token, per bit):
6 FLOPs per parameter per token at 16 bits, scaled linearly with the precision P
(arXiv 2501.02423; docs/science.md section 4)."""

CHANNEL_LOG2_BLOCK = 13.1567
"""log2(B) that channel-wise scaling behaves like, as fitted in arXiv 2501.02423 (dimensionless)."""

DEFAULT_BLOCK_SIZE = 128
"""Block size used when none is given: the plugin's default (128 elements per FP32 scale)."""


def log2_block_size(block_size: Union[int, str], *, channel_log2: float = CHANNEL_LOG2_BLOCK) -> float:
    """log2(B) for the Capybara law's block-size term.

    - an int B >= 1: log2(B) (B = 1, one scale per element, has no quantization penalty);
    - ``"channel"``: the paper's fitted value, ``channel_log2`` (13.1567 for the published law);
    - ``"tensor"``: ``2 * channel_log2``. *Our approximation, not fitted in the paper*: one
      scale per tensor covers about (channel length)^2 elements of a square weight matrix,
      where a channel-wise scale covers one row, so its log2(B) is doubled. Refit with
      tensor-wise runs (``lightning_fpq.scaling.fitting.fit``) before relying on it.

    ``None`` (no scaling) is refused: the law was fitted on scaled blocks.
    """
    try:
        block = _config.block_size(block_size, allow_none=False)
    except ValueError as err:
        if block_size is None:
            raise ValueError(f"{err} (no scaling is outside the law, which was fitted on scaled blocks)") from None
        raise
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
        object.__setattr__(self, "source", _config.choice(self.source, self.SOURCES, what="Provenance source"))
        _config.integer(self.rows, what="Provenance rows", low=0, optional=True)

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
    from .capybara import CapybaraLaw  # the laws import this module: import them when asked
    from .chinchilla import ChinchillaLaw
    from .kumar import KumarLaw

    data = _read_law_file(path)
    kinds = {cls.kind: cls for cls in (CapybaraLaw, KumarLaw, ChinchillaLaw)}
    kind = data.get("kind")
    if kind not in kinds:
        raise LawFileError(f"law file {os.fspath(path)!r}: kind {kind!r} is not one of {sorted(kinds)}")
    return kinds[kind].from_dict(data, source=f"law file {os.fspath(path)!r}")
