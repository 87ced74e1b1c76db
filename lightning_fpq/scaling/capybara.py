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
from .law import CHANNEL_LOG2_BLOCK, DEFAULT_BLOCK_SIZE, Provenance, log2_block_size
from .planning import PrecisionLaw

__all__ = ["CapybaraLaw", "capybara_critical_data_size", "capybara_loss", "capybara_precision_factor"]


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
class CapybaraLaw(PrecisionLaw):
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

    # -------------------------------------------------------------- the law
    def loss(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Predicted final loss (nats/token) of N parameters trained on D tokens in ``fmt``."""
        N, D = positive_array("N", N), positive_array("D", D)
        return scalar_or_array(
            self._loss_from_factor(N, D, self._format_factor(format_or_none(fmt)), self._log2b(block_size))
        )

    def quantization_penalty(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The law's last term (nats/token): the loss ``fmt`` adds over unquantized training."""
        N, D = positive_array("N", N), positive_array("D", D)
        factor = self._format_factor(format_or_none(fmt))
        return scalar_or_array(D**self.b / N**self.a * self._log2b(block_size) / (self.g * factor))

    def critical_data_size(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """D_crit (tokens): where the loss is lowest; more tokens in ``fmt`` past it raise the loss.

        ``D_crit = [d g N^a (E+0.5)^dl (M+0.5)^nu / log2 B]^(1/(2b))`` (arXiv 2501.02423).
        Unquantized (``fmt=None``) or B = 1: inf.
        """
        N = positive_array("N", N)
        fmt = format_or_none(fmt)
        log2b = self._log2b(block_size)
        if fmt is None or log2b == 0.0:
            return scalar_or_array(np.full_like(N, np.inf))
        return scalar_or_array(capybara_critical_data_size(N, fmt.ebits, fmt.mbits, log2b, **self.constants()))

    def token_value(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """What one more token is worth in ``fmt``, relative to unquantized training (dimensionless).

        The ratio of dL/dlog D with and without the penalty term:
        ``(b T_D - b T_Q) / (b T_D) = 1 - (D / D_crit)^(2b)``, where T_D = d/D^b is the data
        term and T_Q the penalty. 1 = as useful as unquantized; 0 at D_crit; negative past
        it (more tokens raise the loss).
        """
        N, D = positive_array("N", N), positive_array("D", D)
        d_crit = np.asarray(self.critical_data_size(N, fmt, block_size), dtype=float)
        return scalar_or_array(1.0 - (D / d_crit) ** (2.0 * self.b))

    def min_loss(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The lowest loss N parameters reach in ``fmt`` (nats/token): the loss at D_crit.

        At D_crit the data term equals the penalty, so L_min = n/N^a + eps + 2 d / D_crit^b.
        """
        N = positive_array("N", N)
        d_crit = np.asarray(self.critical_data_size(N, fmt, block_size), dtype=float)
        with np.errstate(divide="ignore"):
            return scalar_or_array(self.n / N**self.a + self.eps + 2.0 * self.d / d_crit**self.b)

    def optimal_split(self, bits: int) -> tuple[float, float]:
        """Real-valued best (E, M) for ``bits`` total bits: E_opt = dl P/(dl+nu) - 0.5,
        M_opt = nu P/(dl+nu) - 0.5 (arXiv 2501.02423; they sum to P - 1)."""
        bits = check_bits(bits, 1 + MAX_EBITS + MAX_MBITS)
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
        bits = check_bits(bits, 1 + MAX_EBITS + MAX_MBITS)
        best = min(
            ((e, bits - 1 - e) for e in range(0, bits) if e <= MAX_EBITS and bits - 1 - e <= MAX_MBITS),
            key=lambda em: -((em[0] + 0.5) ** self.dl) * (em[1] + 0.5) ** self.nu,
        )
        return FPFormat.parse(f"e{best[0]}m{best[1]}")

    def precision_parameter_tradeoff(self, P_from, P_to):
        """Factor on N when moving from P_from to P_to bits at fixed compute (dimensionless).

        Runs that end exactly at D_crit with C = k P N D satisfy (substitute D = C/(kPN) in
        D_crit^(2b) ∝ N^a P^(dl+nu), with the real-valued best split)
        ``P^(dl+nu+2b) * N^(a+2b) = const`` (docs/science.md section 4), hence
        ``N_to / N_from = (P_from / P_to)^((dl+nu+2b)/(a+2b))``.
        """
        P_from, P_to = positive_array("P_from", P_from), positive_array("P_to", P_to)
        return scalar_or_array((P_from / P_to) ** ((self.dl + self.nu + 2 * self.b) / (self.a + 2 * self.b)))

    def effective_params(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """N_eff: the unquantized model size with the same predicted loss at the same D (parameters).

        Solves n/N_eff^a = n/N^a + penalty(N, D, fmt, B):
        ``N_eff = (n / (n N^-a + penalty))^(1/a)``. Unlike Kumar's N_eff it depends on D,
        because the Capybara penalty grows with the data.
        """
        N, D = positive_array("N", N), positive_array("D", D)
        penalty = np.asarray(self.quantization_penalty(N, D, fmt, block_size), dtype=float)
        return scalar_or_array((self.n / (self.n * N ** (-self.a) + penalty)) ** (1.0 / self.a))
