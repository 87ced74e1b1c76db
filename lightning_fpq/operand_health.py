"""How much one quantized operand loses: SQNR, values flushed to zero, values saturated.

These measure the precision's effect directly, on the tensors a layer really quantizes
(an input X, a weight W, an output gradient dY), with the operand's own spec and reduction
axis. Saturation is the recipes' default (a value beyond the block's largest representable
magnitude becomes +-max, and so does +-inf): it never crashes and never spreads, but it hides
an overflow from the loss, so it is counted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quantize import block_scales, finite_absmax, quantize, to_blocks
from .spec import OperandSpec


@dataclass(frozen=True)
class OperandHealth:
    """``sqnr_db``: 10 log10(sum x^2 / sum (x - q)^2) over the finite values (inf when exact);
    ``flushed``: the fraction of non-zero finite values that quantize to zero; ``saturated``:
    the fraction of values clamped to the largest magnitude (finite values beyond it, and
    +-inf); ``nan``: the fraction of NaN (kept as NaN)."""

    sqnr_db: float
    flushed: float
    saturated: float
    nan: float


def operand_health(x: torch.Tensor, spec: OperandSpec, axis: int) -> OperandHealth:
    """Quantize ``x`` as ``spec`` says along ``axis`` (nearest rounding) and measure the loss."""
    x32 = x.detach().float()
    q = quantize(x32, spec.fmt, block_size=spec.block_size, axis=axis, scale_format=spec.scale_format).float()
    finite = torch.isfinite(x32)
    n = max(x32.numel(), 1)
    signal = x32[finite].double().pow(2).sum()
    noise = (x32 - q)[finite].double().pow(2).sum()
    sqnr = math.inf if noise == 0 else float(10 * torch.log10(signal / noise)) if signal > 0 else -math.inf
    flushed = int(((q == 0) & (x32 != 0) & finite).sum()) / max(int(((x32 != 0) & finite).sum()), 1)
    return OperandHealth(sqnr, flushed, _saturated(x32, spec, axis) / n, int(torch.isnan(x32).sum()) / n)


def _saturated(x32: torch.Tensor, spec: OperandSpec, axis: int) -> int:
    """How many values lie beyond their block's largest representable magnitude, or are +-inf."""
    infinite = int(torch.isinf(x32).sum())
    if spec.block_size is None:
        return infinite + int((torch.isfinite(x32) & (x32.abs() > spec.fmt.max)).sum())
    blocks, _ = to_blocks(x32.reshape(x32.shape or (1,)), spec.block_size, axis % max(x32.dim(), 1))
    scale = block_scales(finite_absmax(blocks), spec.fmt, spec.scale_format)
    # the block absmax may land an ulp above max after scaling: that is rounding, not saturation
    beyond = torch.isfinite(blocks) & (blocks.abs() * scale > spec.fmt.max * (1 + 2**-20))
    return infinite + int(beyond.sum())
