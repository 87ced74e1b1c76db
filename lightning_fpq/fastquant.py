"""Fast paths for ``quantize``: bit-identical to ``quantize_reference`` or not used at all.

``quantize_fast`` returns None when no fast path covers the request (``backend="auto"``
then falls back to the reference); a forced ``backend="compiled"`` that cannot be honoured
raises ``ValueError`` with the reason. ``compiled_available()`` says whether it can run here.

The fast path is one ``torch.compile``'d (inductor, C++/OpenMP on CPU) graph per *kernel key*:
the element format, the layout of the blocks (no scaling / blocks along a contiguous last
axis / blocks along an inner axis / one tensor-wide block), the block size when it is fixed,
the scale format, the rounding mode, saturation and the input dtype. Inductor fuses each
block's absmax, scale, rounding and dequantization into one loop nest that reads ``x`` once
from memory. The format's numbers are compile-time constants (runtime scalars cost about a
third more time per element). Block counts and row lengths are dynamic, so a new shape does
not recompile; a training run compiles each key it uses once per process, and inductor's
on-disk cache makes that cheaper in later processes.

Why the fp32 arithmetic below equals the reference's float64 rounding (``round_to_format``)
for every format with at most 7 exponent bits (``emin >= -62``, ``max < 2**65``):

- ``e = clamp(floor(log2 |y|), emin, 126)`` is read from the fp32 exponent field (an fp32
  subnormal reads -127, below every supported emin, so the clamp gives emin as frexp would;
  values of 2**127 and more, inf and NaN, read 126: they overflow every format either way).
- ``t = y * 2**(M - e)`` is exact: a power-of-two scaling into ``[2**M, 2**(M+1))``, or, in
  the format's subnormal range, one that can only lose bits when ``|t| < 2**-126``, where
  both roundings give 0.
- ``round(t)`` (ties to even) or, stochastic, ``floor(float64(|t|) + float64(u))`` (the
  very float64 sum the reference forms, from the same ``torch.rand`` draws) is the
  reference's integer; ``q = units * 2**(e - M)`` is exact: ``2**(emin - M) >= 2**-85`` is a
  normal fp32 number and ``units <= 2**(M+1)``.
- ``max`` is exact in fp32, so ``q > max`` / ``q < -max`` is the reference's overflow test.
- Block scales, ``x * S``, ``q / S`` and the final clamp and cast are the reference's own
  fp32 operations (IEEE division by tensors, never ``float / tensor``, which torch computes as
  a reciprocal times the float; inductor's CPU code is compiled without fast-math
  reassociation or FMA contraction). An e8m0 ``S`` is a power of two, so ``q / S`` is done
  as the exact ``q * (1 / S)``.
- Signs come from selects, not ``copysign``/``clamp``: -0 stays -0 and NaN keeps its sign
  bit, as in the reference.

Falls back to the reference (``auto``) or refuses (``compiled``): E8 formats (bf16,
e8m23 ...: steps can be fp32 subnormals, the max can exceed fp32's), blocks that do not
divide the axis (the reference zero-pads the last block), tensors that require grad while
grad is enabled, calls made while ``torch.compile`` is tracing, and non-CPU tensors (CUDA
takes the Triton kernel; a compiled CUDA graph has not been verified bit-identical here).

Each kernel key compiles once per process (seconds; the figures and the command that measures
them are in docs/backends.md).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import math
import os
import shutil
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from .formats import FPFormat
from .philox import NoiseGenerator, PhiloxGenerator, key_words, uniform4_from_key, uniform_noise

logger = logging.getLogger(__name__)

# Below this many elements ``backend="auto"`` stays with the reference: a compiled call has a
# fixed cost before any work (dynamo guards, wrappers, OpenMP) that small tensors do not repay,
# and the first call of a key compiles for seconds, which only pays off on large tensors.
AUTO_MIN_NUMEL = 1 << 15
MAX_FAST_EBITS = 7  # see the module docstring: E8 formats fall back
# Recompiles allowed per kernel key. Shapes never recompile (dims of size 0/1 get keys of their
# own), but dynamo guards on the dispatch keys of x: inference mode, and inference tensors,
# each compile the key once more (from inductor's cache). The limit bounds anything else.
# torch.compile takes it per function from torch 2.13 on; older torch has only the process-wide
# torch._dynamo.config.recompile_limit (8 by default), which a library must not change.
_RECOMPILE_LIMIT = 8

_FP32_MAX = torch.finfo(torch.float32).max
# NVFP4's block-scale format, E4M3 (fn): 3 mantissa bits, emin -6, max 448.
_E4M3_MBITS, _E4M3_EMIN, _E4M3_MAX = 3, -6, 448.0

# Layouts of the tensor handed to a kernel (see ``_plan``):
PLAIN = "plain"  # (N,)          no scaling
ROWS = "rows"  # (P, B)          blocks along the contiguous last axis
COLS = "cols"  # (P, B, Q)       blocks along an inner axis, Q elements apart
TENSOR = "tensor"  # (N,)        one block


# --------------------------------------------------------------------- capability
_state_lock = threading.Lock()
_compile_failure: Optional[str] = None  # set once a compile fails before any succeeded
_any_compiled = False


@functools.cache
def _static_availability() -> tuple[bool, str]:
    if not hasattr(torch, "compile"):
        return False, f"torch.compile is unavailable: torch {torch.__version__} has no torch.compile"
    try:
        dynamo = importlib.import_module("torch._dynamo")
        cpp_builder = importlib.import_module("torch._inductor.cpp_builder")
    except Exception as exc:  # a broken or partial install
        return False, f"torch.compile is unavailable: importing inductor failed ({exc!r})"
    try:
        supported = dynamo.is_dynamo_supported()
    except Exception as exc:
        return False, f"torch.compile is unavailable: {exc}"
    if not supported:
        return False, "torch.compile is unavailable: torch._dynamo does not support this Python/platform"
    try:
        compiler = cpp_builder.get_cpp_compiler()
    except Exception as exc:  # no compiler found (e.g. Windows without MSVC)
        return False, f"torch.compile is unavailable: no C++ compiler for inductor's CPU backend ({exc})"
    if shutil.which(compiler) is None and not os.path.isfile(compiler):
        return False, f"torch.compile is unavailable: inductor's C++ compiler {compiler!r} is not on PATH"
    return True, f"torch.compile (inductor, C++ compiler {compiler})"


def compiled_available() -> tuple[bool, str]:
    """``(ok, reason)``: can the compiled CPU quantizer run here?

    Static checks (torch.compile present, dynamo supported, a C++ compiler for inductor) are
    cached; a compile that fails before any kernel compiled turns this to False for the rest
    of the process, with the error as the reason.
    """
    ok, reason = _static_availability()
    if not ok:
        return ok, reason
    if _compile_failure is not None:
        return False, _compile_failure
    return ok, reason


# ------------------------------------------------------------------------ the graph
def _round_fp32(y, mbits, emin, fmax, overflow_value, neg_overflow_value, noise=None):
    """``round_to_format`` in fp32 (see the module docstring for why it is exact).

    ``mbits``, ``emin`` (ints) and ``fmax`` are constants; ``overflow_value`` is max
    (saturate), inf or NaN, ``neg_overflow_value`` its negation (numbers, or 0-d tensors for
    NaN). Signs are handled with selects rather than ``copysign``, which inductor's CPU backend
    calls out of line (Sleef) and which cost a third of the loop.
    """
    bits = y.view(torch.int32)
    # e << 23, worked on in place in the exponent field (no shifts): int32 throughout.
    e23 = torch.clamp(bits & 0x7F800000, (emin + 127) << 23, 253 << 23) - (127 << 23)
    up = (((127 + mbits) << 23) - e23).view(torch.float32)  # 2**(M - e)
    step = (((127 - mbits) << 23) + e23).view(torch.float32)  # 2**(e - M)
    t = y * up
    if noise is None:
        # Ties to even; keeps the sign of y, -0 and NaN included (x86 propagates the NaN).
        q = torch.round(t) * step
    else:
        # The reference's float64 sum, formed from the same two fp32 numbers; then y's sign
        # (bits < 0: negative, -0 and negative NaN alike, as copysign would).
        q = torch.floor(t.abs().to(torch.float64) + noise.to(torch.float64)).to(torch.float32) * step
        q = torch.where(bits < 0, -q, q)
    # Overflow (inf included) to the signed overflow value; NaN compares False and stays.
    return torch.where(q > fmax, overflow_value, torch.where(q < -fmax, neg_overflow_value, q))


def _finite_abs(x32):
    """``|x|`` with NaN and inf replaced by 0 (``finite_absmax``'s filter in one compare)."""
    a = x32.abs()
    return torch.where(a < float("inf"), a, 0.0)


def _e8m0_scales(amax, emax):
    """``block_scales(..., "e8m0")`` and its exact inverse, on the exponent bits.

    The reference: ``shared = clamp(floor(log2 amax) - emax, -127, 127)``, ``S = 2**-shared``,
    ``S = 1`` for an all-zero block. With ``E`` the biased exponent of amax (an fp32-subnormal
    amax has E = 0; its shared exponent is below -127 either way and clamps to -127) and
    ``r = (E - emax) << 23``, which is ``bits(2**shared)`` whenever shared >= -126:

    - ``bits(2**shared) = max(r, bits(2**-127))``;
    - ``bits(2**-shared) = max(0x7F000000 - max(r, 0), bits(2**-127))``: ``0x7F000000 -
      bits(2**k) = bits(2**-k)``; ``r <= 0`` (shared = -127) gives 2**127, and shared = 127
      (only possible for emax = 0) gives the fp32 subnormal 2**-127.
    Integer ops only, all within int32: inductor recomputes per-block values once per vector
    of the element loop, so this is kept short.
    """
    amax_bits = amax.view(torch.int32)
    r = (amax_bits & 0x7F800000) - (emax << 23)
    inverse = torch.clamp_min(r, 0x00400000).view(torch.float32)
    scale = torch.clamp_min(0x7F000000 - torch.clamp_min(r, 0), 0x00400000).view(torch.float32)
    nonzero = amax_bits > 0
    return torch.where(nonzero, scale, 1.0), torch.where(nonzero, inverse, 1.0)


def _e4m3_scale(amax, fmax, fmax_x448):
    """``block_scales(..., "e4m3")``: E4M3 block scales under one fp32 tensor scale."""
    tensor_amax = amax.amax()
    tensor_scale = torch.where(tensor_amax > 0, tensor_amax / fmax_x448, 1.0)
    decode = _round_fp32(amax / fmax / tensor_scale, _E4M3_MBITS, _E4M3_EMIN, _E4M3_MAX, _E4M3_MAX, -_E4M3_MAX)
    decode = decode * tensor_scale
    return torch.where(decode > 0, torch.ones_like(decode) / decode, 1.0).clamp(max=_FP32_MAX)


def _make_graph(
    fmt: FPFormat, layout: str, scale_format: str, noise_source: str, saturate: bool, out_dtype: torch.dtype
) -> Callable:
    """The function torch.compile traces for one kernel key (a fresh closure per key).

    Everything but the data is a compile-time constant folded into the C++ loop (runtime
    scalars cost about a third more time per element in reloads and broadcasts, and change
    which intermediates inductor keeps in buffers), except a NaN overflow value (an ``fn``
    format without saturation), whose sign a C++ literal would lose, and the NVFP4 tensor
    scale divisor: those come in ``pf`` = [overflow value, its negation, float32(max * 448)].

    Stochastic rounding (``noise_source``): "tensor" takes the draws as a float32 tensor;
    "philox" computes them in the loop from ``[key word 0, key word 1, first counter]``
    (``lightning_fpq.philox``: four draws a counter), so no noise tensor is written or read.
    """
    mbits, emin, fmax = fmt.mbits, fmt.emin, fmt.max
    # e8m0 aligns the block absmax with the exponent of the largest grid value, as
    # block_scales does (for E0My formats that is below fmt.emax: E0M3's max 7 is 1.75 * 2**2).
    emax = math.frexp(fmax)[1] - 1
    runtime_overflow = not saturate and fmt.has_nan and not fmt.has_inf
    if saturate or not fmt.has_nan:
        overflow = (fmax, -fmax)
    elif fmt.has_inf:
        overflow = (math.inf, -math.inf)
    else:
        overflow = None  # NaN: read from pf
    # The reference's _to_output clamps to the output dtype's range when saturating. Without
    # scaling, |q| <= max: the clamp can only act when max exceeds the dtype's range.
    limit = torch.finfo(out_dtype).max if saturate else None
    if layout == PLAIN and limit is not None and fmax <= limit:
        limit = None

    def graph(x, pf, noise=None):
        ovf, neg_ovf = (pf[0], pf[1]) if runtime_overflow else overflow
        if noise_source == "philox":  # noise holds [key0, key1, first counter]; 4 draws a counter, row-major
            n = x.numel()
            counters = noise[2] + torch.arange((n + 3) // 4, dtype=torch.int64, device=x.device)
            noise = uniform4_from_key(noise[:2], counters).reshape(-1)[:n].view(x.shape)
        x32 = x.to(torch.float32)
        if layout == PLAIN:
            out = _round_fp32(x32, mbits, emin, fmax, ovf, neg_ovf, noise)
        else:
            amax = _finite_abs(x32).amax(dim=0 if layout == TENSOR else 1, keepdim=True)
            if scale_format == "e8m0":
                # S = 2**-shared is a power of two, so q / S == q * 2**shared exactly: one
                # multiply instead of a division per element.
                scale, inverse = _e8m0_scales(amax, emax)
                out = _round_fp32(x32 * scale, mbits, emin, fmax, ovf, neg_ovf, noise) * inverse
            else:
                if scale_format == "fp32":
                    # A tensor numerator: ``float / tensor`` would trace as reciprocal * float.
                    scale = torch.where(amax > 0, torch.full_like(amax, fmax) / amax, 1.0).clamp(max=_FP32_MAX)
                else:
                    scale = _e4m3_scale(amax, fmax, pf[2])
                out = _round_fp32(x32 * scale, mbits, emin, fmax, ovf, neg_ovf, noise) / scale
        if limit is not None:
            # Selects rather than clamp: the vectorised clamp turns NaN into a negative NaN,
            # and the reference's NaN keeps x's sign.
            out = torch.where(out > limit, limit, torch.where(out < -limit, -limit, out))
        return out.to(out_dtype)

    return graph


# ------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class _KernelKey:
    fmt: FPFormat
    layout: str
    static_shape: tuple  # per dim: the size when static, None when dynamic
    scale_format: str
    noise_source: str  # "" (nearest), "tensor" (torch.rand draws) or "philox" (computed in the loop)
    saturate: bool
    dtype: torch.dtype


def _plan(x: torch.Tensor, block_size, axis: int) -> Optional[tuple[str, tuple[int, ...], tuple[bool, ...]]]:
    """(layout, view shape, which dims are fixed per key) for a contiguous ``x``; None if the
    request has no fast layout (a block size that does not divide the axis)."""
    n = x.numel()
    if block_size is None:
        return PLAIN, (n,), (False,)
    if block_size == "tensor" or x.dim() == 0:
        return TENSOR, (n,), (False,)
    axis = axis % x.dim()
    length = x.shape[axis]
    outer = 1
    for s in x.shape[:axis]:
        outer *= s
    inner = n // (outer * length)
    if block_size == "channel":
        size, fixed = length, False
    else:
        if length % block_size:
            return None  # the reference pads the last block with zeros: not covered here
        size, fixed = block_size, True
    rows = outer * (length // size)
    if rows == 1 and inner == 1:
        return TENSOR, (n,), (False,)  # a single block: the tensor-wide layout is the same maths
    if inner == 1:
        return ROWS, (rows, size), (False, fixed)
    return COLS, (rows, size, inner), (False, fixed, False)


_kernels: dict[_KernelKey, Callable] = {}
_failed_keys: dict[_KernelKey, str] = {}
_params: dict[FPFormat, torch.Tensor] = {}


def _own_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own, named ``name``.

    Dynamo keeps its caches and its automatic-dynamic decisions per code object (and, for the
    latter, per (file, line, name) across processes). Closures of one function share a code
    object, so a second kernel key would see the first key's format constants "change" and
    recompile them as symbolic values (slower, and wrong in torch 2.13's handling here). A
    name derived from the key gives every key its own code object, stable across processes.
    """
    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _kernel(key: _KernelKey) -> Callable:
    fn = _kernels.get(key)
    if fn is None:
        graph = _make_graph(key.fmt, key.layout, key.scale_format, key.noise_source, key.saturate, key.dtype)
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        graph = _own_code(graph, f"fpq_quantize_{key.layout}_{digest}")
        fn = torch.compile(graph, fullgraph=True, dynamic=None, **_recompile_limit())
        _kernels[key] = fn
    return fn


def _recompile_limit() -> dict[str, int]:
    """``recompile_limit=`` for ``torch.compile`` where it takes one (torch >= 2.13), else nothing."""
    accepts = "recompile_limit" in inspect.signature(torch.compile).parameters
    return {"recompile_limit": _RECOMPILE_LIMIT} if accepts else {}


def _runtime_params(fmt: FPFormat) -> torch.Tensor:
    """``pf`` of the graph: [NaN, -NaN, float32(max * 448)] (see ``_make_graph``)."""
    pf = _params.get(fmt)
    if pf is None:
        # float32(max * 448): the reference divides by the Python product, which torch rounds
        # to fp32 the same way. -nan is a NaN with the sign bit set, as copysign gives it.
        pf = _params[fmt] = torch.tensor([math.nan, -math.nan, fmt.max * _E4M3_MAX], dtype=torch.float32)
    return pf


def _why_not(x: torch.Tensor, fmt: FPFormat, backend: str) -> Optional[str]:
    """Why the compiled path cannot take this call (None: it can). The cheap checks come
    first, so that a call the fast path would decline never imports inductor."""
    if x.device.type != "cpu":
        return (
            f"the compiled quantizer runs on CPU tensors only (got {x.device.type}); on other "
            "devices it has not been verified bit-identical to the reference"
        )
    if fmt.ebits > MAX_FAST_EBITS:
        return (
            f"format {fmt.name} has {fmt.ebits} exponent bits: the fp32 fast path is exact only "
            f"up to {MAX_FAST_EBITS} (E8 steps can be fp32 subnormals)"
        )
    if fmt.max < 1:
        return f"format {fmt.name} has max {fmt.max} < 1 (a degenerate grid the e8m0 bit tricks do not cover)"
    if x.numel() == 0:
        return "an empty tensor has nothing to compile for"
    if x.requires_grad and torch.is_grad_enabled():
        return "x requires grad: the compiled quantizer does not build an autograd graph (use torch.no_grad())"
    if backend == "auto" and x.numel() < AUTO_MIN_NUMEL:
        return f"{x.numel()} elements is below AUTO_MIN_NUMEL={AUTO_MIN_NUMEL}: the reference is faster"
    ok, reason = compiled_available()
    return None if ok else reason


def _note_failure(key: _KernelKey, exc: BaseException) -> str:
    global _compile_failure
    reason = f"torch.compile failed for {key}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    with _state_lock:
        _failed_keys[key] = reason
        if not _any_compiled and _compile_failure is None:
            # Nothing ever compiled here: the tool chain itself is broken, stop trying.
            _compile_failure = f"torch.compile is unavailable: {reason}"
    logger.debug("lightning_fpq: compiled quantizer unavailable, using the reference: %s", reason)
    return reason


def quantize_fast(
    x: torch.Tensor,
    fmt: FPFormat,
    *,
    block_size,
    axis: int,
    scale_format: str,
    rounding: str,
    generator: Optional[NoiseGenerator],
    saturate: bool,
    backend: str,
) -> Optional[torch.Tensor]:
    """The compiled quantizer, or None where ``backend="auto"`` should use the reference.

    Arguments are already validated by ``quantize``. ``backend="compiled"`` raises
    ``ValueError`` instead of returning None.
    """
    global _any_compiled
    forced = backend == "compiled"

    def refuse(reason: str) -> None:
        if forced:
            raise ValueError(
                f"backend='compiled' cannot quantize this call: {reason}; "
                "use backend='auto' (falls back to the reference) or 'reference'"
            )
        return None

    reason = _why_not(x, fmt, backend)
    if reason is not None:
        return refuse(reason)
    if torch.compiler.is_compiling():
        # Inside a caller's torch.compile: the reference's ops are traced into their graph.
        return refuse("called while torch.compile is tracing; the enclosing graph compiles the reference")
    # detach + no_grad below: every call reaches the kernel with the same grad state, so
    # dynamo's global-state guard never recompiles a key between training and evaluation.
    xc = x.detach()
    xc = xc if xc.is_contiguous() else xc.contiguous()  # a copy, never a write to x
    plan = _plan(xc, block_size, axis)
    if plan is None:
        return refuse(
            f"block_size={block_size} does not divide axis {axis} of shape {tuple(x.shape)} "
            "(the reference zero-pads the last block)"
        )
    layout, shape, fixed = plan
    static = tuple(s if (f or s < 2) else None for s, f in zip(shape, fixed))
    noise_source = "" if rounding != "stochastic" else "philox" if isinstance(generator, PhiloxGenerator) else "tensor"
    key = _KernelKey(fmt, layout, static, scale_format, noise_source, saturate, x.dtype)
    if key in _failed_keys:
        return refuse(_failed_keys[key])
    xv = xc.view(shape)
    dynamic_dims = [d for d, s in enumerate(static) if s is None]
    if dynamic_dims:
        torch._dynamo.mark_dynamic(xv, dynamic_dims)
    args = [xv, _runtime_params(fmt)]
    rng_state = None
    if noise_source:
        # The reference's draws, in the same order and shape (quantize._noise); kept
        # undone on failure so the fallback draws the very same numbers.
        gen = generator if generator is not None else torch.default_generator
        rng_state = gen.get_state()
        if noise_source == "philox":
            seed, first = gen.reserve(x.numel())  # first: a multiple of 4, draw first is counter first // 4
            args.append(torch.tensor([*key_words(seed), first // 4], dtype=torch.int64, device=x.device))
        else:
            noise = uniform_noise(x.shape, generator, x.device).view(shape)
            if dynamic_dims:
                torch._dynamo.mark_dynamic(noise, dynamic_dims)
            args.append(noise)
    try:
        with torch.no_grad():
            if len(dynamic_dims) > 1:
                # Without this, two dynamic dims of equal size at the first call would share
                # one symbol and every later unequal pair would recompile.
                with torch.fx.experimental._config.patch(use_duck_shape=False):
                    out = _kernel(key)(*args)
            else:
                out = _kernel(key)(*args)
    except Exception as exc:
        if rng_state is not None:
            gen.set_state(rng_state)
        reason = _note_failure(key, exc)
        if forced:
            raise ValueError(f"backend='compiled' failed: {reason}") from exc
        return None
    _any_compiled = True
    return out.view(x.shape)
