"""The floating-point quantization training law of Sun et al., "Scaling Laws for Floating-Point
Quantization Training", arXiv 2501.02423 (ICML 2025)::

    L(N, D, E, M, B) = n / N^a + d / D^b + eps
                       + (D^b / N^a) * log2(B) / (g * (E + 0.5)^dl * (M + 0.5)^nu)

N = parameters, D = training tokens, E/M = exponent/mantissa bits, B = block size.
The last term (the *quantization penalty*) grows with D, so the loss has a minimum in D:
the critical data size ``D_crit``, past which more tokens make the model worse.

The formulas are small pure functions of numpy arrays (``capybara_*``); :class:`CapybaraLaw`
holds the constants and converts formats and block sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import numpy as np

from lightning_fpq.formats import MAX_EBITS, MAX_MBITS, FormatLike, FPFormat

from .inputs import check_bits, format_or_none, positive_array, scalar_or_array
from .law import CHANNEL_LOG2_BLOCK, DEFAULT_BLOCK_SIZE, NoCriticalDataSize, Provenance, log2_block_size
from .planning import PrecisionLaw

__all__ = [
    "FORMATS_IN_USE",
    "CapybaraLaw",
    "CeilingLaw",
    "ceiling_loss",
    "canonical_em",
    "capybara_critical_data_size",
    "capybara_loss",
    "capybara_precision_factor",
]

FORMATS_IN_USE: tuple[str, ...] = ("e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "e3m4", "fp16", "bf16", "fp32")
"""The formats hardware and libraries actually run, which :meth:`CapybaraLaw.optimal_format` and the
planners choose among unless told otherwise: OCP MX FP4 E2M1, FP6 E2M3/E3M2, OCP FP8 E4M3/E5M2,
FP8 E3M4 (ml_dtypes ``float8_e3m4``), IEEE FP16, BF16 and FP32 (docs/science.md section 4)."""


def canonical_em(ebits: int, mbits: int) -> tuple[int, int]:
    """The (E, M) the law evaluates for a format: E0My -> E1M(y-1), every other pair unchanged.

    In this quantizer E0My (sign-magnitude integers 0..2^y - 1) and E1M(y-1) (subnormals
    0..2^(y-1) - 1 then normals, step constant) have the same value grid up to a factor, and block
    scaling divides that factor out: the two quantize every tensor identically. The law's
    (E+0.5)^dl (M+0.5)^nu tells them apart, so it sees each grid through one representative,
    the one with E >= 1 (the paper fitted E >= 1 only; docs/science.md section 4).
    """
    if ebits == 0 and mbits >= 1:
        return 1, mbits - 1
    return ebits, mbits


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
        base = (
            d
            * g
            * np.asarray(N, dtype=float) ** a
            * capybara_precision_factor(E, M, dl, nu)
            / np.asarray(log2b, dtype=float)
        )
    return base ** (1.0 / (2.0 * b))


# -------------------------------------------------------------------- Capybara law


@dataclass(frozen=True)
class FloatLawConstants(PrecisionLaw):
    """The constants the two float laws of this module share (the Capybara law's symbols): n, a
    (parameter term), d, b (data term), eps (irreducible loss), g, dl, nu (the precision term),
    and the log2 B of channel-wise scaling."""

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

    _nonnegative: ClassVar[frozenset[str]] = frozenset({"eps", "dl", "nu"})
    FITTED: ClassVar[tuple[str, ...]] = ("n", "a", "d", "b", "eps", "g", "dl", "nu")

    def _max_bits(self) -> int:
        return 1 + MAX_EBITS + MAX_MBITS

    # hooks both laws share: how a block size and a format enter them (each law combines them
    # with its own ``_loss_from_factor``)
    def _log2b(self, block_size: Union[int, str], shared_elements: Optional[float] = None) -> float:
        return log2_block_size(block_size, channel_log2=self.channel_log2_block, shared_elements=shared_elements)

    def _format_factor(self, fmt: Optional[FPFormat]) -> float:
        if fmt is None:
            return math.inf  # no quantization: the precision term vanishes (f = 1 for the ceiling law)
        return float(capybara_precision_factor(*canonical_em(fmt.ebits, fmt.mbits), self.dl, self.nu))

    def _relaxed_factor(self, bits: np.ndarray) -> np.ndarray:
        # real-valued best split: E + 0.5 = dl P/(dl+nu), M + 0.5 = nu P/(dl+nu)
        s = self.dl + self.nu
        bits = np.asarray(bits, dtype=float)
        return (self.dl * bits / s) ** self.dl * (self.nu * bits / s) ** self.nu

    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        """The loss (nats/token) for a format factor and log2 B: each law's own formula."""
        raise NotImplementedError

    def loss(
        self,
        N,
        D,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ):
        """Predicted final loss (nats/token) of N parameters trained on D tokens in ``fmt``.

        Warns :class:`~lightning_fpq.scaling.law.ExtrapolationWarning` when N or D lies beyond 2x
        the range the law was fitted on (``provenance.n_range``/``d_range``)."""
        N, D = positive_array("N", N), positive_array("D", D)
        self.check_range(N, D)
        return scalar_or_array(
            self._loss_from_factor(
                N, D, self._format_factor(format_or_none(fmt)), self._log2b(block_size, shared_elements)
            )
        )


@dataclass(frozen=True)
class CapybaraLaw(FloatLawConstants):
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
    :func:`~lightning_fpq.scaling.law.log2_block_size` for the tensor-wise approximation).
    N and D accept numpy arrays (broadcast together); scalars in give floats out.

    Compute-optimal precision (:meth:`optimal_precision`): with the published constants and
    128-element blocks the joint optimum stays between 4 and 8 bits for C in 1e21..1e31 FLOPs;
    with channel-wise scaling (log2 B = 13.16) it reaches 8.4 bits at 1e31.

    >>> law = CapybaraLaw.paper()
    >>> round(law.critical_data_size(1e9, "e2m1", 128) / 1e9)  # tokens
    393
    """

    kind: ClassVar[str] = "capybara"
    # the published constants of Sun et al., arXiv 2501.02423 (the unified Capybara law; docs/science.md section 4)
    PAPER: ClassVar[dict[str, float]] = dict(
        n=69.2343,
        a=0.2368,
        d=68973.0621,
        b=0.5162,
        eps=1.9061,
        g=11334.5197,
        dl=3.1926,
        nu=2.9543,
        channel_log2_block=CHANNEL_LOG2_BLOCK,
    )
    PAPER_PROVENANCE: ClassVar[Provenance] = Provenance(
        source="paper",
        citation="Sun et al., Scaling Laws for Floating-Point Quantization Training, arXiv 2501.02423 (ICML 2025)",
        rows=358,
        note="LLaMA 41M-679M parameters, 10B-100B Dolma tokens, AdamW lr 3e-4 cosine, 2M-token batches",
        n_range=(41e6, 679e6),
        d_range=(1e10, 1e11),
    )

    # -------------------------------------------------------------- hooks
    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        with np.errstate(divide="ignore"):
            penalty = D**self.b / N**self.a * log2b / (self.g * np.asarray(factor, dtype=float))
        return self.n / N**self.a + self.d / D**self.b + self.eps + penalty

    # -------------------------------------------------------------- the law
    def quantization_penalty(
        self,
        N,
        D,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ):
        """The law's last term (nats/token): the loss ``fmt`` adds over unquantized training."""
        N, D = positive_array("N", N), positive_array("D", D)
        self.check_range(N, D)
        return scalar_or_array(self._penalty(N, D, fmt, self._log2b(block_size, shared_elements)))

    def _penalty(self, N: np.ndarray, D: np.ndarray, fmt: Optional[FormatLike], log2b: float) -> np.ndarray:
        return D**self.b / N**self.a * log2b / (self.g * self._format_factor(format_or_none(fmt)))

    def _critical(self, N: np.ndarray, fmt: Optional[FormatLike], log2b: float) -> np.ndarray:
        fmt = format_or_none(fmt)
        if fmt is None or log2b == 0.0:
            return np.full_like(N, np.inf)
        E, M = canonical_em(fmt.ebits, fmt.mbits)
        return capybara_critical_data_size(N, E, M, log2b, **self.constants())

    def critical_data_size(
        self,
        N,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ):
        """D_crit (tokens): where the loss is lowest; more tokens in ``fmt`` past it raise the loss.

        ``D_crit = [d g N^a (E+0.5)^dl (M+0.5)^nu / log2 B]^(1/(2b))`` (arXiv 2501.02423).
        Unquantized (``fmt=None``) or B = 1: inf.
        """
        N = positive_array("N", N)
        self.check_range(N)
        return scalar_or_array(self._critical(N, fmt, self._log2b(block_size, shared_elements)))

    # ------------------------------------------------ recipes with several quantized operands
    #: the number of quantized operands of the setup the law was fitted on (P2, P4, P6)
    FITTED_OPERANDS: ClassVar[int] = 3

    def operand_factor(
        self,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ) -> float:
        """One quantized operand's share of the penalty, ``log2 B / ((E+0.5)^dl (M+0.5)^nu)`` divided
        by the 3 operands of the fitted setup (0 for an unquantized one). Summed over a recipe's
        quantized operands it replaces ``log2 B / ((E+0.5)^dl (M+0.5)^nu)`` in the law: exact for
        the ``paper`` recipe (three equal operands), an assumption elsewhere (docs/science.md
        section 4: the operands' penalties add). ``shared_elements``: as in :meth:`loss`."""
        fmt = format_or_none(fmt)
        if fmt is None:
            return 0.0
        return self._log2b(block_size, shared_elements) / self._format_factor(fmt) / self.FITTED_OPERANDS

    def recipe_loss(self, N, D, factor: float):
        """The law's loss (nats/token) for a recipe whose operand factors sum to ``factor``."""
        N, D = positive_array("N", N), positive_array("D", D)
        return scalar_or_array(self._loss_from_factor(N, D, 1.0, factor))

    def recipe_critical_data_size(self, N, factor: float):
        """D_crit (tokens) for a recipe whose operand factors sum to ``factor``:
        ``[d g N^a / factor]^(1/(2b))``; inf when nothing is quantized (``factor == 0``)."""
        N = positive_array("N", N)
        if factor <= 0:
            return scalar_or_array(np.full_like(N, np.inf))
        return scalar_or_array((self.d * self.g * N**self.a / factor) ** (1.0 / (2.0 * self.b)))

    def token_value(
        self,
        N,
        D,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ):
        """What one more token is worth in ``fmt``, relative to unquantized training (dimensionless).

        The ratio of dL/dlog D with and without the penalty term:
        ``(b T_D - b T_Q) / (b T_D) = 1 - (D / D_crit)^(2b)``, where T_D = d/D^b is the data
        term and T_Q the penalty. 1 = as useful as unquantized; 0 at D_crit; negative past
        it (more tokens raise the loss).
        """
        N, D = positive_array("N", N), positive_array("D", D)
        self.check_range(N, D)
        d_crit = self._critical(N, fmt, self._log2b(block_size, shared_elements))
        return scalar_or_array(1.0 - (D / d_crit) ** (2.0 * self.b))

    def min_loss(
        self,
        N,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ):
        """The lowest loss N parameters reach in ``fmt`` (nats/token): the loss at D_crit.

        At D_crit the data term equals the penalty, so L_min = n/N^a + eps + 2 d / D_crit^b.
        """
        N = positive_array("N", N)
        self.check_range(N)
        d_crit = self._critical(N, fmt, self._log2b(block_size, shared_elements))
        with np.errstate(divide="ignore"):
            return scalar_or_array(self.n / N**self.a + self.eps + 2.0 * self.d / d_crit**self.b)

    def optimal_split(self, bits: int) -> tuple[float, float]:
        """Real-valued best (E, M) for ``bits`` total bits: E_opt = dl P/(dl+nu) - 0.5,
        M_opt = nu P/(dl+nu) - 0.5 (arXiv 2501.02423; they sum to P - 1)."""
        bits = check_bits(bits, 1 + MAX_EBITS + MAX_MBITS)
        s = self.dl + self.nu
        return self.dl * bits / s - 0.5, self.nu * bits / s - 0.5

    def optimal_format(self, bits: int, *, any_split: bool = False) -> FPFormat:
        """The format of ``bits`` total bits (1 sign + E + M) with the smallest quantization penalty.

        By default only the formats in use (:data:`FORMATS_IN_USE`) compete, and a width with
        none of them (2, 3, 5, 7, 9..15, 17..31 bits) is a ValueError. ``any_split=True`` lets
        every split with E + M = bits - 1 (E in 1..8, M <= 23) compete instead: E0My is left
        out because it is the same grid as E1M(y-1) (:func:`canonical_em`). The winner minimises
        1/((E+0.5)^dl (M+0.5)^nu); it is parsed from its "eXmY" name, so a hardware format
        carries its special-value mode (e4m3 -> OCP E4M3FN, e8m7 -> BF16), which the law ignores.
        """
        bits = check_bits(bits, 1 + MAX_EBITS + MAX_MBITS)
        if any_split:
            pairs = [(e, bits - 1 - e) for e in range(1, bits) if e <= MAX_EBITS and bits - 1 - e <= MAX_MBITS]
            if not pairs:  # bits = 2: E1M0 (= E0M1) is the only grid
                pairs = [(1, 0)]
            cands = [FPFormat.parse(f"e{e}m{m}") for e, m in pairs]
        else:
            cands = [f for f in (FPFormat.parse(n) for n in FORMATS_IN_USE) if f.bits == bits]
            if not cands:
                widths = ", ".join(f"{n} ({FPFormat.parse(n).bits})" for n in FORMATS_IN_USE)
                raise ValueError(
                    f"bits={bits} is not valid: no format in use has {bits} bits (in use: {widths}); "
                    "pass any_split=True to consider every ExMy split"
                )
        return max(cands, key=self._format_factor)

    def _plan_formats(self, any_split: bool = False) -> list[FPFormat]:
        """The planners' integer candidates: the formats in use, or every width's best split."""
        if any_split:
            return [self.optimal_format(p, any_split=True) for p in range(2, self._max_bits() + 1)]
        return [FPFormat.parse(n) for n in FORMATS_IN_USE]

    def effective_params(
        self,
        N,
        D,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ):
        """N_eff: the unquantized model size with the same predicted loss at the same D (parameters).

        Solves n/N_eff^a = n/N^a + penalty(N, D, fmt, B):
        ``N_eff = (n / (n N^-a + penalty))^(1/a)``. Unlike Kumar's N_eff it depends on D,
        because the Capybara penalty grows with the data.
        """
        N, D = positive_array("N", N), positive_array("D", D)
        self.check_range(N, D)
        penalty = self._penalty(N, D, fmt, self._log2b(block_size, shared_elements))
        return scalar_or_array((self.n / (self.n * N ** (-self.a) + penalty)) ** (1.0 / self.a))


# ------------------------------------------------- a law without a loss minimum in D


def ceiling_loss(N, D, E, M, log2b, *, n, a, d, b, eps, g, dl, nu, **_unused) -> np.ndarray:
    """The effective-parameter ceiling law, elementwise (nats/token; docs/science.md section 8):

    L = n / (N f)^a + d / D^b + eps,  f = 1 - exp(-g (E+0.5)^dl (M+0.5)^nu / log2 B)

    (f = 1 for log2 B = 0: one scale per element, or no quantization)."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    log2b = np.asarray(log2b, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        f = np.where(log2b > 0, -np.expm1(-g * capybara_precision_factor(E, M, dl, nu) / log2b), 1.0)
        return n / (N * f) ** a + d / D**b + eps


@dataclass(frozen=True)
class CeilingLaw(NoCriticalDataSize, FloatLawConstants):
    """A precision-aware law for floats **without** a loss minimum in D: quantization lowers the
    effective parameter count, as in Kumar et al. (arXiv 2411.04330), and nothing grows with D::

        L = n / (N f)^a + d / D^b + eps,   f = 1 - exp(-g (E+0.5)^dl (M+0.5)^nu / log2 B)

    The alternative the protocol of docs/science.md section 9 fits beside the Capybara law, to see
    which predicts held-out runs better (``fitting.fit(kind="ceiling")``). It has no published
    constants: :meth:`paper` returns starting values for fits (the Capybara law's n, a, d, b,
    eps, dl, nu and g = 0.1), not a law anyone measured. Formats are mapped like the Capybara
    law's (:func:`canonical_em`); its critical data size is inf.
    """

    kind: ClassVar[str] = "ceiling"
    PAPER: ClassVar[dict[str, float]] = {**CapybaraLaw.PAPER, "g": 0.1}  # starting values, see above
    PAPER_PROVENANCE: ClassVar[Provenance] = Provenance(
        source="user", note="no published constants: starting values for fits (docs/science.md section 8)"
    )

    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        factor = np.asarray(factor, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            x = np.where(np.isinf(factor) | (log2b == 0), np.inf, self.g * factor / (log2b if log2b else 1.0))
            f = -np.expm1(-x)
            return (
                self.n / (np.asarray(N, dtype=float) * f) ** self.a
                + self.d / np.asarray(D, dtype=float) ** self.b
                + self.eps
            )

    def min_loss(
        self,
        N,
        fmt: Optional[FormatLike],
        block_size: Union[int, str] = DEFAULT_BLOCK_SIZE,
        *,
        shared_elements: Optional[float] = None,
    ):
        """The D -> inf limit, n / (N f)^a + eps (nats/token)."""
        N = positive_array("N", N)
        self.check_range(N)
        factor = self._format_factor(format_or_none(fmt))
        big = np.full_like(N, np.inf)
        return scalar_or_array(self._loss_from_factor(N, big, factor, self._log2b(block_size, shared_elements)))

    def optimal_format(self, bits: int, *, any_split: bool = False) -> FPFormat:
        """As :meth:`CapybaraLaw.optimal_format`: the largest (E+0.5)^dl (M+0.5)^nu among the formats
        in use of that width (or every E >= 1 split with ``any_split=True``)."""
        return CapybaraLaw.optimal_format(self, bits, any_split=any_split)  # type: ignore[arg-type]

    def _plan_formats(self, any_split: bool = False) -> list[FPFormat]:
        return CapybaraLaw._plan_formats(self, any_split)  # type: ignore[arg-type]
