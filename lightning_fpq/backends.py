"""Which implementation runs a quantized linear layer, and whether it can.

Backends (``FPQuantPrecision(backend=...)``):

- ``"emulated"``: fake quantization (``quantize``, bit-identical to the reference quantizer)
  then a GEMM in the compute dtype. It exists because it runs *every* recipe exactly, on any
  device, for any ExMy format, block size, scale format and rounding: it is the ground truth
  the fast paths are tested against, and the path a CPU or an older GPU takes.
- ``"torchao"``: torchao's float8 training autograd function (the one
  ``torchao.float8.convert_to_float8_training`` installs), with real FP8 GEMMs on CUDA SM89+
  and torchao's own emulation elsewhere. It honours only FP8 recipes that it can express
  exactly: all six operands in E4M3/E5M2, tensorwise or rowwise fp32 scales, nearest rounding,
  the same format for an operand in both GEMMs it feeds, no DGE/OCC. Anything else runs
  emulated, with a warning naming the layer and the reason (never a different recipe).
- ``"auto"``: torchao where it is available, the device has FP8 GEMMs and the layer's spec is
  expressible; emulated everywhere else.

Every check returns ``(available, reason)`` and is cached. Another engineer will add Triton and
Transformer Engine here. This module knows formats and recipes, nothing of Lightning; torchao is
imported lazily (it prints two "Failed to load ... .so" lines on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional

import torch

from .formats import FPFormat
from .recipe import LayerSpec, OperandSpec

BACKENDS = ("auto", "emulated", "torchao")
_E4M3 = FPFormat.parse("e4m3")
_E5M2 = FPFormat.parse("e5m2")


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid: expected one of {BACKENDS}")
    return backend.lower()


# ------------------------------------------------------------------ capability checks
@functools.lru_cache(maxsize=None)
def emulated_available() -> tuple[bool, str]:
    return True, "pure PyTorch fake quantization runs on every device"


@functools.lru_cache(maxsize=None)
def torchao_available() -> tuple[bool, str]:
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
def fp8_gemm_available(device_type: str, index: Optional[int] = None) -> tuple[bool, str]:
    """Real FP8 GEMMs (``torch._scaled_mm``): CUDA with compute capability 8.9 or newer."""
    if device_type != "cuda":
        return False, f"no FP8 GEMM on device type {device_type!r} (torchao would emulate it in fp32)"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        return False, f"compute capability {major}.{minor} < 8.9 has no FP8 tensor cores"
    return True, f"compute capability {major}.{minor} has FP8 GEMMs"


def _torchao_dtype(fmt: FPFormat) -> Optional[torch.dtype]:
    if fmt == _E4M3:
        return torch.float8_e4m3fn
    if fmt == _E5M2:
        return torch.float8_e5m2
    return None


@functools.lru_cache(maxsize=256)
def torchao_supports(spec: LayerSpec) -> tuple[bool, str]:
    """Whether torchao's float8 linear computes exactly this layer spec (``(ok, reason)``)."""
    if spec.dge or spec.occ:
        return False, "torchao float8 has no DGE/OCC"
    for i, op in enumerate(spec.operands):
        if op is None:
            return False, f"P{i + 1} is not quantized: torchao quantizes both operands of every GEMM"
        if _torchao_dtype(op.fmt) is None:
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


def choose(requested: str, spec: LayerSpec, device: torch.device) -> tuple[str, str]:
    """The backend that runs ``spec`` on ``device`` and why: ``(backend, reason)``."""
    requested = check_backend(requested)
    if requested == "emulated":
        return "emulated", "requested"
    if requested == "auto":
        # torchao only where it brings real FP8 GEMMs (checked first: no torchao import on CPU)
        ok, reason = fp8_gemm_available(device.type, device.index if device.type == "cuda" else None)
        if not ok:
            return "emulated", reason
    ok, reason = torchao_available()
    if ok:
        ok, reason = torchao_supports(spec)
    if ok:
        return "torchao", reason
    return "emulated", (f"torchao cannot run it: {reason}" if requested == "torchao" else reason)


_DECISIONS: dict[tuple[str, LayerSpec, str], tuple[str, str]] = {}
_WARNED: set[tuple[str, str]] = set()


def backend_for(requested: str, spec: LayerSpec, device: torch.device, *, layer: str = "", warn: bool = True) -> str:
    """``choose`` cached per (requested, spec, device type). A forced ``"torchao"`` that falls
    back warns once per layer and reason (``warn=False`` when the caller has said it already)."""
    if requested == "emulated":
        return "emulated"
    key = (requested, spec, device.type)
    hit = _DECISIONS.get(key)
    if hit is None:
        hit = _DECISIONS[key] = choose(requested, spec, device)
    backend, reason = hit
    if warn and requested == "torchao" and backend != "torchao" and (layer, reason) not in _WARNED:
        _WARNED.add((layer, reason))
        warnings.warn(f"layer {layer!r} runs emulated instead of torchao ({reason}); the recipe is unchanged", stacklevel=3)
    return backend


# ----------------------------------------------------------------------- torchao
@functools.lru_cache(maxsize=64)
def _torchao_configs(spec: LayerSpec, emulate: bool):
    from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    def cast(op: OperandSpec) -> CastConfig:
        granularity = ScalingGranularity.TENSORWISE if op.block_size == "tensor" else ScalingGranularity.AXISWISE
        return CastConfig(scaling_granularity=granularity, target_dtype=_torchao_dtype(op.fmt))

    p1, p2, p3, p4, p5, p6 = spec.operands
    config = Float8LinearConfig(
        cast_config_input=cast(p1), cast_config_input_for_grad_weight=cast(p6),
        cast_config_weight=cast(p2), cast_config_weight_for_grad_input=cast(p4),
        cast_config_grad_output=cast(p3), cast_config_grad_output_for_grad_weight=cast(p5),
        emulate=emulate, round_scales_to_power_of_2=False,  # our fp32 scales, not rounded
    )
    mm = ScaledMMConfig(emulate, False, False, False)  # no fast accumulation: fp32 accumulate
    return config, LinearMMConfig(mm, mm, mm)


def torchao_float8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    spec: LayerSpec,
    compute_dtype: torch.dtype,
    autocast_on: bool,
) -> torch.Tensor:
    """``F.linear`` through torchao's float8 autograd function (real FP8 GEMMs on SM89+).

    The operands are cast to the compute dtype first (as autocast would), then torchao scales,
    casts to FP8 and multiplies.
    """
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    emulate = not fp8_gemm_available(x.device.type, x.device.index if x.device.type == "cuda" else None)[0]
    config, mm_config = _torchao_configs(spec, emulate)
    device_type = x.device.type
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        out = matmul_with_hp_or_float8_args.apply(x.to(compute_dtype), weight.to(compute_dtype).t(), mm_config, config)
        if bias is not None:
            out = out + bias.to(out.dtype)
    return out



# ------------------------------------------------- quantizer backends and Transformer Engine
def compiled_available() -> tuple[bool, str]:
    """The torch.compile'd quantizer of ``fastquant.py`` (CPU tensors; cached there, and
    turned off there when a compile fails, so this is not cached again here)."""
    from . import fastquant

    return fastquant.compiled_available()


def triton_available() -> tuple[bool, str]:
    """The fused Triton kernels of ``lightning_fpq.kernels`` (cached there)."""
    from .kernels import capability

    return capability.triton_available()


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> tuple[bool, str]:
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


# Transformer Engine recipes and the lightning-fpq recipe each one computes, where the two
# match in formats, scaling granularity, scale format and rounding (docs/backends.md).
TE_RECIPE_MAPPING: dict[str, tuple[Optional[str], str]] = {
    "Float8CurrentScaling(HYBRID)": ("fp8 (block_size='tensor')", "E4M3 X/W, E5M2 dY, one fp32 scale per tensor from the current amax"),
    "Float8CurrentScaling(E4M3)": ("custom: QuantRecipe(p1..p6=OperandSpec('e4m3', block_size='tensor'))", "E4M3 for gradients too, tensorwise current scaling"),
    "MXFP8BlockScaling": ("mxfp8", "E4M3 elements, 1x32 blocks along each GEMM's reduction, E8M0 scales"),
    "DelayedScaling": (None, "scales from an amax history of earlier steps: lightning-fpq scales from the current tensor"),
    "Float8BlockScaling": (None, "128x128 weight tiles (2-D): lightning-fpq blocks are 1-D; 'paper'/'full' with B=128 are the nearest"),
    "NVFP4BlockScaling": (None, "16x16 weight tiles and random Hadamard transforms on wgrad inputs; 'nvfp4' has 1x16 blocks and no RHT"),
}


def describe_backends(device: Optional[torch.device] = None) -> str:
    """One line per backend: available or not, and why (the table the README shows)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        ("emulated", emulated_available()),
        ("compiled (quantizer)", compiled_available()),
        ("triton (quantizer, FP4 GEMM)", triton_available()),
        ("torchao float8", torchao_available()),
        ("FP8 GEMM on " + device.type, fp8_gemm_available(device.type)),
        ("transformer_engine", transformer_engine_available()),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {'yes' if ok else 'no '}  {reason}" for name, (ok, reason) in rows)
