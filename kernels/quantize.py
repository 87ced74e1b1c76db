"""Fused block-scaled quantization to any ExMy format: one Triton kernel and its host wrapper.

One pass reads ``x`` once (twice for blocks longer than a tile) and writes either the
fake-quantized values (x's dtype) or the packed codes plus the float32 block scales. It
follows the reference quantizer's order of operations bit for bit
(``lightning_fpq/quantize.py``, module docstring):

1. block absmax over the finite values (NaN and inf ignored), padded blocks read zeros;
2. the block's multiplier ``S``: fp32 ``fmt.max / amax`` (IEEE division, ``div_rn``), e8m0
   ``2**-(floor(log2 amax) - emax)``, or NVFP4's two-level e4m3 scale under the tensor's
   fp32 scale; an all-zero block gets ``S = 1``;
3. ``y = x * S`` in float32, rounded to the grid (nearest-even, or stochastic
   ``floor(|y| / step + u)``), overflow saturated (or inf / NaN when not saturating);
4. ``q / S`` (IEEE division), clamped to the output dtype's finite range when saturating,
   rounded to the output dtype; or the codes of ``q`` (``lightning_fpq.packing.encode``).

The blocks run along any axis: the kernel reads ``x`` through a (outer, axis, inner) view
with its own strides, so a transposed operand (the backward pass's ``W`` along
out_features, ``X`` along tokens) is quantized in place of a copy.

Stochastic rounding draws ``u`` from one of three sources: a ``noise`` tensor (shape of
``x``, read by the kernel); a ``generator``, either a ``torch.Generator`` (the wrapper draws
``torch.rand`` exactly as the reference does) or a ``lightning_fpq.philox.PhiloxGenerator``
(Philox inside the kernel: no noise tensor is written or read; the element at row-major
position ``n`` of ``x`` takes draw ``offset + n`` of the stream, four draws per Philox
evaluation, which the reference computes too); or a
``seed`` (the Philox stream of ``PhiloxGenerator(seed)`` from counter 0). Every source gives
the result of ``quantize(..., backend="reference")`` with the same draws, bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lightning_fpq._config import BlockSize
from lightning_fpq.formats import FormatLike, FPFormat
from lightning_fpq.packing import PackedTensor, e4m3_scale_bytes, tensor_scale
from lightning_fpq.philox import NoiseGenerator, PhiloxGenerator, check_seed, uniform_noise
from lightning_fpq.quantize import check_quantize_args

from . import capability
from ._common import (
    BF16_MAX,
    DTYPE_KINDS,
    FP16_MAX,
    FP32_MAX,
    SPECIAL_CODES,
    copysign_bits,
    exp2i,
    jit,
    launcher,
    load_as_f32,
    overflow_mode,
    round_magnitude,
    round_to_dtype_grid,
    store_from_f32,
    tl,
    triton,
)

_OUT_LIMITS = {torch.float32: FP32_MAX, torch.bfloat16: BF16_MAX, torch.float16: FP16_MAX}
_SCALE_MODES = {"fp32": 1, "e8m0": 2, "e4m3": 3}  # 0: no scaling (block_size=None)
_ROUND_NEAREST, _ROUND_NOISE, _ROUND_PHILOX = 0, 1, 2
_OUT_CODES = 3  # OUT_KIND for packed codes
# block_size as the op's int argument
_BLOCK_NONE, _BLOCK_CHANNEL, _BLOCK_TENSOR = 0, -1, -2


# ============================================================================ kernels
@jit
def _block_scale(amax, tamax, FMT_MAX: tl.constexpr, EMAX: tl.constexpr, SCALE_MODE: tl.constexpr):
    """Per-block multiplier S from the finite block absmax (``block_scales`` in the reference)."""
    one = tl.zeros_like(amax) + 1.0
    if SCALE_MODE == 1:  # fp32: S = fmt.max / amax, IEEE division, finite
        s = tl.math.div_rn(tl.zeros_like(amax) + FMT_MAX, tl.where(amax > 0, amax, 1.0))
        s = tl.where(amax > 0, s, one)
        s = tl.where(s > 3.4028234663852886e38, 3.4028234663852886e38, s)
    elif SCALE_MODE == 2:  # e8m0: S = 2**-(floor(log2 amax) - emax), clamped to 2**+-127
        sub = (amax.to(tl.int32, bitcast=True) >> 23) == 0  # fp32 subnormal (or zero) amax
        am = tl.where(sub, amax * 18446744073709551616.0, amax)  # * 2**64, exact
        e = ((am.to(tl.int32, bitcast=True) >> 23) - 127) - tl.where(sub, 64, 0)
        shared = tl.minimum(tl.maximum(e - EMAX, -127), 127)
        s = tl.where(amax > 0, exp2i(-shared), one)
    else:  # e4m3 (NVFP4): two-level, under the fp32 tensor scale t = tensor_amax / (max * 448)
        tscale = tl.where(tamax > 0, tl.math.div_rn(tamax + tl.zeros_like(amax), FMT_MAX * 448.0), one)
        v = tl.math.div_rn(tl.math.div_rn(amax, tl.zeros_like(amax) + FMT_MAX), tscale)
        decode = round_magnitude(v, 0.0, 3, -6, 448.0, False, 0) * tscale
        s = tl.math.div_rn(one, tl.where(decode > 0, decode, 1.0))
        s = tl.where(decode > 0, s, one)
        s = tl.where(s > 3.4028234663852886e38, 3.4028234663852886e38, s)
    return s


@jit
def _quantize_tile(
    x,
    s,
    u,
    out_ptr,
    row,
    k,
    mask,
    MBITS: tl.constexpr,
    EBITS: tl.constexpr,
    EMIN: tl.constexpr,
    BIAS: tl.constexpr,
    FMT_MAX: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUB1: tl.constexpr,
    SUB2: tl.constexpr,
    SPECIAL: tl.constexpr,
    OVERFLOW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SATURATE: tl.constexpr,
    OUT_LIMIT: tl.constexpr,
    OUT_KIND: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Quantize a [BLOCK_V, NB, BLOCK_K] tile (NB blocks of BLOCK_V slices) of float32 ``x``
    with the blocks' multipliers ``s`` [BLOCK_V, NB]; store at ``row + k`` (k: [NB, BLOCK_K],
    already multiplied by the output's stride along the axis, except for packed codes)."""
    if HAS_SCALE:
        y = x * s[:, :, None]
    else:
        y = x
    negative = y.to(tl.int32, bitcast=True) < 0
    q = round_magnitude(tl.abs(y), u, MBITS, EMIN, FMT_MAX, STOCHASTIC, OVERFLOW)
    ptrs = out_ptr + row[:, None, None] + k[None, :, :]
    if OUT_KIND == 3:
        # ---- codes (lightning_fpq.packing.encode): sign | exponent | mantissa
        qbits = q.to(tl.int32, bitcast=True)
        is_nan = q != q
        if EBITS > 0:
            normal = q >= MIN_NORMAL
        else:
            normal = is_nan & (q == q)  # E0My: no normal numbers (all False)
        mant_normal = (qbits >> (23 - MBITS)) & ((1 << MBITS) - 1)
        q_sub = tl.where(normal | is_nan, 0.0, q)
        mant_sub = ((q_sub * SUB1) * SUB2).to(tl.int32)  # q / min_subnormal, exact
        exp_field = tl.where(normal, ((qbits >> 23) - 127) + BIAS, 0)
        code = (exp_field << MBITS) | tl.where(normal, mant_normal, mant_sub)
        top = (1 << EBITS) - 1
        if SPECIAL == 2:  # ieee: inf code
            code = tl.where(q == float("inf"), top << MBITS, code)
        code = tl.where(negative, code | (1 << (EBITS + MBITS)), code)
        if SPECIAL == 0:  # finite: NaN is stored as -0
            code = tl.where(is_nan, 1 << (EBITS + MBITS), code)
        else:
            code = tl.where(is_nan, (top << MBITS) | ((1 << MBITS) - 1), code)
        if CODE_BITS <= 4:
            # two codes a byte, low nibble first: element k of a slice -> byte k // 2
            lo, hi = tl.split(tl.reshape(code, (BLOCK_V, NB * BLOCK_K // 2, 2)))
            byte = (lo | (hi << 4)).to(tl.uint8)
            k_even, _k_odd = tl.split(tl.reshape(k, (NB * BLOCK_K // 2, 2)))
            m_even, _m_odd = tl.split(tl.reshape(mask.to(tl.int32), (BLOCK_V, NB * BLOCK_K // 2, 2)))
            tl.store(out_ptr + row[:, None] + (k_even // 2)[None, :], byte, mask=m_even > 0)
        elif CODE_BITS <= 8:
            tl.store(ptrs, code.to(tl.uint8), mask=mask)
        else:
            tl.store(ptrs, code.to(tl.int16), mask=mask)
    else:
        # ---- fake quantization: copysign, q / S, clamp to the output dtype, round to it
        out = copysign_bits(q, negative)
        if HAS_SCALE:
            out = tl.math.div_rn(out, s[:, :, None] + tl.zeros_like(out))
        if SATURATE:
            out = tl.where(out > OUT_LIMIT, OUT_LIMIT, tl.where(out < -OUT_LIMIT, -OUT_LIMIT, out))
        out = round_to_dtype_grid(out, OUT_KIND)
        store_from_f32(ptrs, out, mask, OUT_KIND)


@jit
def _philox_tile(
    seed,
    offset,
    pv,
    o,
    i,
    k,
    kbase,
    length,
    inner,
    GROUP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The stochastic-rounding draws of a [BLOCK_V, NB, BLOCK_K] tile: element (o, k, i) takes
    draw ``d = offset + n`` (``n`` its row-major index in x), which is word ``d % 4`` of
    ``tl.rand4x(seed, d // 4)`` (``lightning_fpq.philox``; ``offset`` is a multiple of 4).

    GROUP 1 (blocks along the last axis, row length, block and tile multiples of 4): four
    consecutive k share one counter, so Philox runs once per four elements and its words are
    interleaved along k. GROUP 2 (slices contiguous, ``inner`` and BLOCK_V multiples of 4):
    the same along the slices. GROUP 0: one Philox evaluation per element, its word selected."""
    if GROUP == 1:
        kq = kbase + 4 * tl.arange(0, BLOCK_K // 4)[None, :]  # [NB, BLOCK_K // 4]: each group's first k
        d = offset + (o * length)[:, None, None] + kq[None, :, :]
        u0, u1, u2, u3 = tl.rand4x(seed, d >> 2)
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK_V, NB, BLOCK_K))
    elif GROUP == 2:
        vq = (pv * BLOCK_V + 4 * tl.arange(0, BLOCK_V // 4)).to(tl.int64)  # each group's first slice
        d = offset + ((vq // inner) * length * inner + vq % inner)[:, None, None] + (k * inner)[None, :, :]
        u0, u1, u2, u3 = tl.rand4x(seed, d >> 2)  # [BLOCK_V // 4, NB, BLOCK_K] each
        z = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [.., NB, BLOCK_K, 2, 2]: word 2b + a at [.., b, a]
        u = tl.reshape(tl.permute(z, (0, 3, 4, 1, 2)), (BLOCK_V, NB, BLOCK_K))
    else:
        d = offset + (o * length * inner + i)[:, None, None] + (k * inner)[None, :, :]
        u0, u1, u2, u3 = tl.rand4x(seed, d >> 2)
        w = d & 3
        u = tl.where(w == 0, u0, tl.where(w == 1, u1, tl.where(w == 2, u2, u3)))
    return u


# seed and offset change from call to call (rng="philox"): typed int64 and never specialised,
# so that one compiled kernel serves every value (else one per width, per value 1 and per
# divisibility by 16 of each: tests/test_kernel_compile.py)
@jit(do_not_specialize=["seed", "offset"])
def _block_quantize_kernel(
    x_ptr,
    noise_ptr,
    tamax_ptr,
    out_ptr,
    scale_ptr,
    n_vec,
    inner,
    length,
    n_blocks,
    block_len,
    seed: tl.int64,
    offset: tl.int64,
    sxo,
    sxl,
    sxi,
    sno,
    snl,
    sni,
    soo,
    sol,
    soi,
    MBITS: tl.constexpr,
    EBITS: tl.constexpr,
    EMIN: tl.constexpr,
    EMAX: tl.constexpr,
    BIAS: tl.constexpr,
    FMT_MAX: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUB1: tl.constexpr,
    SUB2: tl.constexpr,
    SPECIAL: tl.constexpr,
    OVERFLOW: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    TENSOR_BLOCK: tl.constexpr,
    ROUND_MODE: tl.constexpr,
    PHILOX_GROUP: tl.constexpr,
    SATURATE: tl.constexpr,
    OUT_LIMIT: tl.constexpr,
    IN_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_CHUNKS: tl.constexpr,
):
    """One program: BLOCK_V slices along the block axis x NB consecutive blocks of
    ``block_len`` elements, each block read in N_CHUNKS tiles of BLOCK_K (NB is 1 when
    N_CHUNKS > 1). Element (o, l, i) lives at ``o*sxo + l*sxl + i*sxi``; slice v = o*inner + i.
    A block's absmax needs the whole block, so a block longer than one tile is read twice."""
    pid = tl.program_id(0)
    n_groups = tl.cdiv(n_blocks, NB)
    pg = pid % n_groups
    pv = pid // n_groups
    v = pv * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < n_vec
    v64 = v.to(tl.int64)
    o = v64 // inner
    i = v64 % inner
    x_row = o * sxo + i * sxi  # [BLOCK_V]
    blk = pg * NB + tl.arange(0, NB)  # [NB]
    bmask = blk < n_blocks
    k0 = blk.to(tl.int64) * block_len  # [NB]
    arange_k = tl.arange(0, BLOCK_K)
    HAS_SCALE: tl.constexpr = SCALE_MODE > 0
    STOCHASTIC: tl.constexpr = ROUND_MODE > 0

    if TENSOR_BLOCK or SCALE_MODE == 3:
        tamax = tl.load(tamax_ptr)  # the tensor's finite absmax (computed beforehand)
    else:
        tamax = 0.0
    # ---- pass 1: block absmax over finite values
    if HAS_SCALE:
        if TENSOR_BLOCK:
            amax = tl.zeros([BLOCK_V, NB], dtype=tl.float32) + tamax
        else:
            amax = tl.zeros([BLOCK_V, NB], dtype=tl.float32)
            for c in range(N_CHUNKS):
                kk = c * BLOCK_K + arange_k
                k = k0[:, None] + kk[None, :]  # [NB, BLOCK_K]
                kmask = bmask[:, None] & (kk < block_len)[None, :] & (k < length)
                mask = vmask[:, None, None] & kmask[None, :, :]
                x = load_as_f32(x_ptr + x_row[:, None, None] + (k * sxl)[None, :, :], mask, IN_KIND)
                ax = tl.abs(x)
                ax = tl.where(ax < float("inf"), ax, 0.0)  # NaN and inf ignored
                amax = tl.maximum(amax, tl.max(ax, axis=2))
        s = _block_scale(amax, tamax, FMT_MAX, EMAX, SCALE_MODE)
        if OUT_KIND == 3:
            tl.store(scale_ptr + v64[:, None] * n_blocks + blk[None, :], s, mask=vmask[:, None] & bmask[None, :])
    else:
        s = tl.zeros([BLOCK_V, NB], dtype=tl.float32) + 1.0

    # ---- pass 2: scale, round, store
    out_row = o * soo + i * soi
    for c in range(N_CHUNKS):
        kk = c * BLOCK_K + arange_k
        k = k0[:, None] + kk[None, :]
        kmask = bmask[:, None] & (kk < block_len)[None, :] & (k < length)
        mask = vmask[:, None, None] & kmask[None, :, :]
        x = load_as_f32(x_ptr + x_row[:, None, None] + (k * sxl)[None, :, :], mask, IN_KIND)
        if ROUND_MODE == 1:
            n_row = o * sno + i * sni
            u = tl.load(noise_ptr + n_row[:, None, None] + (k * snl)[None, :, :], mask=mask, other=0.0)
        elif ROUND_MODE == 2:
            kbase = k0[:, None] + c * BLOCK_K  # [NB, 1]: the chunk's first k in each block
            u = _philox_tile(seed, offset, pv, o, i, k, kbase, length, inner, PHILOX_GROUP, BLOCK_V, NB, BLOCK_K)
        else:
            u = 0.0
        if OUT_KIND == 3:
            # codes cover the padded block too (pack pads with zeros); sol is 1 for codes
            store_mask = vmask[:, None, None] & (bmask[:, None] & (kk < block_len)[None, :])[None, :, :]
            k_out = k
        else:
            store_mask = mask
            k_out = k * sol
        _quantize_tile(
            x,
            s,
            u,
            out_ptr,
            out_row,
            k_out,
            store_mask,
            MBITS,
            EBITS,
            EMIN,
            BIAS,
            FMT_MAX,
            MIN_NORMAL,
            SUB1,
            SUB2,
            SPECIAL,
            OVERFLOW,
            HAS_SCALE,
            STOCHASTIC,
            SATURATE,
            OUT_LIMIT,
            OUT_KIND,
            CODE_BITS,
            BLOCK_V,
            NB,
            BLOCK_K,
        )


@jit
def _finite_absmax_kernel(
    x_ptr,
    partial_ptr,
    n_vec,
    inner,
    length,
    sxo,
    sxl,
    sxi,
    IN_KIND: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-program max of |x| over finite values; the host takes the max of the partials."""
    pid_v = tl.program_id(0)
    pid_k = tl.program_id(1)
    v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v64 = v.to(tl.int64)
    k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (v < n_vec)[:, None] & (k < length)[None, :]
    x = load_as_f32(x_ptr + ((v64 // inner) * sxo + (v64 % inner) * sxi)[:, None] + k[None, :] * sxl, mask, IN_KIND)
    ax = tl.abs(x)
    ax = tl.where(ax < float("inf"), ax, 0.0)
    tl.store(partial_ptr + pid_v * tl.num_programs(1) + pid_k, tl.max(tl.max(ax, axis=1), axis=0))


# ============================================================================ host side
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tiles(
    block_len: int,
    n_blocks: int,
    n_vec: int,
    vectors_contiguous: bool,
    philox: bool = False,
    interp: Optional[bool] = None,
) -> tuple[int, int, int, int]:
    """(BLOCK_V, NB, BLOCK_K, N_CHUNKS): slices x blocks x elements a program holds.

    Compiled: about 4096 elements a program, 2048 when the program computes Philox draws
    (``philox``: each element's 10 rounds hold six 32-bit words; at 4096 the NVFP4 column
    kernel compiled to 236-255 registers on sm_90/sm_100, against 142-168 reading a noise
    tensor; ``benchmarks/kernel_resources.py``). Blocks along rows (elements contiguous) put
    NB short blocks side by side, so that a program reads at least 256 consecutive elements
    of each row; blocks along columns (slices contiguous) take at least 64 slices instead,
    also when a block is longer than one tile ("channel" or "tensor" along axis 0: 64 slices
    x 64 elements a chunk, so that each row of a tile is 128 contiguous bytes of bf16, not 4
    elements). Interpreted: as few programs as possible (each costs milliseconds of Python).
    The tiling never changes a value: amax and rounding are per block and per element."""
    interp = capability.interpret_requested() if interp is None else interp
    max_k = 4096 if interp else 1024
    target = 16384 if interp else 2048 if philox else 4096
    block_k = max(2, min(_next_pow2(block_len), max_k))
    n_chunks = -(-block_len // block_k)
    if n_chunks > 1 and vectors_contiguous and not interp:
        block_v = min(_next_pow2(n_vec), 64)
        block_k = min(max_k, target // block_v)
        return block_v, 1, block_k, -(-block_len // block_k)
    nb = 1
    if n_chunks == 1:
        if interp:
            want = _next_pow2(n_blocks)
        elif vectors_contiguous:
            want = max(1, target // (64 * block_k))
        else:
            want = max(1, 256 // block_k)
        nb = max(1, min(want, _next_pow2(n_blocks), target // block_k))
    block_v = max(1, min(_next_pow2(n_vec), target // (nb * block_k)))
    return block_v, nb, block_k, n_chunks


def _philox_group(round_mode: int, inner: int, length: int, block_len: int, block_v: int, block_k: int) -> int:
    """How ``_philox_tile`` shares Philox counters in this launch: 1 along k, 2 along the
    slices, 0 not at all (one evaluation per element: shapes whose groups of four would
    straddle a row, a block or a tile). Every choice computes the same draws."""
    if round_mode != _ROUND_PHILOX:
        return 0
    if inner == 1 and length % 4 == 0 and block_len % 4 == 0 and block_k % 4 == 0:
        return 1
    if inner % 4 == 0 and block_v % 4 == 0:
        return 2
    return 0


def _view3(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, int, int, int]:
    """``t`` as an (outer, length, inner) view around ``axis`` (a copy only if no view exists)."""
    shape = tuple(t.shape) or (1,)
    outer = math.prod(shape[:axis])
    length = shape[axis]
    inner = math.prod(shape[axis + 1 :])
    t = t.reshape(shape) if t.dim() == 0 else t
    try:
        return t.view(outer, length, inner), outer, length, inner
    except RuntimeError:  # strides that no 3-d view can express: one copy
        return t.contiguous().view(outer, length, inner), outer, length, inner


def _tensor_finite_absmax(x3: torch.Tensor, outer: int, length: int, inner: int, in_kind: int) -> torch.Tensor:
    n_vec = outer * inner
    block_v, block_k = (64, 256) if not capability.interpret_requested() else (256, 1024)
    grid = (triton.cdiv(n_vec, block_v), triton.cdiv(length, block_k))
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=x3.device)
    src = x3.view(torch.int16) if in_kind == 1 else x3
    launcher(_finite_absmax_kernel)[grid](
        src,
        partial,
        n_vec,
        inner,
        length,
        x3.stride(0),
        x3.stride(1),
        x3.stride(2),
        IN_KIND=in_kind,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
    )
    return partial.amax()


def _check_launchable(x: torch.Tensor) -> None:
    capability.require(capability.kernel_launchable(_block_quantize_kernel), "the Triton quantize kernel")
    device = capability.kernel_device()
    if x.device.type != device.type:
        raise ValueError(
            f"the Triton quantize kernel runs on {device.type} tensors here "
            f"({capability.triton_available()[1]}), got a tensor on {x.device}"
        )


def _run(
    x: torch.Tensor,
    noise: Optional[torch.Tensor],
    ebits: int,
    mbits: int,
    special: str,
    block: int,
    axis: int,
    scale_format: str,
    round_mode: int,
    seed: int,
    offset: int,
    saturate: bool,
    packed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The launch behind both ops (arguments validated). Returns (values or codes, scales, the
    tensor's finite absmax as one element where the scales needed it, else an empty tensor)."""
    fmt = FPFormat(ebits=ebits, mbits=mbits, special=special)
    shape = tuple(x.shape)
    ndim = max(x.dim(), 1)
    if block == _BLOCK_NONE:
        axis = ndim - 1  # no blocks: codes follow x's natural order (pack does the same)
    x3, outer, length, inner = _view3(x, axis)
    n_vec = outer * inner
    block_len = length if block in (_BLOCK_NONE, _BLOCK_CHANNEL, _BLOCK_TENSOR) else block
    n_blocks = max(1, -(-length // block_len))
    padded = n_blocks * block_len
    in_kind = DTYPE_KINDS[x.dtype]
    scale_mode = 0 if block == _BLOCK_NONE else _SCALE_MODES[scale_format]
    needs_tamax = scale_mode == 3 or (block == _BLOCK_TENSOR and scale_mode > 0)
    tamax = _tensor_finite_absmax(x3, outer, length, inner, in_kind) if needs_tamax else None

    if packed:
        out_kind = _OUT_CODES
        if fmt.bits <= 4:
            out = torch.empty(n_vec * padded // 2, dtype=torch.uint8, device=x.device)
            # element k of vector v -> byte v * padded/2 + k // 2 (the kernel halves k itself)
            so = (inner * padded // 2, 1, padded // 2)
        else:
            out = torch.empty(n_vec * padded, dtype=torch.uint8 if fmt.bits <= 8 else torch.int16, device=x.device)
            so = (inner * padded, 1, padded)
        out_arg = out
    else:
        out_kind = in_kind
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        out3 = out.view(outer, length, inner)
        so = out3.stride()
        out_arg = out.view(torch.int16) if in_kind == 1 else out
    scales = torch.empty((n_vec, n_blocks) if scale_mode else (1,), dtype=torch.float32, device=x.device)

    if noise is not None:
        n3 = _view3(noise, axis)[0]
        sn = n3.stride()
    else:
        n3, sn = x3, (0, 0, 0)
    p = fmt.mbits - fmt.emin  # q / min_subnormal = q * 2**p, as two fp32 factors
    p1 = min(p, 127)
    contiguous_slices = inner > 1 and x3.stride(2) == 1
    block_v, nb, block_k, n_chunks = _tiles(block_len, n_blocks, n_vec, contiguous_slices, round_mode == _ROUND_PHILOX)
    grid = (triton.cdiv(n_vec, block_v) * triton.cdiv(n_blocks, nb),)
    launcher(_block_quantize_kernel)[grid](
        x3.view(torch.int16) if in_kind == 1 else x3,
        n3,
        tamax if tamax is not None else scales,
        out_arg,
        scales,
        n_vec,
        inner,
        length,
        n_blocks,
        block_len,
        seed,
        offset,
        x3.stride(0),
        x3.stride(1),
        x3.stride(2),
        sn[0],
        sn[1],
        sn[2],
        so[0],
        so[1],
        so[2],
        MBITS=fmt.mbits,
        EBITS=fmt.ebits,
        EMIN=fmt.emin,
        EMAX=fmt.emax,
        BIAS=fmt.bias,
        FMT_MAX=fmt.max,
        MIN_NORMAL=fmt.min_normal,
        SUB1=2.0**p1,
        SUB2=2.0 ** (p - p1),
        SPECIAL=SPECIAL_CODES[fmt.special],
        OVERFLOW=overflow_mode(fmt.special, saturate),
        SCALE_MODE=scale_mode,
        TENSOR_BLOCK=block == _BLOCK_TENSOR,
        ROUND_MODE=round_mode,
        PHILOX_GROUP=_philox_group(round_mode, inner, length, block_len, block_v, block_k),
        SATURATE=saturate,
        OUT_LIMIT=_OUT_LIMITS[x.dtype],
        IN_KIND=in_kind,
        OUT_KIND=out_kind,
        CODE_BITS=fmt.bits,
        BLOCK_V=block_v,
        NB=nb,
        BLOCK_K=block_k,
        N_CHUNKS=n_chunks,
    )
    return out, scales, tamax.reshape(1) if tamax is not None else scales.new_empty(0)


if triton is not None:
    _OP_ARGS = dict(mutates_args=())

    @torch.library.triton_op("lightning_fpq::block_quantize", **_OP_ARGS)
    def _block_quantize_op(
        x: torch.Tensor,
        noise: Optional[torch.Tensor],
        ebits: int,
        mbits: int,
        special: str,
        block: int,
        axis: int,
        scale_format: str,
        round_mode: int,
        seed: int,
        offset: int,
        saturate: bool,
    ) -> torch.Tensor:
        return _run(
            x, noise, ebits, mbits, special, block, axis, scale_format, round_mode, seed, offset, saturate, False
        )[0]

    @torch.library.triton_op("lightning_fpq::block_pack", **_OP_ARGS)
    def _block_pack_op(
        x: torch.Tensor,
        noise: Optional[torch.Tensor],
        ebits: int,
        mbits: int,
        special: str,
        block: int,
        axis: int,
        scale_format: str,
        round_mode: int,
        seed: int,
        offset: int,
        saturate: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _run(
            x, noise, ebits, mbits, special, block, axis, scale_format, round_mode, seed, offset, saturate, True
        )


def _prepare(
    x: torch.Tensor,
    fmt: FormatLike,
    block_size: BlockSize,
    axis: int,
    scale_format: str,
    rounding: str,
    generator: Optional[NoiseGenerator],
    noise: Optional[torch.Tensor],
    seed: Optional[int],
) -> tuple[FPFormat, int, int, int, Optional[torch.Tensor], int, int]:
    """Validate the public arguments; returns (fmt, block, axis, round_mode, noise, seed, offset)."""
    fmt, block_size = check_quantize_args(
        x, fmt, block_size, axis, scale_format, rounding, who="the Triton quantize kernel"
    )
    axis = axis % max(x.dim(), 1)
    block = {None: _BLOCK_NONE, "channel": _BLOCK_CHANNEL, "tensor": _BLOCK_TENSOR}.get(block_size, block_size)
    sources = sum(s is not None for s in (generator, noise, seed))
    if rounding == "nearest":
        if sources:
            raise ValueError("generator, noise and seed are for rounding='stochastic'; rounding='nearest' takes none")
        return fmt, block, axis, _ROUND_NEAREST, None, 0, 0
    if sources > 1:
        raise ValueError("pass at most one of generator, noise and seed for stochastic rounding")
    if seed is not None:
        return fmt, block, axis, _ROUND_PHILOX, None, check_seed(seed, "seed"), 0
    if isinstance(generator, PhiloxGenerator):
        # draws offset .. offset + numel - 1, as the reference takes them (philox.py)
        seed, offset = generator.reserve(x.numel())
        return fmt, block, axis, _ROUND_PHILOX, None, seed, offset
    if noise is None:
        # The reference's draw (quantize._noise): same generator, shape and order -> same bits.
        noise = uniform_noise(x.shape, generator, x.device)
    elif noise.shape != x.shape or noise.dtype != torch.float32 or noise.device != x.device:
        raise ValueError(
            f"noise must be a float32 tensor of x's shape {tuple(x.shape)} on {x.device}, "
            f"got {noise.dtype} {tuple(noise.shape)} on {noise.device}"
        )
    return fmt, block, axis, _ROUND_NOISE, noise, 0, 0


def quantize_triton(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
    scale_format: str = "fp32",
    rounding: str = "nearest",
    generator: Optional[NoiseGenerator] = None,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Fake-quantize ``x`` with one fused kernel; bit-identical to ``quantize(..., backend="reference")``.

    Takes the reference's arguments (``lightning_fpq.quantize.quantize``) plus two sources of
    stochastic-rounding noise: ``noise`` (a float32 tensor of x's shape with values in
    [0, 1)) or ``seed`` (in-kernel Philox from counter 0: ``generator=PhiloxGenerator(seed)``).
    With neither, the noise comes from ``generator`` as in the reference: ``torch.rand`` on a
    ``torch.Generator``, in-kernel Philox on a ``PhiloxGenerator`` (no noise tensor).

    Raises RuntimeError with the capability's reason where the kernel cannot run (no
    triton, no GPU and no interpreter), ValueError for invalid arguments.
    """
    fmt, block, axis, round_mode, noise, seed, offset = _prepare(
        x, fmt, block_size, axis, scale_format, rounding, generator, noise, seed
    )
    _check_launchable(x)
    if x.numel() == 0:
        return x.clone()
    return torch.ops.lightning_fpq.block_quantize(
        x, noise, fmt.ebits, fmt.mbits, fmt.special, block, axis, scale_format, round_mode, seed, offset, saturate
    )


def pack_triton(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
    scale_format: str = "fp32",
    rounding: str = "nearest",
    generator: Optional[NoiseGenerator] = None,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    saturate: bool = True,
) -> PackedTensor:
    """Quantize ``x`` into codes plus scales with one fused kernel: the ``PackedTensor`` that
    ``lightning_fpq.packing.pack`` returns (same codes, same scales, same layout; ``unpack``
    reads it). Stochastic rounding is also offered (``pack`` itself rounds to nearest).

    Formats of at most 16 bits. For formats of at most 4 bits (two codes a byte) each slice
    along ``axis``, padded to whole blocks, must have an even length, so that no byte holds
    codes of two slices; ``pack`` handles the other cases.
    """
    fmt, block, axis, round_mode, noise, seed, offset = _prepare(
        x, fmt, block_size, axis, scale_format, rounding, generator, noise, seed
    )
    if fmt.bits > 16:
        raise ValueError(
            f"pack_triton stores codes of at most 16 bits; {fmt.name} has {fmt.bits}: use lightning_fpq.packing.pack"
        )
    shape = tuple(x.shape) or (1,)
    code_axis = len(shape) - 1 if block == _BLOCK_NONE else axis  # "tensor" codes follow the moved axis, as in pack
    length = shape[code_axis]
    block_len = length if block <= 0 else block
    padded = -(-length // block_len) * block_len if length else 0
    if fmt.bits <= 4 and padded % 2:
        raise ValueError(
            f"pack_triton packs two {fmt.name} codes a byte within each slice: the slice length along "
            f"axis {code_axis} padded to whole blocks is {padded}, which is odd; use lightning_fpq.packing.pack"
        )
    if x.numel() == 0:
        raise ValueError("pack_triton needs a non-empty tensor")
    _check_launchable(x)
    codes, scales, tamax = torch.ops.lightning_fpq.block_pack(
        x, noise, fmt.ebits, fmt.mbits, fmt.special, block, axis, scale_format, round_mode, seed, offset, saturate
    )
    if block == _BLOCK_NONE:
        scales_out = None
    elif block == _BLOCK_TENSOR:
        scales_out = scales.reshape(-1)[:1].reshape(1, 1)  # every slice holds the one tensor scale
    else:
        moved = shape[:axis] + shape[axis + 1 :]
        scales_out = scales.reshape(*moved, -1, 1)
    block_size = {_BLOCK_NONE: None, _BLOCK_CHANNEL: "channel", _BLOCK_TENSOR: "tensor"}.get(block, block)
    pad = padded - length if block > 0 else 0
    # records the scale format (gemm_fp4 picks its path without reading the scales) and, for
    # NVFP4, the E4M3 bytes and tensor scale that tl.dot_scaled needs, as pack does (device ops, no sync)
    sbytes = tscale = None
    if scales_out is not None and scale_format == "e4m3":
        tscale = tensor_scale(tamax, fmt)
        sbytes = e4m3_scale_bytes(scales_out, tscale)
    recorded = scale_format if scales_out is not None else "fp32"
    return PackedTensor(codes, scales_out, x.shape, x.dtype, fmt, block_size, axis, pad, recorded, sbytes, tscale)
