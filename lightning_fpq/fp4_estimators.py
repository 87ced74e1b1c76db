"""The FP4 training estimators of arXiv 2501.17116 (docs/science.md section 6): the outlier
clamp threshold of OCC and the gradient factor of DGE. Pure torch, exact, compile-able."""

from __future__ import annotations

import math

import torch

from .quantize import block_scales, finite_absmax, from_blocks, to_blocks
from .spec import OperandSpec


def occ_threshold(x: torch.Tensor, quantile: float) -> torch.Tensor:
    """The clamp threshold of OCC: the ``quantile`` of the non-NaN |x| by nearest rank (the
    ``ceil(quantile * n)``-th smallest of the n non-NaN |x|), a 0-dim tensor of x's dtype
    (arXiv 2501.17116). NaN does not count (a NaN threshold would make every clamped value NaN);
    it stays where it is. All NaN: the threshold is NaN.

    Exact, and on large CPU tensors cheaper than one ``kthvalue`` over all of |x|: a
    strided sample gives a lower bound ``lb`` a little below the quantile; when fewer than k
    elements lie below ``lb``, the k-th smallest is the ``(k - below)``-th smallest of the few
    elements at or above ``lb``. Otherwise (adversarial layouts) the full ``kthvalue`` runs.
    """
    a = x.detach().abs().reshape(-1).float()
    nan = torch.isnan(a)
    n_nan = int(nan.sum())
    n = a.numel()
    if n_nan == n:
        return torch.full((), math.nan, dtype=x.dtype, device=x.device)
    a = torch.where(nan, -1.0, a)  # NaN below every |x|: the first n_nan of the sorted values
    k = n_nan + min(max(1, math.ceil(quantile * (n - n_nan))), n - n_nan)
    if n >= 1 << 16 and a.device.type == "cpu" and not torch.compiler.is_compiling():
        sample = a[:: n // 4096]  # ~4096 evenly spaced elements
        j = max(1, math.floor((k / n - 0.01) * sample.numel()))  # one percentile of margin
        lb = sample.kthvalue(j).values
        keep = a >= lb
        candidates = a[keep]  # about (1 - quantile + margin) * n elements
        below = n - candidates.numel()
        if below < k:
            return candidates.kthvalue(k - below).values.to(x.dtype)
    return a.kthvalue(k).values.to(x.dtype)


def dge_factor(weight: torch.Tensor, spec: OperandSpec, *, k: float, clamp: float) -> torch.Tensor:
    """DGE: the derivative of the smooth quantizer of arXiv 2501.17116 at each weight, float32.

    With y = w * S (S the block scale of the weight's P2 quantization) lying in the grid
    interval [lo, lo + delta], ``f'(y) = (1/k) * |2 (|y| - lo) / delta - 1| ** (1/k - 1)``,
    clamped at ``clamp`` (their code clamps at 3). |y| is saturated at the format's max first
    (the block's absmax element can land one ulp above it), so the max itself gets 1/k.
    """
    fmt = spec.fmt
    w32 = weight.detach().to(torch.float32)
    if spec.block_size is None:
        y = w32
    else:
        blocks, pad = to_blocks(w32, spec.block_size, -1)
        scale = block_scales(finite_absmax(blocks), fmt, spec.scale_format)
        y = from_blocks(blocks * scale, w32.shape, -1 % w32.dim(), pad, spec.block_size)
    a = torch.clamp(y.abs(), max=fmt.max)  # saturation first: an absmax one ulp above max is at max
    if fmt.emin - fmt.mbits >= -126:
        # floor(log2 a) from the fp32 exponent field (fp32 subnormals and 0 read -127 and clamp
        # to emin), and the step 2**(e - mbits) built from bits: exact, and torch.compile-able
        e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
        e = torch.clamp(e, min=fmt.emin)  # subnormals share emin's step
        delta = ((e - fmt.mbits + 127) << 23).view(torch.float32)  # the grid step around |y|
    else:  # E8 formats: steps below 2**-126 are fp32 subnormals
        _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1
        delta = torch.ldexp(torch.ones_like(a), torch.clamp(e - 1, min=fmt.emin) - fmt.mbits)
    lo = torch.floor(a / delta) * delta  # the grid point at or below |y|
    t = 2.0 * (a - lo) / delta - 1.0  # position inside [lo, lo + delta], in [-1, 1)
    factor = (1.0 / k) * t.abs().pow(1.0 / k - 1.0)
    return torch.clamp(factor, max=clamp)
