"""Fast paths for ``quantize``: bit-identical to ``quantize_reference`` or not used at all.

``quantize_fast`` returns None when no fast path covers the request (``backend="auto"``
then falls back to the reference); a forced ``backend="compiled"`` that cannot be honoured
raises ``ValueError`` with the reason.

The fast path is one ``torch.compile``'d (inductor) graph per *kernel key*: the layout of
the blocks (no scaling / blocks along a contiguous last axis / blocks along an inner axis /
one tensor-wide block), the block size when it is fixed, the scale format, the rounding mode
and the input dtype. The element format (mantissa bits, emin, emax, max) and the saturation
mode are *runtime* inputs (two tiny tensors), so one compiled kernel serves every ExMy format:
a training run with FP4 and FP8 stages compiles each key once, and inductor's on-disk cache
makes later processes cheaper still. Block counts and row lengths are dynamic, so a new shape
does not recompile.

Why the fp32 arithmetic below equals the reference's float64 rounding (``round_to_format``)
for every format with at most 7 exponent bits:

- ``e = clamp(floor(log2 |y|), emin, 126)`` is read from the fp32 exponent field (an fp32
  subnormal reads as -127, below every supported emin, so the clamp gives emin as frexp would).
- ``t = y * 2**(M - e)`` is exact: a power-of-two scaling whose result lies in
  ``[2**M, 2**(M+1))`` (normal) or, in the format's subnormal range, only loses bits when
  ``|t| < 2**-126``, where both roundings give 0.
- ``round(t)`` (ties to even) or ``floor(float64(|t|) + float64(u))`` (stochastic: the very
  float64 sum the reference forms) gives the same integer; ``q = units * 2**(e - M)`` is exact
  because ``2**(emin - M) >= 2**-85`` is a normal fp32 number and ``|q| < 2**128`` except for
  inputs of at least 2**127, which overflow every supported format anyway.
- ``fmt.max < 2**65`` is exact in fp32, so ``|q| > max`` is the reference's overflow test.
- Block scales, ``x * S``, ``q / S`` and the final clamp/cast are the reference's own fp32
  operations (IEEE division, no reciprocal tricks; inductor's CPU codegen divides by tensors
  as written and compiles without fast-math reassociation or FMA contraction).

E8 formats (bf16, e8m0 ...) fall back to the reference: their steps can be fp32 subnormals
and their max can exceed fp32's. Blocks that do not divide the axis (zero padding) fall back
too. CUDA tensors fall back: the compiled CUDA path (Triton) has not been verified
bit-identical here, and this module only promises what its tests show.

Compile cost (2-core CPU, warm inductor cache): a few seconds per kernel key per process;
a cold cache (first run on a machine) costs 10-30 s once. ``benchmarks/bench_quantize.py``
prints the measured figure.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .formats import FPFormat

logger = logging.getLogger(__name__)

# Below this many elements ``backend="auto"`` stays with the reference: the compiled call's
# fixed cost (guards, wrapper, thread start) is about 20-40 us, which the reference beats
# on tiny tensors, and a tiny call is not worth a first-time compile either.
AUTO_MIN_NUMEL = 1 << 15
MAX_FAST_EBITS = 7  # see the module docstring: E8 formats fall back
# Recompiles allowed per kernel key (dims of size 0/1 and new dtypes get their own keys, so
# a healthy key never needs one; the limit only bounds a misbehaving guard).
_RECOMPILE_LIMIT = 4

_FP32_MAX = torch.finfo(torch.float32).max
_TWO_POW_M127 = 2.0**-127  # the one E8M0 scale that is an fp32 subnormal
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


@functools.lru_cache(maxsize=None)
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
def _round_fp32(y, mbits, emin, fmax, overflow_value, noise=None):
    """``round_to_format`` in fp32 (see the module docstring for why it is exact).

    ``mbits``/``emin`` are int32 scalars, ``fmax``/``overflow_value`` float32 scalars (0-d
    tensors or Python numbers); ``overflow_value`` is max (saturate), inf or NaN.
    """
    bits = y.view(torch.int32)
    e = torch.clamp_max(torch.clamp_min(((bits >> 23) & 0xFF) - 127, emin), 126)
    up = ((127 + mbits - e) << 23).view(torch.float32)  # 2**(M - e)
    step = ((127 - mbits + e) << 23).view(torch.float32)  # 2**(e - M)
    t = y * up
    if noise is None:
        units = torch.round(t)  # ties to even
    else:
        # The reference's float64 sum, formed from the same two fp32 numbers.
        units = torch.floor(t.abs().to(torch.float64) + noise.to(torch.float64)).to(torch.float32)
    q = units * step
    q = torch.where(q.abs() > fmax, overflow_value, q)  # inf overflows too; NaN stays NaN
    return torch.copysign(q, y)


def _e8m0_scale(amax, emax):
    """``block_scales(..., "e8m0")``: ``2**-clamp(floor(log2 amax) - emax, -127, 127)``."""
    e = ((amax.view(torch.int32) >> 23) & 0xFF) - 127  # subnormal amax reads -127: clamps the same
    k = -torch.clamp(e - emax, -127, 127)
    scale = torch.where(k > -127, ((k + 127) << 23).view(torch.float32), _TWO_POW_M127)
    return torch.where(amax > 0, scale, 1.0)


def _e4m3_scale(amax, fmax, fmax_x448):
    """``block_scales(..., "e4m3")``: E4M3 block scales under one fp32 tensor scale."""
    tensor_amax = amax.amax()
    tensor_scale = torch.where(tensor_amax > 0, tensor_amax / fmax_x448, 1.0)
    decode = _round_fp32((amax / fmax) / tensor_scale, _E4M3_MBITS, _E4M3_EMIN, _E4M3_MAX, _E4M3_MAX)
    decode = decode * tensor_scale
    return torch.where(decode > 0, torch.ones_like(decode) / decode, 1.0).clamp(max=_FP32_MAX)


def _make_graph(layout: str, scale_format: str, stochastic: bool, out_dtype: torch.dtype) -> Callable:
    """The function torch.compile traces for one kernel key (a fresh closure per key)."""

    def graph(x, pf, pi, noise=None):
        # pf: fp32 [max, overflow value, output clamp, max * 448]; pi: int32 [mbits, emin, emax]
        fmax, overflow_value, limit, fmax_x448 = pf[0], pf[1], pf[2], pf[3]
        mbits, emin, emax = pi[0], pi[1], pi[2]
        x32 = x.to(torch.float32)
        if layout == PLAIN:
            out = _round_fp32(x32, mbits, emin, fmax, overflow_value, noise)
        else:
            a = x32.abs()
            a = torch.where(torch.isfinite(a), a, 0.0)
            if layout == TENSOR:
                amax = a.amax(dim=0, keepdim=True)
            else:
                amax = a.amax(dim=1, keepdim=True)
            if scale_format == "fp32":
                scale = torch.where(amax > 0, fmax / amax, 1.0).clamp(max=_FP32_MAX)
            elif scale_format == "e8m0":
                scale = _e8m0_scale(amax, emax)
            else:
                scale = _e4m3_scale(amax, fmax, fmax_x448)
            q = _round_fp32(x32 * scale, mbits, emin, fmax, overflow_value, noise)
            out = q / scale
        # The reference's _to_output: clamp to the output dtype's range when saturating
        # (limit = inf otherwise), then cast. Written as a select because ATen's vectorised
        # clamp turns NaN into a negative NaN, and the reference's NaN keeps x's sign.
        out = torch.where(out.abs() > limit, torch.copysign(limit, out), out)
        return out.to(out_dtype)

    return graph


# ------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class _KernelKey:
    layout: str
    static_shape: tuple  # per dim: the size when static, None when dynamic
    scale_format: str
    stochastic: bool
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
_params: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _kernel(key: _KernelKey) -> Callable:
    fn = _kernels.get(key)
    if fn is None:
        graph = _make_graph(key.layout, key.scale_format, key.stochastic, key.dtype)
        # isolate_recompiles: every key is a fresh closure of the same code object, and dynamo
        # caches per code object; isolated, each key keeps its own entries and limit.
        fn = torch.compile(graph, fullgraph=True, dynamic=None, isolate_recompiles=True,
                           recompile_limit=_RECOMPILE_LIMIT)
        _kernels[key] = fn
    return fn


def _format_params(fmt: FPFormat, saturate: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (fmt.ebits, fmt.mbits, fmt.special, saturate, dtype)
    params = _params.get(key)
    if params is None:
        if saturate or not fmt.has_nan:
            overflow_value = fmt.max
        else:
            overflow_value = float("inf") if fmt.has_inf else float("nan")
        limit = torch.finfo(dtype).max if saturate else float("inf")
        # float32(fmt.max * 448): the reference divides by the Python product, which torch
        # rounds to fp32 the same way.
        pf = torch.tensor([fmt.max, overflow_value, limit, fmt.max * _E4M3_MAX], dtype=torch.float32)
        pi = torch.tensor([fmt.mbits, fmt.emin, fmt.emax], dtype=torch.int32)
        params = _params[key] = (pf, pi)
    return params


def _why_not(x: torch.Tensor, fmt: FPFormat, backend: str) -> Optional[str]:
    """Why the compiled path cannot take this call (None: it can)."""
    ok, reason = compiled_available()
    if not ok:
        return reason
    if x.device.type != "cpu":
        return (f"the compiled quantizer runs on CPU tensors only (got {x.device.type}); on other "
                "devices it has not been verified bit-identical to the reference")
    if fmt.ebits > MAX_FAST_EBITS:
        return (f"format {fmt.name} has {fmt.ebits} exponent bits: the fp32 fast path is exact only "
                f"up to {MAX_FAST_EBITS} (E8 steps can be fp32 subnormals)")
    if x.numel() == 0:
        return "an empty tensor has nothing to compile for"
    if x.requires_grad and torch.is_grad_enabled():
        return "x requires grad: the compiled quantizer does not build an autograd graph (use torch.no_grad())"
    if backend == "auto" and x.numel() < AUTO_MIN_NUMEL:
        return f"{x.numel()} elements is below AUTO_MIN_NUMEL={AUTO_MIN_NUMEL}: the reference is faster"
    return None


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
    generator: Optional[torch.Generator],
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
            raise ValueError(f"backend='compiled' cannot quantize this call: {reason}; "
                             "use backend='auto' (falls back to the reference) or 'reference'")
        return None

    reason = _why_not(x, fmt, backend)
    if reason is not None:
        return refuse(reason)
    if torch.compiler.is_compiling():
        # Inside a caller's torch.compile: the reference's ops are traced into their graph.
        return refuse("called while torch.compile is tracing; the enclosing graph compiles the reference")
    xc = x if x.is_contiguous() else x.contiguous()  # a copy, never a write to x
    plan = _plan(xc, block_size, axis)
    if plan is None:
        return refuse(f"block_size={block_size} does not divide axis {axis} of shape {tuple(x.shape)} "
                      "(the reference zero-pads the last block)")
    layout, shape, fixed = plan
    static = tuple(s if (f or s < 2) else None for s, f in zip(shape, fixed))
    key = _KernelKey(layout, static, scale_format, rounding == "stochastic", x.dtype)
    if key in _failed_keys:
        return refuse(_failed_keys[key])
    xv = xc.view(shape)
    dynamic_dims = [d for d, s in enumerate(static) if s is None]
    if dynamic_dims:
        torch._dynamo.mark_dynamic(xv, dynamic_dims)
    pf, pi = _format_params(fmt, saturate, x.dtype)
    args = [xv, pf, pi]
    rng_state = None
    if key.stochastic:
        # The reference's draws, in the same order and shape (quantize._noise); kept
        # undone on failure so the fallback draws the very same numbers.
        gen = generator if generator is not None else torch.default_generator
        rng_state = gen.get_state()
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        args.append(noise.view(shape))
    try:
        if len(dynamic_dims) > 1:
            # Without this, two dynamic dims of equal size at the first call would share one
            # symbol and every later unequal pair would recompile.
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
