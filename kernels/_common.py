"""Shared ``@triton.jit`` helpers: exact element rounding and exact output casts.

Nothing here is an op. The helpers avoid two things on purpose:

- hardware/compiler conversions whose rounding we cannot pin down everywhere (Triton's
  interpreter rounds fp32 -> bf16/fp8 casts by truncation; docs/architecture.md, "Known traps"): every
  value is first rounded to its destination grid with exact arithmetic, so the final cast
  or bit store is exact;
- float operations whose result depends on the order or fusion of operations: the scaling
  by powers of two is exact, the round-to-nearest-even uses the ``(t + 2**23) - 2**23``
  trick on a value already scaled to integer units, and the stochastic rounding decides
  ``floor(t + u)`` with an exact two-sum, so it equals the reference's float64 result.
  FMA contraction (Triton's default "FP fusion") cannot change a result either: every
  product that feeds an addition is a multiplication by a power of two, hence exact.

triton is imported lazily-safe: without it this module still imports (``jit`` is then the
identity and no kernel is ever launched; the wrappers check ``triton_available()`` first).
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - exercised by the import itself
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton missing: wrappers refuse with the reason
    triton = None
    tl = None


def jit(fn=None, **options):
    """``triton.jit`` (with its ``options``, e.g. ``do_not_specialize``) when triton is
    importable; the plain function otherwise (never launched)."""
    if fn is None:
        return lambda f: jit(f, **options)
    return triton.jit(fn, **options) if triton is not None else fn


def launcher(kernel):
    """``torch.library.wrap_triton(kernel)``, whose launches ``torch.compile`` can trace; the
    kernel itself where ``wrap_triton`` refuses an interpreted kernel (torch < 2.13 takes only
    JIT-compiled ones): nothing traces a launch under the interpreter, it runs eagerly."""
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(kernel, InterpretedFunction):
            return kernel
        raise


# The float dtypes the kernels load and store, as the IN_KIND / OUT_KIND constants of
# load_as_f32, store_from_f32 and round_to_dtype_grid.
DTYPE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FP32_MAX = 3.4028234663852886e38
BF16_MAX = 3.3895313892515355e38
FP16_MAX = 65504.0
# Special-value modes as kernel constants (FPFormat.special).
SPECIAL_CODES = {"finite": 0, "fn": 1, "ieee": 2}
# What an overflowing value becomes (round_to_format in lightning_fpq/quantize.py).
OVERFLOW_MAX, OVERFLOW_INF, OVERFLOW_NAN = 0, 1, 2


def overflow_mode(special: str, saturate: bool) -> int:
    """Saturate (or a ``finite`` format, which has neither inf nor NaN) -> max; else inf / NaN."""
    if saturate or special == "finite":
        return OVERFLOW_MAX
    return OVERFLOW_INF if special == "ieee" else OVERFLOW_NAN


@jit
def exp2i(j):
    """``2.0 ** j`` as float32 for an int32 tensor ``j`` in [-149, 127], exactly (subnormal below -126)."""
    normal = (j + 127) << 23
    subnormal = 1 << tl.minimum(tl.maximum(j + 149, 0), 22)
    return tl.where(j >= -126, normal, subnormal).to(tl.float32, bitcast=True)


@jit
def round_magnitude(
    a,
    u,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    FMT_MAX: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    OVERFLOW: tl.constexpr,
):
    """Round ``a = |y|`` (float32 >= 0, inf or NaN) to the format's grid; returns a magnitude.

    The step at ``a`` is ``2**k`` with ``k = max(exponent(a), EMIN) - MBITS``. ``t = a / 2**k``
    is computed exactly (two power-of-two multiplies, neither over- nor underflows) and is
    below ``2**(MBITS + 1)``; it is rounded to an integer ``n`` and ``q = n * 2**k`` (exact, or
    inf past fp32's range). Overflow past ``FMT_MAX`` becomes max, inf or NaN per ``OVERFLOW``.
    NaN stays NaN.
    """
    bits = a.to(tl.int32, bitcast=True)
    e = tl.maximum((bits >> 23) - 127, EMIN)  # fp32 subnormals read as -127, below every EMIN
    k = e - MBITS  # in [EMIN - MBITS, 127 - MBITS], within [-149, 127]
    p1 = tl.minimum(tl.maximum(-k, -126), 127)
    t = (a * exp2i(p1)) * exp2i(-k - p1)  # exact: a * 2**-k
    if STOCHASTIC:
        # floor(t + u), decided exactly: s + err == f + u (Knuth's two-sum), f exact.
        n = tl.floor(t)
        f = t - n
        s = f + u
        bb = s - f
        err = (f - (s - bb)) + (u - bb)
        up = (s > 1.0) | ((s == 1.0) & (err >= 0.0))
        n = tl.where(up, n + 1.0, n)
    else:
        if MBITS < 23:
            n = (t + 8388608.0) - 8388608.0  # t < 2**23: adding 2**23 rounds half to even at 1
        else:
            n = t  # 23 mantissa bits: t is already an integer
    q = n * exp2i(k)
    over = q > FMT_MAX  # inf included; NaN compares False and stays NaN
    if OVERFLOW == 0:
        q = tl.where(over, FMT_MAX, q)
    elif OVERFLOW == 1:
        q = tl.where(over, float("inf"), q)
    else:
        q = tl.where(over, float("nan"), q)
    return q


@jit
def copysign_bits(q, negative):
    """``q`` (a magnitude) with the sign bit set where ``negative``."""
    bits = q.to(tl.int32, bitcast=True)
    return tl.where(negative, bits | -2147483648, bits).to(tl.float32, bitcast=True)


@jit
def round_to_dtype_grid(v, OUT_KIND: tl.constexpr):
    """Round float32 ``v`` to the bf16 (OUT_KIND 1) or fp16 (OUT_KIND 2) grid, IEEE nearest-even,
    overflow to inf, NaN kept; float32 (OUT_KIND 0) unchanged. The later cast is then exact."""
    if OUT_KIND == 1:
        q = round_magnitude(tl.abs(v), 0.0, 7, -126, 3.3895313892515355e38, False, 1)
        v = copysign_bits(q, v.to(tl.int32, bitcast=True) < 0)
    elif OUT_KIND == 2:
        q = round_magnitude(tl.abs(v), 0.0, 10, -14, 65504.0, False, 1)
        v = copysign_bits(q, v.to(tl.int32, bitcast=True) < 0)
    return v


@jit
def load_as_f32(ptrs, mask, IN_KIND: tl.constexpr):
    """Load float32 (0), bf16 stored as int16 bits (1) or fp16 (2) as float32, exactly."""
    if IN_KIND == 1:
        raw = tl.load(ptrs, mask=mask, other=0)
        x = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return x


@jit
def store_from_f32(ptrs, v, mask, OUT_KIND: tl.constexpr):
    """Store float32 ``v`` (already on the output grid) as float32 (0), bf16 bits into an int16
    view (1) or fp16 (2). The bf16 path writes the top half of the bits: exact, and immune to
    the interpreter's truncating fp32 -> bf16 cast."""
    if OUT_KIND == 1:
        tl.store(ptrs, (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=mask)
    elif OUT_KIND == 2:
        tl.store(ptrs, v.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, v, mask=mask)
