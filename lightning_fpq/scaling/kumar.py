"""The precision-aware scaling law for integer formats of Kumar et al., "Scaling Laws for
Precision", arXiv 2411.04330 (ICLR 2025): quantized training, forward pass only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import numpy as np

from lightning_fpq.formats import MAX_MBITS, FormatLike, FPFormat

from .chinchilla import ChinchillaForm
from .inputs import check_bits, format_or_none, positive_array, scalar_or_array
from .law import DEFAULT_BLOCK_SIZE, NoCriticalDataSize, Provenance, log2_block_size
from .planning import PrecisionLaw

__all__ = ["KumarLaw"]


@dataclass(frozen=True)
class KumarLaw(NoCriticalDataSize, PrecisionLaw, ChinchillaForm):
    """Precision-aware scaling law for integer formats of Kumar et al., arXiv 2411.04330.

    ``L = A N_eff^-alpha + B D^-beta + E``, with
    ``N_eff = N (1 - exp(-P_w/g_w)) (1 - exp(-P_a/g_a)) (1 - exp(-P_kv/g_kv))``.
    Quantized training only (forward pass: weights, activations, KV cache); the
    post-training-quantization term delta_PTQ is 0 here. A format gives its bit count P to
    all three operands; the law knows integer precision only, so an FP format's E/M split is
    ignored and its block size has no effect (the argument is accepted so that calls are
    interchangeable with :class:`~lightning_fpq.scaling.capybara.CapybaraLaw`). Having no
    D-dependent penalty, it has no critical data size (inf). With the published constants,
    alpha = beta and C = (6/16) P N D, the joint compute-optimal precision is independent of
    C: it minimises P / f(P), where f is the N_eff factor.
    """

    g_w: float
    g_a: float
    g_kv: float
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
    )
    PAPER_PROVENANCE: ClassVar[Provenance] = Provenance(
        source="paper",
        citation="Kumar et al., Scaling Laws for Precision, arXiv 2411.04330 (ICLR 2025)",
        note="integer formats, quantized training of weights, activations and KV cache",
    )

    def _log2b(self, block_size: Union[int, str]) -> float:
        return log2_block_size(block_size)  # validated for interchangeability; unused by the law

    def precision_factor(self, P_w, P_a=None, P_kv=None):
        """N_eff / N = prod (1 - exp(-P_x / g_x)) (dimensionless); P_a, P_kv default to P_w."""
        P_w = positive_array("P_w", P_w)
        P_a = P_w if P_a is None else positive_array("P_a", P_a)
        P_kv = P_w if P_kv is None else positive_array("P_kv", P_kv)
        return scalar_or_array(
            (1 - np.exp(-P_w / self.g_w)) * (1 - np.exp(-P_a / self.g_a)) * (1 - np.exp(-P_kv / self.g_kv))
        )

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

    def loss(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Predicted loss (nats/token); ``fmt=None`` is unquantized (N_eff = N)."""
        N, D = positive_array("N", N), positive_array("D", D)
        self._log2b(block_size)
        return scalar_or_array(self._loss_from_factor(N, D, self._format_factor(format_or_none(fmt)), 0.0))

    def effective_params(self, N, D, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Kumar's N_eff (parameters). D is validated but unused: this N_eff does not depend on data."""
        N, _ = positive_array("N", N), positive_array("D", D)
        self._log2b(block_size)
        return scalar_or_array(N * self._format_factor(format_or_none(fmt)))

    def min_loss(self, N, fmt: Optional[FormatLike], block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The D -> inf limit, A N_eff^-alpha + E (nats/token)."""
        N = positive_array("N", N)
        self._log2b(block_size)
        return scalar_or_array(self.A * (N * self._format_factor(format_or_none(fmt))) ** (-self.alpha) + self.E)

    def optimal_format(self, bits: int) -> FPFormat:
        """The integer format of ``bits`` bits: sign + (bits - 1) magnitude bits, i.e. E0M(bits-1)."""
        bits = check_bits(bits, self._max_bits())
        return FPFormat(ebits=0, mbits=bits - 1)
