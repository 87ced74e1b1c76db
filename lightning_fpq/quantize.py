"""The reference quantizer: pure torch, readable, the ground truth for every fast path.

``quantize(x, fmt, ...)`` is *fake* quantization: it returns a tensor of ``x``'s dtype and
shape whose values are the format's grid points times the block scales (docs/science.md sections 1-2).
``lightning_fpq.packing`` keeps the same values as real low-precision storage (codes + scales).

Every fast implementation (the compiled CPU path in ``fastquant.py``, the Triton kernels) is
tested bit-for-bit against the functions in this file, so this file favours clarity: the
element rounding is done in float64, where every fp32/bf16/fp16 input and every grid point
of a format with at most 8 exponent and 23 mantissa bits is exact.

Order of operations (the contract fast paths must follow exactly):

1. ``x`` is read in float32 (never modified in place).
2. Each block's scale ``S`` is computed from the absolute maximum of its *finite* values
   (NaN and inf are ignored, so they cannot poison their neighbours), see ``block_scales``.
   Scales are divided tensor by tensor (IEEE, correctly rounded): torch's ``float / tensor``
   on CPU is not, see ``_scalar_over``.
3. ``y = x32 * S`` (float32), rounded to the grid (``round_to_format``), ``out = q / S``
   (float32), clamped to the output dtype's finite range when saturating, then cast to
   ``x.dtype``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _config
from ._config import BlockSize
from .formats import FormatLike, FPFormat
from .philox import NoiseGenerator, uniform_noise

ROUNDING_MODES = ("nearest", "stochastic")
SCALE_FORMATS = ("fp32", "e8m0", "e4m3")
BACKENDS = ("auto", "reference", "compiled", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP32_MAX = torch.finfo(torch.float32).max
E4M3 = FPFormat.parse("e4m3")  # NVFP4's block-scale format
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # OCP MX E8M0: 2^-127 .. 2^127 (code 255 is NaN)


def usable_max(fmt: FPFormat) -> float:
    """The largest grid value the fp32 computation can hold: ``fmt.max``, except for E8
    formats in ``finite``/``fn`` mode whose top binade (2**128) lies beyond fp32; for those,
    the largest value of the binade below, (2 - 2**-M) * 2**127."""
    return fmt.max if fmt.max <= _FP32_MAX else math.ldexp(2.0 - 2.0**-fmt.mbits, 127)


# ------------------------------------------------------------------- element rounding
def round_to_format(
    y: torch.Tensor,
    fmt: FPFormat,
    *,
    rounding: str = "nearest",
    saturate: bool = True,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Round every element of ``y`` to the nearest value of ``fmt`` (no scaling). float32 out.

    nearest: round half to even. stochastic: ``floor(|y|/step + u)`` with ``u = noise`` in
    [0, 1), so the result is one of the two neighbouring grid points and is unbiased.
    Overflow saturates to +-max (default). With ``saturate=False`` it becomes +-inf for
    ``ieee`` formats, NaN for ``fn`` formats (as ml_dtypes does), and +-max for ``finite``
    formats, which have neither. NaN stays NaN.
    """
    a = y.to(torch.float64).abs()
    # Exponent of each value, clamped below at emin: the subnormals share emin's step.
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1)
    exp = torch.clamp(exp - 1, min=fmt.emin)
    step = torch.ldexp(torch.ones_like(a), (exp - fmt.mbits).to(torch.float64))
    if rounding == "nearest":
        units = torch.round(a / step)  # torch.round rounds half to even
    else:
        assert noise is not None, "stochastic rounding draws its noise before rounding"
        units = torch.floor(a / step + noise.to(torch.float64))
    q = units * step
    limit = usable_max(fmt)
    overflow = q > limit  # inf included; NaN compares False and stays NaN
    if saturate or not fmt.has_nan:
        q = torch.where(overflow, torch.full_like(q, limit), q)
    elif fmt.has_inf:
        q = torch.where(overflow, torch.full_like(q, math.inf), q)
    else:  # fn: overflow is NaN
        q = torch.where(overflow, torch.full_like(q, math.nan), q)
    return torch.copysign(q, y.to(torch.float64)).to(torch.float32)


# ---------------------------------------------------------------------- block scales
def to_blocks(x: torch.Tensor, block_size: BlockSize, axis: int) -> tuple[torch.Tensor, int]:
    """View ``x`` as (..., n_blocks, B) blocks along ``axis``; returns it and the pad added.

    A block size that does not divide the axis is padded with zeros at the end (the last
    block is shorter in effect; zeros never raise an absmax).
    """
    x = x.movedim(axis, -1)
    length = x.shape[-1]
    if block_size == "tensor":
        return x.reshape(1, -1), 0
    size = length if block_size == "channel" else block_size
    if not isinstance(size, int):
        raise ValueError(f"block_size={block_size!r} has no blocks to form: expected an int, 'channel' or 'tensor'")
    pad = (-length) % size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, size), pad


def from_blocks(blocks: torch.Tensor, shape: torch.Size, axis: int, pad: int, block_size: BlockSize) -> torch.Tensor:
    moved = list(shape)
    moved.append(moved.pop(axis))
    if block_size == "tensor":
        return blocks.reshape(moved).movedim(-1, axis)
    flat = blocks.reshape(*blocks.shape[:-2], -1)
    if pad:
        flat = flat[..., :-pad]
    return flat.reshape(moved).movedim(-1, axis)


def finite_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Per-block max of |x| over finite values (NaN/inf ignored), keepdim, float32."""
    a = blocks.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    return a.amax(dim=-1, keepdim=True)


def _scalar_over(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """``numerator / t`` correctly rounded. torch computes ``float / tensor`` on CPU as a
    reciprocal times the scalar, which is off by an ulp about a quarter of the time; every
    fast path must divide the same way, so the contract is IEEE division."""
    return torch.full_like(t, numerator) / t


def block_scales(
    amax: torch.Tensor, fmt: FPFormat, scale_format: str, tensor_amax: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The multiplier ``S`` of each block (quantize ``x * S``, dequantize ``q / S``). float32.

    - fp32: ``S = fmt.max / amax`` (the block absmax lands on the format's max).
    - e8m0 (OCP MX): ``S = 2**-(floor(log2 amax) - emax_elem)``, a power of two; values that
      still exceed the max after scaling saturate, as the MX spec says.
    - e4m3 (NVFP4): a per-tensor fp32 scale ``t = tensor_amax / (fmt.max * 448)`` and a
      per-block decode scale ``amax / (fmt.max * t)`` rounded to E4M3; ``S = 1 / (s_e4m3 * t)``.
    An all-zero block gets ``S = 1`` (it stays zero, no 0/0).
    """
    one = torch.ones_like(amax)
    target = usable_max(fmt)
    if scale_format == "fp32":
        scale = torch.where(amax > 0, _scalar_over(target, amax), one)
        return scale.clamp(max=_FP32_MAX)  # a subnormal amax must not give an inf scale
    if scale_format == "e8m0":
        _, exp = torch.frexp(amax)
        emax = math.frexp(target)[1] - 1  # fmt.emax, or 127 for formats wider than fp32
        shared = torch.clamp(exp - 1 - emax, E8M0_MIN_EXP, E8M0_MAX_EXP)
        scale = torch.ldexp(one, -shared.to(torch.float32))
        return torch.where(amax > 0, scale, one)
    # e4m3 two-level scaling
    tensor_amax = tensor_amax if tensor_amax is not None else amax.amax()
    tensor_scale = torch.where(tensor_amax > 0, tensor_amax / (target * E4M3.max), torch.ones_like(tensor_amax))
    decode = round_to_format((amax / target) / tensor_scale, E4M3) * tensor_scale
    return torch.where(decode > 0, _scalar_over(1.0, decode), one).clamp(max=_FP32_MAX)


# -------------------------------------------------------------------------- quantize
def check_quantize_args(
    x: torch.Tensor,
    fmt: FormatLike,
    block_size: BlockSize,
    axis: int,
    scale_format: str,
    rounding: str,
    *,
    who: str,
) -> tuple[FPFormat, BlockSize]:
    """The argument checks every implementation of ``quantize`` shares; ``who`` names it in errors."""
    fmt = FPFormat.parse(fmt)
    block_size = _config.block_size(block_size)
    rounding = _config.choice(rounding, ROUNDING_MODES, what="rounding")
    scale_format = _config.choice(scale_format, SCALE_FORMATS, what="scale_format")
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} expects a float32, bfloat16 or float16 tensor, got {got}")
    if x.dim() == 0 and block_size not in (None, "tensor"):
        raise ValueError(f"block_size={block_size!r} needs a tensor with at least one dimension")
    if x.dim() > 0 and not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis} is out of range for a tensor of {x.dim()} dimensions")
    return fmt, block_size


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
    scale_format: str = "fp32",
    rounding: str = "nearest",
    generator: Optional[NoiseGenerator] = None,
    saturate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fake-quantize ``x`` to ``fmt``: same dtype and shape, values on the (scaled) grid.

    Args:
        x: float32, bfloat16 or float16 tensor of any shape, on any device. Not modified.
        fmt: an ``FPFormat`` or a name ("e2m1", "fp8", "e4m3:ieee", any "eXmY").
        block_size: ``None`` rounds to the grid without scaling; an int B scales each run of
            B consecutive elements along ``axis`` by its own absmax (a B that does not
            divide the axis pads the last block with zeros); ``"channel"`` uses one scale
            per slice along ``axis``; ``"tensor"`` one scale for the whole tensor.
        axis: the dimension the blocks run along (the GEMM's reduction dimension).
        scale_format: "fp32", "e8m0" (OCP MX powers of two) or "e4m3" (NVFP4: E4M3 block
            scales under one fp32 tensor scale).
        rounding: "nearest" (ties to even) or "stochastic" (unbiased, reproducible from
            ``generator``: a ``torch.Generator``, whose ``torch.rand`` draws are used, or a
            ``lightning_fpq.philox.PhiloxGenerator``, the counter-based stream that the Triton
            kernel computes in registers; every backend takes the same draws from either).
        saturate: clamp overflow to +-max (the default of every training recipe).
        backend: "auto" picks the fastest implementation that is bit-identical to the
            reference: the fused Triton kernel for CUDA tensors where Triton runs
            (``lightning_fpq.kernels``), the torch.compile'd path (``fastquant.py``) on CPU
            where it is known exact and worthwhile, else the reference. "reference",
            "compiled" and "triton" force one; a forced one that cannot run raises
            ``ValueError`` with the reason.
    """
    backend = _config.choice(backend, BACKENDS, what="backend")
    fmt, block_size = check_quantize_args(x, fmt, block_size, axis, scale_format, rounding, who="quantize")
    if backend in ("auto", "triton"):
        out = _quantize_triton(x, fmt, backend, block_size, axis, scale_format, rounding, generator, saturate)
        if out is not None:
            return out
    if backend in ("auto", "compiled"):
        from . import fastquant  # local import: fastquant imports this module

        out = fastquant.quantize_fast(
            x,
            fmt,
            block_size=block_size,
            axis=axis,
            scale_format=scale_format,
            rounding=rounding,
            generator=generator,
            saturate=saturate,
            backend=backend,
        )
        if out is not None:
            return out
    return quantize_reference(
        x,
        fmt,
        block_size=block_size,
        axis=axis,
        scale_format=scale_format,
        rounding=rounding,
        generator=generator,
        saturate=saturate,
    )


def _quantize_triton(
    x: torch.Tensor,
    fmt: FPFormat,
    backend: str,
    block_size: BlockSize,
    axis: int,
    scale_format: str,
    rounding: str,
    generator: Optional[NoiseGenerator],
    saturate: bool,
) -> Optional[torch.Tensor]:
    """The Triton kernel's result, or None when "auto" should use another path.

    "auto" takes it only for CUDA tensors with compiled kernels (never the interpreter, which
    is for tests) and formats that fit fp32; "triton" forces it wherever it can launch.
    """
    from .kernels import capability  # imports no triton until asked

    ok, reason = capability.triton_available()
    if backend == "auto" and not (ok and x.is_cuda and not capability.interpreting() and fmt.max <= _FP32_MAX):
        return None
    if not ok:
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    from .kernels.quantize import quantize_triton

    try:
        return quantize_triton(
            x,
            fmt,
            block_size=block_size,
            axis=axis,
            scale_format=scale_format,
            rounding=rounding,
            generator=generator if rounding == "stochastic" else None,
            saturate=saturate,
        )
    except RuntimeError as err:  # the wrapper's launch check: wrong device for this process
        raise ValueError(f"backend='triton' cannot run here: {err}") from None


def _noise(x: torch.Tensor, rounding: str, generator: Optional[NoiseGenerator]) -> Optional[torch.Tensor]:
    """Uniform [0, 1) float32 draws, one per element of ``x``, in ``x``'s element order."""
    if rounding != "stochastic":
        return None
    return uniform_noise(x.shape, generator, x.device)


def quantize_reference(
    x: torch.Tensor,
    fmt: FPFormat,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
    scale_format: str = "fp32",
    rounding: str = "nearest",
    generator: Optional[NoiseGenerator] = None,
    saturate: bool = True,
) -> torch.Tensor:
    """The reference implementation of ``quantize`` (arguments already validated)."""
    x32 = x.to(torch.float32)
    noise = _noise(x32, rounding, generator)
    if x.numel() == 0:
        return x.clone()
    if block_size is None:
        out = round_to_format(x32, fmt, rounding=rounding, saturate=saturate, noise=noise)
    else:
        axis = axis % max(x.dim(), 1)
        blocks, pad = to_blocks(x32.reshape(x.shape or (1,)), block_size, axis)
        scale = block_scales(finite_absmax(blocks), fmt, scale_format)
        if noise is not None:
            noise, _ = to_blocks(noise.reshape(x.shape or (1,)), block_size, axis)
        q = round_to_format(blocks * scale, fmt, rounding=rounding, saturate=saturate, noise=noise)
        out = from_blocks(q / scale, x.shape or torch.Size([1]), axis, pad, block_size).reshape(x.shape)
    return _to_output(out, x.dtype, saturate)


def _to_output(out32: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """Cast to the input dtype. Saturating means finite: a grid value beyond the dtype's
    range (E5M2:finite into fp16) or a dequantized block near fp32's max must not become inf."""
    if saturate:
        limit = torch.finfo(dtype).max
        out32 = out32.clamp(-limit, limit)  # clamp keeps NaN
    return out32.to(dtype)
