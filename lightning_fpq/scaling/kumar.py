"""The precision-aware scaling law for integer formats of Kumar et al., "Scaling Laws for
Precision", arXiv 2411.04330 (ICLR 2025): quantized training, forward pass only."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import numpy as np

from lightning_fpq.formats import MAX_MBITS, FormatLike, FPFormat

from .chinchilla import ChinchillaForm
from .inputs import check_bits, format_or_none, positive_array, scalar_or_array
from .law import DEFAULT_BLOCK_SIZE, NoCriticalDataSize, Provenance, log2_block_size
from .planning import PrecisionLaw

__all__ = ["KumarLaw", "PrecisionFactorClamped"]


class PrecisionFactorClamped(UserWarning):
    """A precision below Kumar et al.'s fitted range: an N_eff factor ``1 - exp(-P/g + n)`` was <= 0
    and was clamped to 0 (N_eff = 0, loss = inf: the law predicts a run that does not train)."""


def kumar_factor(P_w, P_a, P_kv, *, g_w, g_a, g_kv, n_w, n_a, n_kv, **_unused) -> np.ndarray:
    """N_eff / N = prod_x max(0, 1 - exp(-P_x / g_x + n_x)) (arXiv 2411.04330, Appendix K, Table 2).

    Each factor reaches 0 at P_x = g_x n_x (3.11 bits for activations and 2.32 for the KV
    cache with the published constants) and would turn negative below: it is clamped to 0.
    """
    out = np.ones(np.broadcast_shapes(np.shape(P_w), np.shape(P_a), np.shape(P_kv)))
    for P, g, n in ((P_w, g_w, n_w), (P_a, g_a, n_a), (P_kv, g_kv, n_kv)):
        out = out * np.maximum(0.0, 1.0 - np.exp(-np.asarray(P, dtype=float) / g + n))
    return out


@dataclass(frozen=True)
class KumarLaw(NoCriticalDataSize, PrecisionLaw, ChinchillaForm):
    """Precision-aware scaling law for integer formats of Kumar et al., arXiv 2411.04330.

    ``L = A N_eff^-alpha + B D^-beta + E``, with
    ``N_eff = N (1 - exp(-P_w/g_w + n_w)) (1 - exp(-P_a/g_a + n_a)) (1 - exp(-P_kv/g_kv + n_kv))``;
    the offsets n_x are the paper's Appendix K, Table 2 fit (the main text omits them). A
    factor is clamped at 0 below P_x = g_x n_x (3.11 bits for activations): N_eff = 0, loss
    inf, with a :class:`PrecisionFactorClamped` warning from the public methods.
    Quantized training only (forward pass: weights, activations, KV cache); the
    post-training-quantization term delta_PTQ is 0 here. A format gives its bit count P to
    all three operands; the law knows integer precision only, so an FP format's E/M split is
    ignored and its block size has no effect (the argument is accepted so that calls are
    interchangeable with :class:`~lightning_fpq.scaling.capybara.CapybaraLaw`). Having no
    D-dependent penalty, it has no critical data size (inf). With the published constants,
    alpha = beta and C = (6/16) P N D, the joint compute-optimal precision is independent of
    C: it minimises P / f(P), where f is the N_eff factor: 7.0 bits (the paper's "7-8 bits").
    The offsets are not fitted by :func:`~lightning_fpq.scaling.fitting.fit` (rows with one
    precision for all operands cannot separate them from the g_x): they stay at the paper's.
    """

    g_w: float
    g_a: float
    g_kv: float
    n_w: float = 0.3037
    n_a: float = 1.4072
    n_kv: float = 2.4185
    provenance: Provenance = Provenance()

    kind: ClassVar[str] = "kumar"
    FITTED: ClassVar[tuple[str, ...]] = ("A", "alpha", "B", "beta", "E", "g_w", "g_a", "g_kv")
    # the published constants of Kumar et al., arXiv 2411.04330 (docs/science.md section 5)
    PAPER: ClassVar[dict[str, float]] = dict(
        A=4.299e3,
        alpha=0.4965,
        B=1.806e4,
        beta=0.4965,
        E=2.7648,
        g_w=2.6745,
        g_a=2.2102,
        g_kv=0.9578,
        n_w=0.3037,
        n_a=1.4072,
        n_kv=2.4185,
    )
    PAPER_PROVENANCE: ClassVar[Provenance] = Provenance(
        source="paper",
        citation="Kumar et al., Scaling Laws for Precision, arXiv 2411.04330 (ICLR 2025)",
        note="integer formats, quantized training of weights, activations and KV cache",
    )

    def _log2b(self, block_size: Union[int, str], shared_elements: Optional[float] = None) -> float:
        # validated for interchangeability; unused by the law
        return log2_block_size(block_size, shared_elements=shared_elements)

    def precision_factor(self, P_w, P_a=None, P_kv=None):
        """N_eff / N = prod max(0, 1 - exp(-P_x / g_x + n_x)) (dimensionless); P_a, P_kv default to P_w.

        Warns :class:`PrecisionFactorClamped` when a factor was clamped to 0."""
        P_w = positive_array("P_w", P_w)
        P_a = P_w if P_a is None else positive_array("P_a", P_a)
        P_kv = P_w if P_kv is None else positive_array("P_kv", P_kv)
        factor = kumar_factor(P_w, P_a, P_kv, **self.constants())
        if np.any(factor <= 0):
            self._warn_clamped(float(np.min(np.broadcast_to(P_w, factor.shape)[factor <= 0])))
        return scalar_or_array(factor)

    def _warn_clamped(self, bits: float) -> None:
        warnings.warn(
            f"KumarLaw: at {bits:g} bits an N_eff factor 1 - exp(-P/g + n) is <= 0 (zero at "
            f"{self.g_w * self.n_w:.2f}/{self.g_a * self.n_a:.2f}/{self.g_kv * self.n_kv:.2f} bits for "
            "weights/activations/KV cache): clamped to 0, so N_eff = 0 and the loss is inf "
            "(below the range the law was fitted on)",
            PrecisionFactorClamped,
            stacklevel=3,
        )

    def _format_factor(self, fmt: Optional[FPFormat]) -> float:
        if fmt is None:
            return 1.0
        bits = float(fmt.bits)
        return float(kumar_factor(bits, bits, bits, **self.constants()))

    def _public_factor(self, fmt: Optional[FPFormat]) -> float:
        factor = self._format_factor(fmt)
        if fmt is not None and factor <= 0:
            self._warn_clamped(float(fmt.bits))
        return factor

    def _relaxed_factor(self, bits: np.ndarray) -> np.ndarray:
        bits = np.asarray(bits, dtype=float)
        return kumar_factor(bits, bits, bits, **self.constants())

    def _loss_from_factor(self, N, D, factor, log2b) -> np.ndarray:
        n_eff = np.asarray(N, dtype=float) * np.asarray(factor, dtype=float)
        with np.errstate(divide="ignore"):
            return self.A * n_eff ** (-self.alpha) + self.B * np.asarray(D, dtype=float) ** (-self.beta) + self.E

    def _max_bits(self) -> int:
        return 1 + MAX_MBITS  # an E0My integer format has at most 23 magnitude bits

    def loss(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Predicted loss (nats/token); ``fmt=None`` is unquantized (N_eff = N)."""
        N, D = positive_array("N", N), positive_array("D", D)
        self._log2b(block_size)
        self.check_range(N, D)
        return scalar_or_array(self._loss_from_factor(N, D, self._public_factor(format_or_none(fmt)), 0.0))

    def effective_params(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Kumar's N_eff (parameters). D is validated but unused: this N_eff does not depend on data."""
        N, _ = positive_array("N", N), positive_array("D", D)
        self._log2b(block_size)
        return scalar_or_array(N * self._public_factor(format_or_none(fmt)))

    def min_loss(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The D -> inf limit, A N_eff^-alpha + E (nats/token)."""
        N = positive_array("N", N)
        self._log2b(block_size)
        with np.errstate(divide="ignore"):
            return scalar_or_array(self.A * (N * self._public_factor(format_or_none(fmt))) ** (-self.alpha) + self.E)

    def optimal_format(self, bits: int, *, any_split: bool = False) -> FPFormat:
        """The integer format of ``bits`` bits: sign + (bits - 1) magnitude bits, i.e. E0M(bits-1)
        (``any_split`` is accepted for interchangeability with the Capybara law: every width is an integer format)."""
        bits = check_bits(bits, self._max_bits())
        return FPFormat(ebits=0, mbits=bits - 1)
