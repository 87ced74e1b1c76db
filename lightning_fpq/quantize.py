"""The reference quantizer: pure torch, readable, the ground truth for every fast path.

``quantize(x, fmt, ...)`` is *fake* quantization: it returns a tensor of ``x``'s dtype and
shape whose values are the format's grid points times the block scales (SCIENCE.md 1-2).
``pack``/``unpack`` keep the same values as real low-precision storage (codes + scales).

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
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from .formats import FPFormat, FormatLike, as_format

BlockSize = Union[None, int, Literal["channel", "tensor"]]
ROUNDING_MODES = ("nearest", "stochastic")
SCALE_FORMATS = ("fp32", "e8m0", "e4m3")
BACKENDS = ("auto", "reference", "compiled", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP32_MAX = torch.finfo(torch.float32).max
E4M3 = FPFormat.parse("e4m3")  # NVFP4's block-scale format
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # OCP MX E8M0: 2^-127 .. 2^127 (code 255 is NaN)


# --------------------------------------------------------------------------- validation
def check_block_size(block_size: BlockSize) -> BlockSize:
    valid = "None, a positive int, 'channel' or 'tensor'"
    if block_size is None or block_size in ("channel", "tensor"):
        return block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not valid: expected {valid}")
    return block_size


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: expected one of {choices}")
    return value


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
def _blocks_last(x: torch.Tensor, block_size: BlockSize, axis: int) -> tuple[torch.Tensor, int]:
    """View ``x`` as (..., n_blocks, B) blocks along ``axis``; returns it and the pad added.

    A block size that does not divide the axis is padded with zeros at the end (the last
    block is shorter in effect; zeros never raise an absmax).
    """
    x = x.movedim(axis, -1)
    length = x.shape[-1]
    if block_size == "tensor":
        return x.reshape(1, -1), 0
    size = length if block_size == "channel" else block_size
    pad = (-length) % size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, size), pad


def _unblock(blocks: torch.Tensor, shape: torch.Size, axis: int, pad: int, block_size: BlockSize) -> torch.Tensor:
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
    x: torch.Tensor, fmt: FormatLike, block_size: BlockSize, axis: int, scale_format: str, rounding: str, *, who: str,
) -> tuple[FPFormat, BlockSize]:
    """The argument checks every implementation of ``quantize`` shares; ``who`` names it in errors."""
    fmt = as_format(fmt)
    block_size = check_block_size(block_size)
    check_choice("rounding", rounding, ROUNDING_MODES)
    check_choice("scale_format", scale_format, SCALE_FORMATS)
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
    generator: Optional[torch.Generator] = None,
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
            ``generator``).
        saturate: clamp overflow to +-max (the default of every training recipe).
        backend: "auto" picks the fastest implementation that is bit-identical to the
            reference: the fused Triton kernel for CUDA tensors where Triton runs
            (``lightning_fpq.kernels``), the torch.compile'd path (``fastquant.py``) on CPU
            where it is known exact and worthwhile, else the reference. "reference",
            "compiled" and "triton" force one; a forced one that cannot run raises
            ``ValueError`` with the reason.
    """
    check_choice("backend", backend, BACKENDS)
    fmt, block_size = check_quantize_args(x, fmt, block_size, axis, scale_format, rounding, who="quantize")
    if backend in ("auto", "triton"):
        out = _quantize_triton(x, fmt, backend, block_size, axis, scale_format, rounding, generator, saturate)
        if out is not None:
            return out
    if backend in ("auto", "compiled"):
        from . import fastquant  # local import: fastquant imports this module

        out = fastquant.quantize_fast(
            x, fmt, block_size=block_size, axis=axis, scale_format=scale_format,
            rounding=rounding, generator=generator, saturate=saturate, backend=backend,
        )
        if out is not None:
            return out
    return quantize_reference(
        x, fmt, block_size=block_size, axis=axis, scale_format=scale_format,
        rounding=rounding, generator=generator, saturate=saturate,
    )


def _quantize_triton(
    x: torch.Tensor, fmt: FPFormat, backend: str, block_size: BlockSize, axis: int, scale_format: str,
    rounding: str, generator: Optional[torch.Generator], saturate: bool,
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
            x, fmt, block_size=block_size, axis=axis, scale_format=scale_format, rounding=rounding,
            generator=generator if rounding == "stochastic" else None, saturate=saturate,
        )
    except RuntimeError as err:  # the wrapper's launch check: wrong device for this process
        raise ValueError(f"backend='triton' cannot run here: {err}") from None


def _noise(x: torch.Tensor, rounding: str, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """Uniform [0, 1) float32 draws, one per element of ``x``, in ``x``'s element order."""
    if rounding != "stochastic":
        return None
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def quantize_reference(
    x: torch.Tensor,
    fmt: FPFormat,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
    scale_format: str = "fp32",
    rounding: str = "nearest",
    generator: Optional[torch.Generator] = None,
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
        blocks, pad = _blocks_last(x32.reshape(x.shape or (1,)), block_size, axis)
        scale = block_scales(finite_absmax(blocks), fmt, scale_format)
        if noise is not None:
            noise, _ = _blocks_last(noise.reshape(x.shape or (1,)), block_size, axis)
        q = round_to_format(blocks * scale, fmt, rounding=rounding, saturate=saturate, noise=noise)
        out = _unblock(q / scale, x.shape or torch.Size([1]), axis, pad, block_size).reshape(x.shape)
    return _to_output(out, x.dtype, saturate)


def _to_output(out32: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """Cast to the input dtype. Saturating means finite: a grid value beyond the dtype's
    range (E5M2:finite into fp16) or a dequantized block near fp32's max must not become inf."""
    if saturate:
        limit = torch.finfo(dtype).max
        out32 = out32.clamp(-limit, limit)  # clamp keeps NaN
    return out32.to(dtype)


# -------------------------------------------------------------------------- packing
def encode(q: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Grid values (float, already on ``fmt``'s grid) -> int64 bit patterns sign|exp|mantissa.

    NaN becomes the format's NaN code; a ``finite`` format has none, so NaN is stored as
    -0 (as ml_dtypes does for its sub-byte types). +-inf becomes the inf code (``ieee``).
    """
    q = q.to(torch.float64)
    a = q.abs()
    sign = torch.signbit(q).to(torch.int64)
    _, exp = torch.frexp(a)
    e = torch.clamp(exp - 1, min=fmt.emin)
    normal = (a >= fmt.min_normal) & (fmt.ebits > 0)
    stored_exp = torch.where(normal, e + fmt.bias, torch.zeros_like(e)).to(torch.int64)
    mant_units = torch.where(normal, a / torch.ldexp(torch.ones_like(a), e.to(torch.float64)) - 1.0, a / fmt.min_normal)
    if fmt.ebits == 0:
        mant_units = a / fmt.min_subnormal / 2**fmt.mbits
    mant = torch.round(mant_units * 2**fmt.mbits)
    top = 2**fmt.ebits - 1
    is_nan, is_inf = torch.isnan(q), torch.isinf(q)
    mant = torch.where(is_nan | is_inf, torch.zeros_like(mant), mant).to(torch.int64)
    codes = (sign << (fmt.ebits + fmt.mbits)) | (stored_exp << fmt.mbits) | mant
    if fmt.special == "ieee":
        codes = torch.where(is_inf, (sign << (fmt.ebits + fmt.mbits)) | (top << fmt.mbits), codes)
        codes = torch.where(is_nan, torch.full_like(codes, (top << fmt.mbits) | (2**fmt.mbits - 1)), codes)
    elif fmt.special == "fn":
        codes = torch.where(is_nan, torch.full_like(codes, (top << fmt.mbits) | (2**fmt.mbits - 1)), codes)
    else:
        codes = torch.where(is_nan, torch.full_like(codes, 1 << (fmt.ebits + fmt.mbits)), codes)
    return codes


@dataclass(frozen=True)
class PackedTensor:
    """Real low-precision storage: element codes plus the per-block scale multipliers.

    ``codes`` is uint8 for formats of at most 8 bits (two codes a byte, low nibble first,
    for formats of at most 4 bits), int16 up to 16 bits, int32 above. ``scales`` holds the
    float32 multipliers ``S`` (dequantize = decode(codes) / S), shaped like the blocks;
    ``None`` when ``block_size`` is None.
    """

    codes: torch.Tensor
    scales: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    fmt: FPFormat
    block_size: BlockSize
    axis: int
    pad: int

    @property
    def nbytes(self) -> int:
        scale_bytes = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.codes.numel() * self.codes.element_size() + scale_bytes


def _code_dtype(fmt: FPFormat) -> torch.dtype:
    return torch.uint8 if fmt.bits <= 8 else torch.int16 if fmt.bits <= 16 else torch.int32


def pack(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
    scale_format: str = "fp32",
    saturate: bool = True,
) -> PackedTensor:
    """Quantize ``x`` (nearest rounding) into codes plus scales; ``unpack`` gives back exactly
    ``quantize(x, ...)`` with the same arguments."""
    fmt = as_format(fmt)
    block_size = check_block_size(block_size)
    check_choice("scale_format", scale_format, SCALE_FORMATS)
    x32 = x.to(torch.float32).reshape(x.shape or (1,))
    axis = axis % max(x.dim(), 1)
    if block_size is None:
        q, scale, pad = round_to_format(x32, fmt, saturate=saturate), None, 0
    else:
        blocks, pad = _blocks_last(x32, block_size, axis)
        scale = block_scales(finite_absmax(blocks), fmt, scale_format)
        q = round_to_format(blocks * scale, fmt, saturate=saturate)
    codes = encode(q, fmt).reshape(-1)
    if fmt.bits <= 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        codes = codes[0::2] | (codes[1::2] << 4)
    codes = codes.to(_code_dtype(fmt))  # values >= 2**15 (int16) or 2**31 (int32) wrap; unpack masks
    return PackedTensor(codes, scale, x.shape, x.dtype, fmt, block_size, axis, pad)


def unpack(packed: PackedTensor) -> torch.Tensor:
    """Codes plus scales -> the fake-quantized tensor (``packed.dtype``, ``packed.shape``)."""
    fmt = packed.fmt
    storage_bits = 8 * packed.codes.element_size()
    codes = packed.codes.to(torch.int64) & ((1 << storage_bits) - 1)  # undo int16/int32 sign wrap
    if fmt.bits <= 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(-1)
    values = fmt.decode(codes).to(torch.float32)
    shape = packed.shape or torch.Size([1])
    if packed.scales is None:
        out = values[: shape.numel()].reshape(shape)
    else:
        blocks_shape = list(packed.scales.shape)
        blocks_shape[-1] = -1
        blocks = values[: packed.scales.numel() * _block_len(packed)].reshape(blocks_shape)
        out = _unblock(blocks / packed.scales, shape, packed.axis, packed.pad, packed.block_size)
    return out.reshape(packed.shape).to(packed.dtype)


def _block_len(packed: PackedTensor) -> int:
    if packed.block_size == "tensor":
        return packed.shape.numel() if packed.shape else 1
    length = (packed.shape or torch.Size([1]))[packed.axis]
    return length + packed.pad if packed.block_size == "channel" else packed.block_size


def dequantize_packed(packed: PackedTensor) -> torch.Tensor:
    """Alias of ``unpack``, named for readers coming from torchao's ``to_dtype``."""
    return unpack(packed)
