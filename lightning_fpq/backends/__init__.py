"""Which implementation runs a quantized linear layer, whether it can, and why.

A layer backend (``FPQuantPrecision(backend=...)``) is two choices: the *quantizer* that makes
the recipe's six quantized operands (always exactly the pure-torch reference's values) and the
*GEMM* that multiplies them. The five user-facing names resolve to:

=======================  ===================================  =======================================
 backend                 quantizer                            GEMM
=======================  ===================================  =======================================
 ``emulated``            reference (pure torch)               compute dtype
 ``compiled``            ``torch.compile``'d (CPU)            compute dtype
 ``triton``              fused Triton kernel                  packed FP4 for E2M1 pairs, else compute dtype
 ``torchao_float8``      torchao's float8 casts               ``torch._scaled_mm`` (emulated off SM89+)
 ``transformer_engine``  TE's FP8 current-scaling casts       cuBLAS FP8 through a hidden ``te.Linear``
=======================  ===================================  =======================================

Each backend is one module of this package holding its runner and, beside it, its checks:
``machine_available()``, ``device_available(device_type)``, ``supports(spec, shape=None)``
(computes this spec exactly; for one ``(tokens, in, out)`` call shape when given) and
``worth_auto(device)`` (whether ``auto`` should prefer it there, a matter of speed). Every check
returns ``(ok, reason)``; the reason is what users see.

``"auto"`` picks, per layer and recipe stage, the first backend in :data:`AUTO_ORDER` for the
device that is available and computes the spec exactly. A forced backend that cannot run on
this machine raises :class:`BackendUnavailableError` carrying the reason; one that runs but
cannot compute a stage's spec exactly (``torchao_float8`` in an FP4 stage) leaves that stage to
what ``auto`` picks, never to a different recipe.

This package knows formats and specs, nothing of Lightning; torchao, triton and Transformer
Engine are imported lazily.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from ..spec import LayerSpec
from . import compiled, emulated, torchao_float8, transformer_engine, triton
from .hardware import Capability, fp8_gemm_available

REGISTRY: dict[str, ModuleType] = {
    "emulated": emulated,
    "compiled": compiled,
    "triton": triton,
    "torchao_float8": torchao_float8,
    "transformer_engine": transformer_engine,
}
LAYER_BACKENDS = tuple(REGISTRY)
ALIASES = {"torchao": "torchao_float8", "te": "transformer_engine"}
BACKENDS = ("auto",) + LAYER_BACKENDS
#: ``auto``'s preference per device type: the fastest first (real FP8 GEMMs, then the packed
#: FP4 GEMM and fused quantizer, then the compiled quantizer), the reference last.
AUTO_ORDER = {
    "cuda": ("torchao_float8", "transformer_engine", "triton", "emulated"),
    "cpu": ("compiled", "emulated"),
}
UNQUANTIZED = "unquantized"  # what runs a layer the active recipe leaves in the compute dtype

__all__ = [
    "AUTO_ORDER",
    "ALIASES",
    "BACKENDS",
    "LAYER_BACKENDS",
    "REGISTRY",
    "BackendUnavailableError",
    "Capability",
    "available",
    "check_backend",
    "choose",
    "describe_backends",
    "describe_composition",
    "fp8_gemm_available",
    "machine_available",
    "require",
    "supports",
]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run here; the message says why."""


def check_backend(backend: str) -> str:
    """The canonical backend name (aliases resolved), or a ValueError naming the choices."""
    name = backend.strip().lower() if isinstance(backend, str) else backend
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid: expected one of {BACKENDS} (aliases: {ALIASES})")
    return name


def machine_available(backend: str) -> Capability:
    """Whether ``backend`` can run on some device of this machine (checked at construction)."""
    backend = check_backend(backend)
    if backend == "auto":
        return True, "auto always has the emulated backend to fall back on"
    return REGISTRY[backend].machine_available()


def available(backend: str, device_type: str) -> Capability:
    """Whether ``backend`` runs tensors of ``device_type`` here."""
    backend = check_backend(backend)
    if backend == "auto":
        return machine_available(backend)
    return REGISTRY[backend].device_available(device_type)


def require(backend: str, device_type: Optional[str] = None) -> None:
    """Raise :class:`BackendUnavailableError` when a forced ``backend`` cannot run here."""
    ok, reason = machine_available(backend) if device_type is None else available(backend, device_type)
    if not ok:
        where = "on this machine" if device_type is None else f"on device type {device_type!r}"
        raise BackendUnavailableError(f"backend={backend!r} cannot run {where}: {reason}")


def supports(backend: str, spec: LayerSpec, shape: Optional[tuple[int, int, int]] = None) -> Capability:
    """Whether ``backend`` computes ``spec`` exactly (the quantized operands of the reference)."""
    return REGISTRY[check_backend(backend)].supports(spec, shape)


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
    for name in AUTO_ORDER.get(device.type, ("emulated",)):
        if name == exclude:
            continue
        backend = REGISTRY[name]
        ok, reason = backend.worth_auto(device)  # first: it needs no import (torchao's prints on CPU)
        if ok:
            ok, reason = backend.device_available(device.type)
        if ok:
            ok, reason = backend.supports(spec)
        if ok:
            return name, reason
    return "emulated", "no faster backend runs this spec exactly here"


#: what a fake-quantizing backend's ``QUANTIZER`` (the ``quantize(backend=...)`` of its operands) means
_QUANTIZE_BACKENDS = {
    "reference": "the pure-torch reference",
    "auto": "the fast path that fits each call (compiled on CPU, Triton on CUDA), else the reference",
}


def describe_composition() -> str:
    """One line per layer backend: the quantizer and the GEMM it resolves to."""
    width = max(len(name) for name in REGISTRY)
    return "\n".join(
        f"{name:<{width}}  quantizer: {_QUANTIZE_BACKENDS.get(m.QUANTIZER, m.QUANTIZER)}; GEMM: {m.GEMM}"
        for name, m in REGISTRY.items()
    )


def describe_backends(device: Optional[torch.device] = None) -> str:
    """One line per backend: available or not, and why (the table the README shows)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        ("emulated", emulated.machine_available()),
        ("compiled", available("compiled", device.type)),
        ("triton", available("triton", device.type)),
        ("torchao_float8", torchao_float8.machine_available()),
        ("FP8 GEMM on " + device.type, fp8_gemm_available(device.type)),
        ("transformer_engine", available("transformer_engine", device.type)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {'yes' if ok else 'no '}  {reason}" for name, (ok, reason) in rows)
