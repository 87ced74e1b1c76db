"""Which implementation runs a quantized linear layer, whether it can, and why.

Layer backends (``FPQuantPrecision(backend=...)``), each computing the recipe's six quantized
operands exactly as the pure-torch reference quantizer does:

- ``"emulated"``: the reference quantizer (``quantize(backend="reference")``) then the GEMMs
  in the compute dtype. Runs every recipe on every device; the ground truth of the others.
- ``"compiled"``: the same maths with the ``torch.compile``'d quantizer of ``fastquant.py``
  (CPU tensors; bit-identical, about 50x faster than the reference there).
- ``"triton"``: the fused Triton quantize kernel (blocks along rows or columns, no transposed
  copy; the reference for formats wider than fp32) and, for every GEMM whose two operands are both E2M1 with a shared block length, the
  packed FP4 GEMM kernel (``lightning_fpq.kernels.gemm_fp4``); the other GEMMs run in the
  compute dtype. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
- ``"torchao_float8"`` (alias ``"torchao"``): torchao's float8 training autograd function, real
  FP8 GEMMs on CUDA SM89+, torchao's emulation elsewhere. Only FP8 specs it expresses exactly.
- ``"transformer_engine"`` (alias ``"te"``): Transformer Engine's FP8 recipes
  (``te_linear.py``), NVIDIA GPUs only, for the specs that match a TE recipe exactly.
- ``"auto"``: per layer and recipe stage, the first backend in :data:`AUTO_ORDER` for the
  device that is available and honours the spec exactly.

A forced backend that cannot run on this machine raises :class:`BackendUnavailableError`
carrying the reason. A forced backend that can run but cannot compute one stage's spec exactly
(``torchao_float8`` in an FP4 stage) leaves that stage to what ``auto`` would pick, never to a
different recipe, and the plugin says so once.

Every check returns ``(available, reason)`` and is cached. This module knows formats and
recipes, nothing of Lightning; torchao, triton and Transformer Engine are imported lazily.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..formats import FPFormat
from ..recipe import LayerSpec, OperandSpec

LAYER_BACKENDS = ("emulated", "compiled", "triton", "torchao_float8", "transformer_engine")
ALIASES = {"torchao": "torchao_float8", "te": "transformer_engine"}
BACKENDS = ("auto",) + LAYER_BACKENDS
#: ``auto``'s preference per device type: the fastest first (real FP8 GEMMs, then the packed
#: FP4 GEMM and fused quantizer, then the compiled quantizer), the reference last.
AUTO_ORDER = {
    "cuda": ("torchao_float8", "transformer_engine", "triton", "emulated"),
    "cpu": ("compiled", "emulated"),
}
#: the ``quantize(backend=...)`` each fake-quantizing layer backend uses for its dense
#: operands. "auto" for triton: the fused kernel for CUDA tensors in formats that fit fp32,
#: the reference for the rest (E8 formats wider than fp32), never an error mid-training.
QUANTIZER = {"emulated": "reference", "compiled": "auto", "triton": "auto"}

Capability = tuple[bool, str]
_E2M1 = FPFormat.parse("e2m1")
_E4M3 = FPFormat.parse("e4m3")
_E5M2 = FPFormat.parse("e5m2")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run here; the message says why."""


def check_backend(backend: str) -> str:
    """The canonical backend name (aliases resolved), or a ValueError naming the choices."""
    name = backend.strip().lower() if isinstance(backend, str) else backend
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid: expected one of {BACKENDS} (aliases: {ALIASES})")
    return name


# ------------------------------------------------------------------ capability checks
@functools.lru_cache(maxsize=None)
def emulated_available() -> Capability:
    return True, "pure PyTorch fake quantization runs on every device"


def compiled_available() -> Capability:
    """The torch.compile'd quantizer of ``fastquant.py`` (CPU tensors; cached there, and
    turned off there when a compile fails, so this is not cached again here)."""
    from .. import fastquant

    return fastquant.compiled_available()


def triton_available() -> Capability:
    """The fused Triton kernels of ``lightning_fpq.kernels`` (cached there)."""
    from ..kernels import capability

    return capability.triton_available()


@functools.lru_cache(maxsize=None)
def torchao_available() -> Capability:
    """Whether torchao's float8 training path can be imported (``(ok, reason)``, cached)."""
    try:
        from torchao.float8.config import Float8LinearConfig  # noqa: F401
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args  # noqa: F401
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig  # noqa: F401
    except Exception as err:  # ImportError, or a torchao that moved these names
        return False, f"torchao float8 training is not importable: {type(err).__name__}: {err}"
    import torchao

    return True, f"torchao {torchao.__version__} float8 training"


@functools.lru_cache(maxsize=None)
def fp8_gemm_available(device_type: str, index: Optional[int] = None) -> Capability:
    """Real FP8 GEMMs (``torch._scaled_mm``): CUDA with compute capability 8.9 or newer."""
    if device_type != "cuda":
        return False, f"no FP8 GEMM on device type {device_type!r} (torchao would emulate it in fp32)"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        return False, f"compute capability {major}.{minor} < 8.9 has no FP8 tensor cores"
    return True, f"compute capability {major}.{minor} has FP8 GEMMs"


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> Capability:
    """Transformer Engine (``pip install lightning-fpq[te]``, NVIDIA GPUs only), imported lazily."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return False, "transformer_engine is not installed (pip install 'lightning-fpq[te]'; it needs an NVIDIA GPU and CUDA toolkit)"
    if not torch.cuda.is_available():
        return False, "Transformer Engine runs on NVIDIA GPUs only: CUDA is not available"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a broken install: say what broke
        return False, f"transformer_engine.pytorch does not import: {type(err).__name__}: {err}"
    import transformer_engine

    return True, f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}"


def machine_available(backend: str) -> Capability:
    """Whether ``backend`` can run on some device of this machine (checked at construction)."""
    backend = check_backend(backend)
    if backend == "auto":
        return True, "auto always has the emulated backend to fall back on"
    return {
        "emulated": emulated_available,
        "compiled": compiled_available,
        "triton": triton_available,
        "torchao_float8": torchao_available,
        "transformer_engine": transformer_engine_available,
    }[backend]()


def available(backend: str, device_type: str) -> Capability:
    """Whether ``backend`` runs tensors of ``device_type`` here (``(ok, reason)``)."""
    backend = check_backend(backend)
    ok, reason = machine_available(backend)
    if not ok or backend in ("auto", "emulated", "torchao_float8"):
        return ok, reason  # torchao runs anywhere: real FP8 GEMMs on SM89+, its emulation elsewhere
    if backend == "compiled" and device_type != "cpu":
        return False, f"the compiled quantizer runs on CPU tensors only, not {device_type!r}"
    if backend == "transformer_engine":
        if device_type != "cuda":
            return False, f"Transformer Engine runs on CUDA tensors only, not {device_type!r}"
        fp8_ok, fp8_reason = fp8_gemm_available("cuda")
        if not fp8_ok:
            return False, f"Transformer Engine's FP8 recipes need FP8 GEMMs: {fp8_reason}"
        from .transformer_engine import te_settings_problem

        problem = te_settings_problem()
        if problem is not None:
            return False, problem
    if backend == "triton":
        from ..kernels import capability

        device = capability.kernel_device()  # cuda, or cpu under the interpreter
        if device is None or device.type != device_type:
            where = "no device" if device is None else f"{device.type!r} tensors"
            return False, f"the Triton kernels run on {where} here, not {device_type!r} ({reason})"
    return ok, reason


def require(backend: str, device_type: Optional[str] = None) -> None:
    """Raise :class:`BackendUnavailableError` when a forced ``backend`` cannot run here."""
    ok, reason = machine_available(backend) if device_type is None else available(backend, device_type)
    if not ok:
        where = "on this machine" if device_type is None else f"on device type {device_type!r}"
        raise BackendUnavailableError(f"backend={backend!r} cannot run {where}: {reason}")


# ---------------------------------------------------------------- what each backend computes
def torchao_dtype(fmt: FPFormat) -> Optional[torch.dtype]:
    if fmt == _E4M3:
        return torch.float8_e4m3fn
    if fmt == _E5M2:
        return torch.float8_e5m2
    return None


@functools.lru_cache(maxsize=256)
def torchao_supports(spec: LayerSpec) -> Capability:
    """Whether torchao's float8 linear computes exactly this layer spec (``(ok, reason)``)."""
    if spec.dge or spec.occ:
        return False, "torchao float8 has no DGE/OCC"
    for i, op in enumerate(spec.operands):
        if op is None:
            return False, f"P{i + 1} is not quantized: torchao quantizes both operands of every GEMM"
        if torchao_dtype(op.fmt) is None:
            return False, f"P{i + 1} format {op.fmt.name} is not e4m3 or e5m2"
        if op.block_size not in ("tensor", "channel"):
            return False, f"P{i + 1} block size {op.block_size!r}: torchao scales tensorwise or rowwise only"
        if op.scale_format != "fp32":
            return False, f"P{i + 1} {op.scale_format} scales: torchao float8 uses fp32 scales"
        if op.rounding != "nearest":
            return False, f"P{i + 1} rounding {op.rounding!r}: torchao rounds to nearest"
    p1, p2, p3, p4, p5, p6 = spec.operands
    for a, b, what in ((p1, p6, "X (P1, P6)"), (p2, p4, "W (P2, P4)"), (p3, p5, "dY (P3, P5)")):
        if a != b:
            return False, f"{what} differ ({a.short_str()} vs {b.short_str()}): torchao casts a tensor alike for both GEMMs"
    return True, "expressible as a torchao Float8LinearConfig"


def _fp4_pair(a: Optional[OperandSpec], b: Optional[OperandSpec]) -> bool:
    """Whether a GEMM with operand specs ``a`` and ``b`` can run on the packed FP4 kernel:
    both E2M1, one block length (a power of two from 16, "channel" or "tensor"). Scale
    formats and rounding may differ: the kernel reads each operand's own scales."""
    if a is None or b is None or a.fmt != _E2M1 or b.fmt != _E2M1 or a.block_size != b.block_size:
        return False
    block = a.block_size
    return block in ("channel", "tensor") or (isinstance(block, int) and block >= 16 and block & (block - 1) == 0)


@functools.lru_cache(maxsize=256)
def fp4_gemms(spec: LayerSpec) -> tuple[bool, bool, bool]:
    """Which of (forward, dgrad, wgrad) the ``triton`` backend runs on the packed FP4 GEMM."""
    p1, p2, p3, p4, p5, p6 = spec.operands
    return _fp4_pair(p1, p2), _fp4_pair(p3, p4), _fp4_pair(p5, p6)


def supports(backend: str, spec: LayerSpec) -> Capability:
    """Whether ``backend`` computes ``spec`` exactly (the quantized operands of the reference)."""
    backend = check_backend(backend)
    if backend == "torchao_float8":
        return torchao_supports(spec)
    if backend == "transformer_engine":
        from .transformer_engine import te_supports

        return te_supports(spec)
    if backend == "triton":
        gemms = fp4_gemms(spec)
        if any(gemms):
            names = [n for n, on in zip(("forward", "dgrad", "wgrad"), gemms) if on]
            return True, f"fused quantizer; packed FP4 GEMM for {'/'.join(names)}"
        return True, "fused quantizer; GEMMs in the compute dtype"
    if backend == "compiled":
        return True, "torch.compile'd quantizer (bit-identical to the reference); GEMMs in the compute dtype"
    return True, "reference quantizer; GEMMs in the compute dtype"


def _why_auto(backend: str, device: torch.device) -> Capability:
    """Whether ``auto`` should pick ``backend`` on ``device`` at all (speed, not exactness)."""
    if backend == "torchao_float8":
        # torchao only where it brings real FP8 GEMMs (checked first: no torchao import on CPU)
        return fp8_gemm_available(device.type, device.index if device.type == "cuda" else None)
    if backend == "triton":
        from ..kernels import capability

        if capability.interpreting():
            return False, "Triton runs in its interpreter here (tests only, far slower than emulation)"
    return True, ""


def choose(requested: str, spec: LayerSpec, device: torch.device) -> tuple[str, str]:
    """The backend that runs ``spec`` on ``device`` and why: ``(backend, reason)``.

    A forced backend that cannot run on ``device`` raises :class:`BackendUnavailableError`.
    """
    requested = check_backend(requested)
    if requested != "auto":
        require(requested, device.type)
        ok, reason = supports(requested, spec)
        if ok:
            return requested, f"requested: {reason}"
        fallback, why = _auto(spec, device, exclude=requested)
        return fallback, f"{requested} cannot compute this spec exactly ({reason}); {fallback} runs it: {why}"
    return _auto(spec, device)


def _auto(spec: LayerSpec, device: torch.device, exclude: str = "") -> tuple[str, str]:
    for backend in AUTO_ORDER.get(device.type, ("emulated",)):
        if backend == exclude:
            continue
        ok, reason = _why_auto(backend, device)  # first: it needs no import (torchao's prints on CPU)
        if ok:
            ok, reason = available(backend, device.type)
        if ok:
            ok, reason = supports(backend, spec)
        if ok:
            return backend, reason
    return "emulated", "no faster backend runs this spec exactly here"


def describe_backends(device: Optional[torch.device] = None) -> str:
    """One line per backend: available or not, and why (the table the README shows)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        ("emulated", emulated_available()),
        ("compiled", available("compiled", device.type)),
        ("triton", available("triton", device.type)),
        ("torchao_float8", torchao_available()),
        ("FP8 GEMM on " + device.type, fp8_gemm_available(device.type)),
        ("transformer_engine", available("transformer_engine", device.type)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {'yes' if ok else 'no '}  {reason}" for name, (ok, reason) in rows)
