"""FP4 GEMM: packed E2M1 operands with per-block scales, fp32 accumulation.

``gemm_fp4(a, b)`` computes ``unpack(a) @ unpack(b).T`` (``torch.nn.functional.linear``'s
convention) from the ``PackedTensor`` codes and scales that ``pack`` / ``pack_triton``
produce, without materialising the dequantized operands:

- the packed bytes of a [BLOCK_M, BLOCK_K] tile are loaded (two E2M1 codes a byte, low
  nibble first) and turned into exact values in registers with integer operations;
- every E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6) is exactly an E4M3 and a BF16 value, so the
  tile goes to the FP8 tensor cores (sm_89+, path "fp8") or the BF16 ones (path "bf16");
  the products are exact and a scale block's partial sum (multiples of 0.25, below
  36 * block) is exact in the fp32 accumulator;
- the block scales are applied to that partial sum: ``acc += part * (1/Sa) * (1/Sb)``
  (``dequantize = decode / S``); with power-of-two scales (E8M0) this is exact;
- with E8M0 scales and 32-element blocks (OCP MXFP4), path "dot_scaled" hands the packed
  bytes and the scale exponents to ``tl.dot_scaled``: native block-scaled MMA on sm_100+; on
  sm_90 Triton lowers it to an upcast to bf16 with the scale folded in (exact: a power of two
  times an E2M1 value) and a software-pipelined bf16 wgmma;
- with E4M3 scales and 16-element blocks (NVFP4), path "dot_scaled" on sm_100+ hands the
  packed bytes and the E4M3 bytes of the block decode scales ``s`` to ``tl.dot_scaled``
  (``tcgen05.mma ... kind::mxf4nvf4.block_scale.block16``) and multiplies the fp32 sums by
  the two tensor scales ``t`` in the epilogue: ``sum(qa * sa * qb * sb) * ta * tb``, NVFP4's
  own definition. ``unpack`` divides by the fp32 ``S = 1/(s * t)`` instead, which differs from
  ``q * s * t`` by one rounding for some ``s`` (e.g. 1.625): the two agree bit for bit where
  ``q / S == q * s * t``, else to a few ulps (as with fp32 scales below). Triton's interpreter
  reads every ``dot_scaled`` scale byte as E8M0, so under it this path multiplies the decoded
  values (``q * s`` exactly, by a software E4M3 decode) with ``tl.dot`` instead; the compiled
  ``tl.dot_scaled`` call has been compiled but not run (docs/gpu.md).

The path is chosen from what the operands were packed as (their block size and scale format,
which every ``PackedTensor`` records, i.e. the recipe) and the device, never from the scale
values: no host synchronisation (:func:`choose_path`).

With power-of-two scales the result is exactly ``unpack(a) @ unpack(b).T`` summed in any
order as long as fp32 holds the partial sums exactly; with arbitrary fp32 scales it differs
from dequantize-then-matmul by the rounding of the scaling (a few ulps), because the
scaling happens once per block product instead of once per element.

Under Triton's interpreter ``tl.dot`` multiplies bf16 inputs wrongly (docs/architecture.md, "Known
traps"): the tile is then built as bf16 or fp8 bits exactly as on the GPU and converted to
fp32 before the dot, so every path's decoding is exercised on the CPU. The interpreter also
truncates fp32 -> bf16 casts, so there the epilogue rounds in software; compiled, it is the
hardware's round-to-nearest-even cast (``cvt.rn``), the same IEEE rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_fpq.formats import FPFormat
from lightning_fpq.packing import PackedTensor

from . import capability
from ._common import DTYPE_KINDS, jit, launcher, load_as_f32, round_to_dtype_grid, store_from_f32, tl, triton

E2M1 = FPFormat.parse("e2m1")
PATHS = ("auto", "dot_scaled", "fp8", "bf16", "fp32")
# DOT_MODE 3: dot_scaled with E8M0 scales (MXFP4); 4: with E4M3 scales (NVFP4), chosen in the op
_DOT_MODES = {"fp32": 0, "bf16": 1, "fp8": 2, "dot_scaled": 3}
_DOT_SCALED_E4M3 = 4
SCALE_FORMATS = ("fp32", "e8m0", "e4m3")
# the (block length, scale format) pairs tl.dot_scaled takes: OCP MXFP4 and NVFP4
_DOT_SCALED_OPERANDS = ((32, "e8m0"), (16, "e4m3"))

# Kept for callers of the former subclass: every PackedTensor now records its scale format.
PackedOperand = PackedTensor


# ============================================================================ kernel
@jit
def _e2m1_tile(packed, DOT_MODE: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """[R, C/2] uint8 (two E2M1 codes a byte, low nibble first) -> [R, C] exact values for tl.dot."""
    codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.int32)
    mag = codes & 7  # (exponent << 1) | mantissa; 1 is the subnormal 0.5
    neg = (codes & 8) != 0
    if DOT_MODE == 1:  # bf16 bits: exponent e2 - 1 + 127, mantissa bit at position 6
        bits = tl.where(mag >= 2, (mag << 6) + (126 << 7), tl.where(mag == 1, 0x3F00, 0))
        bits = tl.where(neg, bits | 0x8000, bits)
        vals = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif DOT_MODE == 2:  # e4m3 bits: exponent e2 - 1 + 7, mantissa bit at position 2
        bits = tl.where(mag >= 2, (mag << 2) + 48, tl.where(mag == 1, 0x30, 0))
        bits = tl.where(neg, bits | 0x80, bits)
        vals = bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:  # fp32 bits
        bits = tl.where(mag >= 2, (mag << 22) + (126 << 23), tl.where(mag == 1, 0x3F000000, 0))
        bits = tl.where(neg, bits | -2147483648, bits)
        vals = bits.to(tl.float32, bitcast=True)
    if DOT_IN_FP32:
        vals = vals.to(tl.float32)
    return vals


@jit
def _e4m3_scale_to_f32(byte):
    """Positive E4M3 bytes (NVFP4 block decode scales) -> exact fp32 values, with integer
    operations (the interpreter's dot_scaled cannot decode them)."""
    bits = byte.to(tl.int32)
    e = (bits >> 3) & 15
    m = bits & 7
    normal = ((e + 120) << 23 | (m << 20)).to(tl.float32, bitcast=True)  # 2**(e - 7) * (1 + m/8)
    return tl.where(e > 0, normal, m.to(tl.float32) * 0.001953125)  # subnormal: m * 2**-9


@jit
def _scaled_e2m1_tile(packed, scale, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_K/2] E2M1 bytes and [ROWS, BLOCK_K/16] E4M3 scale bytes -> [ROWS, BLOCK_K]
    fp32 values q * s (exact: 2 + 4 significant bits), what dot_scaled multiplies."""
    vals = tl.reshape(_e2m1_tile(packed, 0, True), (ROWS, BLOCK_K // 16, 16))
    vals = vals * _e4m3_scale_to_f32(scale)[:, :, None]
    return tl.reshape(vals, (ROWS, BLOCK_K))


@jit
def _gemm_fp4_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    at_ptr,
    bt_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    n_scale_blocks,
    scale_block,
    tiles_per_scale,
    sam,
    sak,
    sasm,
    sask,
    sbn,
    sbk,
    sbsn,
    sbsk,
    scm,
    scn,
    DOT_MODE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = (A * Ia) @ (B * Ib)^T over K; A: [M, K/2] bytes, B: [N, K/2] bytes; Ia: [M,
    n_scale_blocks], Ib: [N, n_scale_blocks] the decode multipliers 1/S in float32 (or the e8m0
    bytes of the decode scales for dot_scaled, DOT_MODE 3; the e4m3 bytes of the block decode
    scales for DOT_MODE 4, whose tensor scales at_ptr, bt_ptr (one fp32 each) multiply the sums
    in the epilogue; the other modes ignore them). One program computes a [BLOCK_M, BLOCK_N] tile,
    programs grouped along M (GROUP_M) so that neighbours reuse B tiles from L2. EVEN_K: every
    scale block is whole tiles, so no load needs a mask along K. BIAS_KIND: -1 no bias, else the
    dtype kind (``load_as_f32``) of the [N] bias at bias_ptr, added to the fp32 sums before the
    one rounding to the output dtype."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = rm < M
    n_mask = rn < N
    rkb = tl.arange(0, BLOCK_K // 2)  # byte offsets within a tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if DOT_MODE == 3:
        # sm_100+: native block-scaled MMA; scale_block == 32, scales are e8m0 bytes.
        rks = tl.arange(0, BLOCK_K // 32)
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            kb = t * (BLOCK_K // 2) + rkb
            kb_mask = kb < K // 2
            a = tl.load(a_ptr + rm[:, None] * sam + kb[None, :] * sak, mask=m_mask[:, None] & kb_mask[None, :], other=0)
            b = tl.load(b_ptr + rn[:, None] * sbn + kb[None, :] * sbk, mask=n_mask[:, None] & kb_mask[None, :], other=0)
            ks = t * (BLOCK_K // 32) + rks
            ks_mask = ks < n_scale_blocks
            sa = tl.load(
                as_ptr + rm[:, None] * sasm + ks[None, :] * sask, mask=m_mask[:, None] & ks_mask[None, :], other=127
            )
            sb = tl.load(
                bs_ptr + rn[:, None] * sbsn + ks[None, :] * sbsk, mask=n_mask[:, None] & ks_mask[None, :], other=127
            )
            acc = tl.dot_scaled(a, sa, "e2m1", tl.trans(b), sb, "e2m1", acc)
    elif DOT_MODE == 4:
        # NVFP4: scale_block == 16, scales are the e4m3 bytes of the block decode scales
        rks = tl.arange(0, BLOCK_K // 16)
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            kb = t * (BLOCK_K // 2) + rkb
            kb_mask = kb < K // 2
            a = tl.load(a_ptr + rm[:, None] * sam + kb[None, :] * sak, mask=m_mask[:, None] & kb_mask[None, :], other=0)
            b = tl.load(b_ptr + rn[:, None] * sbn + kb[None, :] * sbk, mask=n_mask[:, None] & kb_mask[None, :], other=0)
            ks = t * (BLOCK_K // 16) + rks
            ks_mask = ks < n_scale_blocks
            # 0x38 is E4M3 1.0 (past the edges the codes are zero anyway; never the NaN 0x7F)
            sa = tl.load(
                as_ptr + rm[:, None] * sasm + ks[None, :] * sask, mask=m_mask[:, None] & ks_mask[None, :], other=0x38
            )
            sb = tl.load(
                bs_ptr + rn[:, None] * sbsn + ks[None, :] * sbsk, mask=n_mask[:, None] & ks_mask[None, :], other=0x38
            )
            if DOT_IN_FP32:
                # the interpreter's dot_scaled reads every scale byte as e8m0: multiply the
                # values q * s (exact in fp32) that the MMA multiplies, with an IEEE fp32 dot
                a_vals = _scaled_e2m1_tile(a, sa, BLOCK_M, BLOCK_K)
                b_vals = _scaled_e2m1_tile(b, sb, BLOCK_N, BLOCK_K)
                acc = tl.dot(a_vals, tl.trans(b_vals), acc, input_precision="ieee")
            else:
                sa8 = sa.to(tl.float8e4nv, bitcast=True)  # e4m3 scales: mxf4nvf4 ... block16 on sm_100
                sb8 = sb.to(tl.float8e4nv, bitcast=True)
                acc = tl.dot_scaled(a, sa8, "e2m1", tl.trans(b), sb8, "e2m1", acc)
        # the second level, once per output: (sum * ta) * tb
        acc = (acc * tl.load(at_ptr)) * tl.load(bt_ptr)
    else:
        for sblk in range(0, n_scale_blocks):
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            k_end = tl.minimum((sblk + 1) * scale_block, K)
            for t in range(0, tiles_per_scale):
                k0 = sblk * scale_block + t * BLOCK_K
                kb = k0 // 2 + rkb
                a_ptrs = a_ptr + rm[:, None] * sam + kb[None, :] * sak
                b_ptrs = b_ptr + rn[:, None] * sbn + kb[None, :] * sbk
                if EVEN_K:  # whole tiles: a mask constant along K lets the byte loads vectorise
                    a = tl.load(a_ptrs, mask=m_mask[:, None], other=0)
                    b = tl.load(b_ptrs, mask=n_mask[:, None], other=0)
                else:
                    kb_mask = kb * 2 < k_end
                    a = tl.load(a_ptrs, mask=m_mask[:, None] & kb_mask[None, :], other=0)
                    b = tl.load(b_ptrs, mask=n_mask[:, None] & kb_mask[None, :], other=0)
                a_vals = _e2m1_tile(a, DOT_MODE, DOT_IN_FP32)
                b_vals = _e2m1_tile(b, DOT_MODE, DOT_IN_FP32)
                if DOT_MODE == 0 or DOT_IN_FP32:
                    part = tl.dot(a_vals, tl.trans(b_vals), part, input_precision="ieee")
                elif DOT_MODE == 2:
                    # Hopper's FP8 MMA accumulates with reduced precision unless promoted; a
                    # promotion every 32 products keeps each imprecise partial sum (at most
                    # 32 * 36 in units of 0.25: 13 bits) exact.
                    part = tl.dot(a_vals, tl.trans(b_vals), part, max_num_imprecise_acc=32)
                else:
                    part = tl.dot(a_vals, tl.trans(b_vals), part)
            # 1/S, divided once on the host side (IEEE, as div_rn would) instead of per tile
            inv_a = tl.load(as_ptr + rm * sasm + sblk * sask, mask=m_mask, other=1.0)
            inv_b = tl.load(bs_ptr + rn * sbsn + sblk * sbsk, mask=n_mask, other=1.0)
            acc += (part * inv_a[:, None]) * inv_b[None, :]

    if BIAS_KIND >= 0:
        # F.linear's order: the bias joins the fp32 sums, then one rounding to the output dtype.
        # With FP fusion (Triton's default up to 3.9) NVFP4's (sum * ta) * tb + bias may become
        # one FMA: the same sum wherever ta * tb is a power of two, else one rounding apart,
        # within the ulp that NVFP4's tensor scales already allow (module docstring).
        acc = acc + load_as_f32(bias_ptr + rn, n_mask, BIAS_KIND)[None, :]
    c_ptrs = c_ptr + rm[:, None] * scm + rn[None, :] * scn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if DOT_IN_FP32 or OUT_KIND == 0:
        # the interpreter truncates fp32 -> bf16 casts: round on the grid exactly first
        store_from_f32(c_ptrs, round_to_dtype_grid(acc, OUT_KIND), c_mask, OUT_KIND)
    elif OUT_KIND == 1:  # cvt.rn.bf16.f32: IEEE nearest-even, overflow to inf, as the software rounding
        tl.store(c_ptrs, acc.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(tl.float16), mask=c_mask)


# ============================================================================ host side
def _operand(p: PackedTensor, name: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A 2-D E2M1 PackedTensor -> (codes [rows, K/2] uint8, scales [rows, n_blocks] fp32, rows, K)."""
    if not isinstance(p, PackedTensor):
        raise ValueError(f"gemm_fp4: {name} must be a PackedTensor (from pack or pack_triton), got {type(p).__name__}")
    if p.fmt != E2M1:
        raise ValueError(f"gemm_fp4: {name} is packed as {p.fmt.name}; the FP4 GEMM takes e2m1 operands")
    if len(p.shape) != 2:
        raise ValueError(f"gemm_fp4: {name} must be 2-D, got shape {tuple(p.shape)}")
    if p.block_size is None:
        raise ValueError(f"gemm_fp4: {name} has no block scales (block_size=None); pack it with a block size")
    rows = p.shape[1 - p.axis]
    k_padded = p.shape[p.axis] + p.pad
    if k_padded % 2:
        raise ValueError(f"gemm_fp4: {name}'s reduction length {k_padded} is odd; two codes a byte need an even length")
    codes = p.codes.reshape(-1)[: rows * k_padded // 2].view(rows, k_padded // 2)
    return codes, _per_row(p.scales, p, rows), rows, k_padded


def _per_row(scales: torch.Tensor, p: PackedTensor, rows: int) -> torch.Tensor:
    """Block scales (or their bytes) shaped like ``p.scales`` -> [rows, n_blocks]."""
    scales = scales.reshape(-1)
    if p.block_size == "tensor":
        return scales[:1].view(1, 1).expand(rows, 1)
    return scales.view(rows, -1)


def _block_len(p: PackedTensor, k_padded: int) -> int:
    return k_padded if p.block_size in ("channel", "tensor") else int(p.block_size)


def _e8m0_bytes(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two multipliers S = 2**-e -> the e8m0 byte of the decode scale 2**e (127 + e)."""
    mantissa, exponent = torch.frexp(scales)  # S = 0.5 * 2**exponent
    return (128 - exponent).clamp(0, 254).to(torch.uint8)


def choose_path(block_len: int, scale_format: str, cc: Optional[tuple[int, int]]) -> tuple[str, str]:
    """The path of ``gemm_fp4(path="auto")`` for operands packed with ``block_len``-element blocks
    and ``scale_format`` scales on a GPU of compute capability ``cc`` (``None``: the interpreter),
    and why. Decided from the recipe, never from scale values (no host synchronisation):

    =======================  ==========  ======  ======  =====================
     operands                 sm_100+     sm_90   sm_89   sm_80 / interpreter
    =======================  ==========  ======  ======  =====================
     B=32, e8m0 (MXFP4)       dot_scaled  dot_sc. fp8     bf16
     B=16, e4m3 (NVFP4)       dot_scaled  bf16    bf16    bf16
     B >= 32, other scales    fp8         fp8     fp8     bf16
     B=16, other scales       bf16        bf16    bf16    bf16
    =======================  ==========  ======  ======  =====================

    NVFP4 takes ``tl.dot_scaled`` only where Triton lowers E4M3 scales to the native FP4 MMA
    (sm_100+: ``mxf4nvf4.block16``); on sm_90 it would be an upcast + bf16 wgmma, not taken.
    """
    if cc is None:
        return "bf16", "BF16 tensor cores (E2M1 values are exact in BF16); the interpreter forces no other path"
    if block_len == 32 and scale_format == "e8m0" and cc >= (9, 0):
        how = "native block-scaled FP4 MMA" if cc >= (10, 0) else "E2M1 upcast to bf16 + pipelined wgmma"
        return "dot_scaled", f"tl.dot_scaled on sm_{cc[0]}{cc[1]}: {how}"
    if block_len == 16 and scale_format == "e4m3" and cc >= (10, 0):
        return "dot_scaled", f"tl.dot_scaled with E4M3 scales on sm_{cc[0]}{cc[1]}: native NVFP4 MMA (block16)"
    if block_len >= 32 and cc >= (8, 9):
        return "fp8", f"FP8 tensor cores on sm_{cc[0]}{cc[1]} (E2M1 values are exact in E4M3)"
    return "bf16", "BF16 tensor cores (E2M1 values are exact in BF16)"


def operand_scale_format(a: PackedTensor, b: PackedTensor, scale_format: Optional[str]) -> str:
    """The scale format both operands share: ``scale_format`` when given, else what they were
    packed with (``PackedTensor.scale_format``); ``"fp32"`` (no promise) when they differ."""
    if scale_format is not None:
        if scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format={scale_format!r} is not valid: expected one of {SCALE_FORMATS} or None")
        return scale_format
    fa, fb = getattr(a, "scale_format", "fp32"), getattr(b, "scale_format", "fp32")
    return fa if fa == fb else "fp32"


def _tiles(path: str, block_len: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if path == "dot_scaled":
        return 128, 128, 128, 8, 3
    block_k = min(128, 1 << (block_len.bit_length() - 1)) if block_len >= 16 else 16
    if capability.interpret_requested():
        return 32, 32, block_k, 4, 1
    return 128, 128, block_k, 8, 3


if triton is not None:

    @torch.library.triton_op("lightning_fpq::gemm_fp4", mutates_args=())
    def _gemm_fp4_op(
        a_codes: torch.Tensor,
        a_scales: torch.Tensor,
        b_codes: torch.Tensor,
        b_scales: torch.Tensor,
        a_tscale: torch.Tensor,
        b_tscale: torch.Tensor,
        bias: Optional[torch.Tensor],
        k: int,
        scale_block: int,
        path: str,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        m, n = a_codes.shape[0], b_codes.shape[0]
        out = torch.empty((m, n), dtype=out_dtype, device=a_codes.device)
        block_m, block_n, block_k, num_warps, num_stages = _tiles(path, scale_block)
        n_scale_blocks = a_scales.shape[1]
        tiles_per_scale = -(-scale_block // block_k)
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        out_kind = DTYPE_KINDS[out_dtype]
        out_arg = out.view(torch.int16) if out_kind == 1 else out
        # dot_scaled with 16-element blocks is NVFP4 (gemm_fp4 allows no other): e4m3 scale bytes
        dot_mode = _DOT_SCALED_E4M3 if path == "dot_scaled" and scale_block == 16 else _DOT_MODES[path]
        bias_kind = -1 if bias is None else DTYPE_KINDS[bias.dtype]
        bias_arg = a_tscale if bias is None else bias.view(torch.int16) if bias_kind == 1 else bias  # unread if None
        launcher(_gemm_fp4_kernel)[grid](
            a_codes,
            a_scales,
            b_codes,
            b_scales,
            a_tscale,
            b_tscale,
            bias_arg,
            out_arg,
            m,
            n,
            k,
            n_scale_blocks,
            scale_block,
            tiles_per_scale,
            a_codes.stride(0),
            a_codes.stride(1),
            a_scales.stride(0),
            a_scales.stride(1),
            b_codes.stride(0),
            b_codes.stride(1),
            b_scales.stride(0),
            b_scales.stride(1),
            out.stride(0),
            out.stride(1),
            DOT_MODE=dot_mode,
            DOT_IN_FP32=capability.interpret_requested(),
            EVEN_K=scale_block % block_k == 0,
            BIAS_KIND=bias_kind,
            OUT_KIND=out_kind,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=8,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        return out


def gemm_fp4(
    a: PackedTensor,
    b: PackedTensor,
    *,
    out_dtype: torch.dtype = torch.float32,
    path: str = "auto",
    scale_format: Optional[str] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``unpack(a) @ unpack(b).T (+ bias)`` from packed E2M1 operands, accumulated in float32.

    Args:
        a: (M, K) packed e2m1 along K (``pack(x, "e2m1", block_size=B, axis=-1)``).
        b: (N, K) packed e2m1 along K, like ``F.linear``'s weight. Any 2-D operand packed
            along its reduction dimension works: a (K, N) tensor packed along axis 0 stands
            for its transpose (its codes are stored in (N, K) order), which is how the
            backward pass's ``W`` (blocked along out_features) is passed.
        out_dtype: float32, bfloat16 or float16 (rounded to nearest-even from fp32).
        path: "auto" (:func:`choose_path`: "dot_scaled" on sm_90+ for 32-element blocks with
            e8m0 scales and on sm_100+ for 16-element blocks with e4m3 scales, "fp8" on sm_89+
            for blocks of 32 or more, else "bf16"), or one of them forced; "fp32" uses IEEE
            fp32 dots (slow, for checks). Forcing a path the GPU lacks raises; under the
            interpreter every path can be forced.
        scale_format: what the operands' scales are, "fp32", "e8m0" (a promise that every
            scale is a power of two: "dot_scaled" needs it for 32-element blocks) or "e4m3"
            (NVFP4: "dot_scaled" then reads the E4M3 bytes and tensor scales the operands
            record); by default what they were packed with (``PackedTensor.scale_format``),
            "fp32" if they differ. Never read from the scales themselves, which would
            synchronise the host.
        bias: an optional float32, bfloat16 or float16 tensor of shape (N,) on the operands'
            device, added to the fp32 sums in the kernel before the one rounding to
            ``out_dtype``, as ``F.linear`` adds it (no fp32 (M, N) temporary).

    Block sizes: powers of two from 16, "channel" or "tensor"; both operands must share the
    block size and the padded reduction length. Returns an (M, N) tensor.
    """
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not valid: expected one of {PATHS}")
    if out_dtype not in DTYPE_KINDS:
        raise ValueError(f"out_dtype={out_dtype} is not valid: expected float32, bfloat16 or float16")
    a_codes, a_scales, m, ka = _operand(a, "a")
    b_codes, b_scales, n, kb = _operand(b, "b")
    if ka != kb:
        raise ValueError(f"gemm_fp4: reduction lengths differ (a: {ka}, b: {kb}, padded to whole blocks)")
    if (a.block_size == "tensor") != (b.block_size == "tensor") or _block_len(a, ka) != _block_len(b, kb):
        raise ValueError(f"gemm_fp4: a and b must share the block size, got {a.block_size!r} and {b.block_size!r}")
    block_len = _block_len(a, ka)
    if a.block_size not in ("channel", "tensor") and (block_len < 16 or block_len & (block_len - 1)):
        raise ValueError(
            f"gemm_fp4: block_size={block_len} is not supported: use a power of two >= 16, 'channel' or 'tensor'"
        )
    capability.require(capability.kernel_launchable(_gemm_fp4_kernel), "the Triton FP4 GEMM")
    device = capability.kernel_device()
    for name, t in (("a", a_codes), ("b", b_codes)):
        if t.device.type != device.type:
            raise ValueError(f"gemm_fp4: {name} lives on {t.device}; the kernel runs on {device.type} tensors here")
    interp = capability.interpret_requested()
    sfmt = operand_scale_format(a, b, scale_format)
    if path == "auto":
        path = choose_path(block_len, sfmt, capability.device_capability())[0]
    elif path == "dot_scaled":
        if (block_len, sfmt) not in _DOT_SCALED_OPERANDS:
            raise ValueError(
                f"gemm_fp4: path='dot_scaled' needs 32-element blocks with power-of-two (e8m0) scales or 16-element "
                f"blocks with e4m3 scales (NVFP4), got block_size={block_len} and scale_format={sfmt!r} (pass "
                "scale_format='e8m0' for power-of-two scales)"
            )
        if not interp:
            if sfmt == "e4m3":  # Triton lowers E4M3 scales to the native MMA on sm_100+ only
                capability.require(capability.native_fp4_available(), "gemm_fp4 path='dot_scaled' with e4m3 scales")
            else:
                capability.require(capability.dot_scaled_available(), "gemm_fp4 path='dot_scaled'")
    elif path == "fp8":
        if block_len < 32:
            raise ValueError("gemm_fp4: path='fp8' needs blocks of at least 32 elements (the FP8 MMA's K)")
        if not interp:
            capability.require(capability.fp8_tensor_cores_available(), "gemm_fp4 path='fp8'")
    if bias is not None:
        _check_bias(bias, n, a_codes.device)
        bias = bias.contiguous()  # the kernel reads it with stride 1
    if m == 0 or n == 0 or ka == 0:
        out = torch.zeros((m, n), dtype=out_dtype, device=a_codes.device)
        return out if bias is None else out + bias.to(out_dtype)
    a_tscale, b_tscale = a_scales, b_scales  # read by the NVFP4 path only
    if path == "dot_scaled" and sfmt == "e4m3":
        for name, p in (("a", a), ("b", b)):
            if p.scale_bytes is None or p.tensor_scale is None:
                raise ValueError(
                    f"gemm_fp4: path='dot_scaled' with e4m3 scales needs {name}'s E4M3 scale bytes and tensor "
                    "scale (PackedTensor.scale_bytes, .tensor_scale), which pack and pack_triton record; got None"
                )
        a_scales, b_scales = _per_row(a.scale_bytes, a, m), _per_row(b.scale_bytes, b, n)
        a_tscale = a.tensor_scale.reshape(1).to(device=a_codes.device, dtype=torch.float32)
        b_tscale = b.tensor_scale.reshape(1).to(device=b_codes.device, dtype=torch.float32)
    elif path == "dot_scaled":
        a_scales, b_scales = _e8m0_bytes(a_scales), _e8m0_bytes(b_scales)
    else:
        # the decode multipliers 1/S by tensor / tensor division: correctly rounded on CPU and GPU
        a_scales = torch.ones_like(a_scales, dtype=torch.float32) / a_scales.to(torch.float32)
        b_scales = torch.ones_like(b_scales, dtype=torch.float32) / b_scales.to(torch.float32)
    return torch.ops.lightning_fpq.gemm_fp4(
        a_codes, a_scales, b_codes, b_scales, a_tscale, b_tscale, bias, ka, block_len, path, out_dtype
    )


def _check_bias(bias: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(bias, torch.Tensor) or bias.dtype not in DTYPE_KINDS or tuple(bias.shape) != (n,):
        got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(
            f"gemm_fp4: bias must be a 1-D float tensor of length {n} (float32, bfloat16 or float16), got {got}"
        )
    if bias.device != device:
        raise ValueError(f"gemm_fp4: bias lives on {bias.device}; the operands are on {device}")
