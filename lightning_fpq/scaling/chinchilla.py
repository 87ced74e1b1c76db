"""The precision-unaware baseline: Hoffmann et al., "Training Compute-Optimal Large Language
Models", arXiv 2203.15556."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from lightning_fpq.formats import FormatLike

from .inputs import format_or_none, positive_array, scalar_or_array
from .law import DEFAULT_BLOCK_SIZE, Law, NoCriticalDataSize, Provenance, log2_block_size

__all__ = ["ChinchillaForm", "ChinchillaLaw"]


@dataclass(frozen=True)
class ChinchillaForm(Law):
    """The constants of the form ``L = A / N^alpha + B / D^beta + E`` (nats/token), shared by
    :class:`ChinchillaLaw` and :class:`~lightning_fpq.scaling.kumar.KumarLaw` (which puts an
    effective N in place of N). E may be 0, the others must be > 0."""

    A: float
    alpha: float
    B: float
    beta: float
    E: float

    _nonnegative: ClassVar[frozenset[str]] = frozenset({"E"})


@dataclass(frozen=True)
class ChinchillaLaw(NoCriticalDataSize, ChinchillaForm):
    """Hoffmann et al., "Training Compute-Optimal Large Language Models", arXiv 2203.15556.

    ``L = E + A / N^alpha + B / D^beta`` (their eq. 10, approach 3: E = 1.69, A = 406.4,
    B = 410.7, alpha = 0.34, beta = 0.28). Precision-unaware: a format argument is accepted
    and ignored, the law being the unquantized baseline; it has no critical data size (inf).
    Its compute model is C = 6 N D, which is (6/16) P N D at P = 16 bits.
    """

    provenance: Provenance = Provenance()

    kind: ClassVar[str] = "chinchilla"
    FITTED: ClassVar[tuple[str, ...]] = ("A", "alpha", "B", "beta", "E")
    # the published approach-3 fit of Hoffmann et al., arXiv 2203.15556, eq. (10)
    PAPER: ClassVar[dict[str, float]] = dict(A=406.4, alpha=0.34, B=410.7, beta=0.28, E=1.69)
    PAPER_PROVENANCE: ClassVar[Provenance] = Provenance(
        source="paper",
        citation="Hoffmann et al., Training Compute-Optimal Large Language Models, arXiv 2203.15556",
        note="approach 3 (parametric fit); MassiveText, its tokenizer; over 400 models of 70M-16B parameters on 5B-500B tokens",
        n_range=(7e7, 1.6e10),
        d_range=(5e9, 5e11),
    )

    def loss(self, N, D, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """Predicted loss (nats/token); ``fmt`` and ``block_size`` are validated and ignored."""
        N, D = positive_array("N", N), positive_array("D", D)
        format_or_none(fmt), log2_block_size(block_size)
        self.check_range(N, D)
        return scalar_or_array(self.E + self.A / N**self.alpha + self.B / D**self.beta)

    def min_loss(self, N, fmt: Optional[FormatLike] = None, block_size: Union[int, str] = DEFAULT_BLOCK_SIZE):
        """The D -> inf limit, E + A / N^alpha (nats/token)."""
        N = positive_array("N", N)
        format_or_none(fmt), log2_block_size(block_size)
        return scalar_or_array(self.E + self.A / N**self.alpha)

    def compute_optimal(self, compute) -> tuple[Any, Any]:
        """(N_opt, D_opt) minimising L under C = 6 N D (arXiv 2203.15556, eq. 4):
        N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G,
        G = (alpha A / (beta B))^(1/(alpha+beta))."""
        C = positive_array("compute", compute)
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return scalar_or_array(G * (C / 6.0) ** (self.beta / s)), scalar_or_array((C / 6.0) ** (self.alpha / s) / G)
