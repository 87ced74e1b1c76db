"""Real low-precision storage: codes plus block scales (:class:`PackedTensor`).

``pack(x, fmt, ...)`` stores exactly the values ``quantize(x, fmt, ...)`` returns (nearest
rounding), as format codes (two E2M1 codes a byte) and the block scales; ``unpack`` gives them
back bit for bit. The packed FP4 GEMM kernel reads these codes directly.

A ``PackedTensor`` also records the scale format it was packed with, so that the GEMM can pick
its path without reading scale values (no host synchronisation), and, for E4M3 block scales
(NVFP4), the two levels the hardware multiplies by: the E4M3 byte of each block's decode scale
and the fp32 tensor scale (``tl.dot_scaled`` takes the bytes, the epilogue the tensor scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _config
from ._config import BlockSize
from .formats import FormatLike, FPFormat
from .quantize import (
    E4M3,
    SCALE_FORMATS,
    block_scales,
    finite_absmax,
    from_blocks,
    round_to_format,
    to_blocks,
    usable_max,
)


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
    ``None`` when ``block_size`` is None. ``unpack`` reads ``codes`` and ``scales`` only.

    ``scale_format`` is what the scales were computed as ("fp32", "e8m0": powers of two, or
    "e4m3": NVFP4's two levels); ``"fp32"`` promises nothing. For "e4m3" block scales,
    ``scale_bytes`` holds the E4M3 code (uint8, shaped like ``scales``) of each block's decode
    scale ``s`` and ``tensor_scale`` the fp32 per-tensor scale ``t`` (one element), with
    ``S = 1 / (s * t)`` in fp32 (``block_scales``); both are ``None`` otherwise.
    """

    codes: torch.Tensor
    scales: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    fmt: FPFormat
    block_size: BlockSize
    axis: int
    pad: int
    scale_format: str = "fp32"
    scale_bytes: Optional[torch.Tensor] = None
    tensor_scale: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format={self.scale_format!r} is not valid: expected one of {SCALE_FORMATS}")

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and the fp32 multipliers (what ``unpack`` reads)."""
        scale_bytes = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.codes.numel() * self.codes.element_size() + scale_bytes


def tensor_scale(tensor_amax: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """NVFP4's fp32 per-tensor scale ``t = tensor_amax / (fmt.max * 448)`` (1 when the tensor
    is all zero), as ``block_scales`` computes it: a 1-element float32 tensor."""
    tamax = tensor_amax.to(torch.float32).reshape(1)
    return torch.where(tamax > 0, tamax / (usable_max(fmt) * E4M3.max), torch.ones_like(tamax))


def e4m3_scale_bytes(scales: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The E4M3 codes (uint8) of the block decode scales ``s`` from the multipliers
    ``S = 1 / (s * t)`` and the tensor scale ``t``, on the scales' device without a host sync.

    Recovered rather than kept from the quantizer so that ``pack`` and the fused kernel
    (which writes only ``S``) record the same bytes: ``1 / S / t`` is within a few fp32 ulps
    of ``s``, which has 4 significant bits, so rounding it to E4M3 gives ``s`` back exactly
    whenever ``s * t`` is a normal fp32 number (a tensor absmax above ~1e-34). An all-zero
    block (``S = 1``, codes all zero) gets the code of ``1 / t`` (saturated): any finite scale
    gives its zero products.
    """
    decode = torch.ones_like(scales, dtype=torch.float32) / scales.to(torch.float32)
    s = round_to_format(decode / t.to(decode.device).reshape(()), E4M3, saturate=True)
    return encode(s, E4M3).to(torch.uint8)


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
    fmt = FPFormat.parse(fmt)
    block_size = _config.block_size(block_size)
    scale_format = _config.choice(scale_format, SCALE_FORMATS, what="scale_format")
    x32 = x.to(torch.float32).reshape(x.shape or (1,))
    axis = axis % max(x.dim(), 1)
    sbytes: Optional[torch.Tensor] = None
    tscale: Optional[torch.Tensor] = None
    if block_size is None:
        q, scale, pad = round_to_format(x32, fmt, saturate=saturate), None, 0
    else:
        blocks, pad = to_blocks(x32, block_size, axis)
        amax = finite_absmax(blocks)
        scale = block_scales(amax, fmt, scale_format)
        q = round_to_format(blocks * scale, fmt, saturate=saturate)
        if scale_format == "e4m3":  # block_scales' tensor absmax: the largest block absmax
            tscale = tensor_scale(amax.amax(), fmt)
            sbytes = e4m3_scale_bytes(scale, tscale)
    codes = encode(q, fmt).reshape(-1)
    if fmt.bits <= 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        codes = codes[0::2] | (codes[1::2] << 4)
    codes = codes.to(_code_dtype(fmt))  # values >= 2**15 (int16) or 2**31 (int32) wrap; unpack masks
    recorded = scale_format if block_size is not None else "fp32"
    return PackedTensor(codes, scale, x.shape, x.dtype, fmt, block_size, axis, pad, recorded, sbytes, tscale)


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
        out = from_blocks(blocks / packed.scales, shape, packed.axis, packed.pad, packed.block_size)
    return out.reshape(packed.shape).to(packed.dtype)


def _block_len(packed: PackedTensor) -> int:
    if packed.block_size == "tensor":
        return packed.shape.numel() if packed.shape else 1
    length = (packed.shape or torch.Size([1]))[packed.axis]
    if packed.block_size == "channel":
        return length + packed.pad
    assert isinstance(packed.block_size, int), "pack stores scaled operands only with a block"
    return packed.block_size
