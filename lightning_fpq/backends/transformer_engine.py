"""The ``transformer_engine`` layer backend: FP8 current scaling through Transformer Engine.

lightning-fpq never replaces a Parameter, and Transformer Engine's ``te.Linear`` owns its
own. So each quantized layer gets a hidden ``te.Linear`` (built on the meta device, outside
the model: no module, buffer or state_dict entry is added) whose ``weight`` *is* the layer's
own Parameter object. TE's forward reads ``self.weight`` and passes it to its autograd
function as an input, so the gradient accumulates into our Parameter's ``.grad`` and
optimizers, DDP buckets and checkpoints see nothing new. The bias is added outside TE in the
compute dtype (TE would round an fp32 bias to bf16 on its FP8 path).

Only ``Float8CurrentScaling`` is mapped, because only it quantizes exactly as the reference
does (read in TE 2.20's sources: ``compute_scale_from_amax`` is ``S = fmax / amax`` by IEEE
division with epsilon 0 and no power-of-two rounding, ``S = 1`` for a zero amax, the cast is
``RNE(x * S)`` saturated, and the fp32 master weight is quantized as is):

- ``fp8`` recipe with ``block_size="tensor"`` (E4M3 X and W, E5M2 dY) = ``Format.HYBRID``;
- all six operands E4M3, tensorwise = ``Format.E4M3``.

The FP8 bytes and scales are then the reference's; the GEMMs are cuBLAS FP8 GEMMs, which
multiply by ``1/S`` rounded (TE's ``scale_inv``) in the epilogue and accumulate in fp32 (split
accumulation is asked for in all three GEMMs), so outputs differ from the emulated path only
by GEMM rounding. Not mapped (see ``TE_RECIPE_MAPPING``): MXFP8 (TE rounds the E8M0 exponent
up, ``ceil(log2(amax / 448))``, where the OCP rule the reference follows floors it and
saturates), NVFP4 (2-D weight tiles, Hadamard transforms), delayed and 128x128-block scaling.

Shapes TE's FP8 GEMMs cannot take (tokens % 8, in_features % 16, out_features % 8) and
non-Parameter weights (tensor-parallel DTensors) return ``None``: the caller runs that call on
the fused-quantizer path, with the same quantized operands.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import torch.nn as nn

from ..formats import FPFormat
from ..spec import LayerSpec
from .hardware import Capability, fp8_gemm_available

_E4M3 = FPFormat.parse("e4m3")
_E5M2 = FPFormat.parse("e5m2")
TE_DEVICE_TYPES = ("cuda",)

# Transformer Engine recipes and the lightning-fpq recipe each one computes, where the two
# match in formats, scaling, scale rounding and rounding (docs/backends.md).
TE_RECIPE_MAPPING: dict[str, tuple[Optional[str], str]] = {
    "Float8CurrentScaling(HYBRID)": (
        "fp8 (block_size='tensor')",
        "E4M3 X/W, E5M2 dY, one fp32 scale per tensor from the current amax; runs on backend='transformer_engine'",
    ),
    "Float8CurrentScaling(E4M3)": (
        "custom: QuantRecipe(p1..p6=OperandSpec('e4m3', block_size='tensor'))",
        "E4M3 for gradients too; runs on backend='transformer_engine'",
    ),
    "MXFP8BlockScaling": (
        None,
        "E4M3, 1x32 blocks, E8M0 scales like 'mxfp8', but TE rounds the scale exponent up (ceil(log2(amax/448))) where 'mxfp8' follows the OCP rule floor(log2 amax) - 8 and saturates: about a quarter of blocks differ; and it needs sm_100+",
    ),
    "DelayedScaling": (
        None,
        "scales from an amax history of earlier steps: lightning-fpq scales from the current tensor",
    ),
    "Float8BlockScaling": (
        None,
        "128x128 weight tiles (2-D): lightning-fpq blocks are 1-D; 'paper'/'full' with B=128 are the nearest",
    ),
    "NVFP4BlockScaling": (
        None,
        "16x16 weight tiles, random Hadamard transforms and stochastic rounding by default; 'nvfp4' has 1x16 blocks and no RHT",
    ),
}


@functools.lru_cache(maxsize=256)
def te_format(spec: LayerSpec) -> tuple[Optional[str], str]:
    """TE's ``Format`` name ("HYBRID" or "E4M3") that computes ``spec`` exactly, or ``(None, why not)``."""
    if spec.fp4.active:
        return None, "Transformer Engine has no DGE/OCC"
    for i, op in enumerate(spec.operands):
        if op is None:
            return None, f"P{i + 1} is not quantized: TE's FP8 GEMMs quantize both operands"
        if op.block_size != "tensor" or op.scale_format != "fp32" or op.rounding != "nearest":
            return None, (
                f"P{i + 1} is {op.short_str()}: only one fp32 scale per tensor with nearest rounding "
                "(Float8CurrentScaling) matches TE exactly"
            )
    p1, p2, p3, p4, p5, p6 = (op.fmt for op in spec.operands if op is not None)  # all six, checked above
    if not (p1 == p2 == p4 == p6 == _E4M3):
        return None, "X and W must be e4m3 in both their GEMMs (TE's forward format)"
    if p3 != p5 or p3 not in (_E4M3, _E5M2):
        return None, "dY must be e4m3 or e5m2 in both backward GEMMs"
    return ("E4M3" if p3 == _E4M3 else "HYBRID"), "Float8CurrentScaling"


QUANTIZER = "Transformer Engine's FP8 current-scaling casts"
GEMM = "cuBLAS FP8 GEMMs through a hidden te.Linear"


@functools.cache
def machine_available() -> Capability:
    """Transformer Engine (``pip install lightning-fpq[te]``, NVIDIA GPUs only), imported lazily."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return (
            False,
            "transformer_engine is not installed (pip install 'lightning-fpq[te]'; it needs an NVIDIA GPU and CUDA toolkit)",
        )
    if not torch.cuda.is_available():
        return False, "Transformer Engine runs on NVIDIA GPUs only: CUDA is not available"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a broken install: say what broke
        return False, f"transformer_engine.pytorch does not import: {type(err).__name__}: {err}"
    import transformer_engine

    return True, f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}"


def device_available(device_type: str) -> Capability:
    ok, reason = machine_available()
    if not ok:
        return ok, reason
    if device_type not in TE_DEVICE_TYPES:
        return False, f"Transformer Engine runs on CUDA tensors only, not {device_type!r}"
    fp8_ok, fp8_reason = fp8_gemm_available("cuda")
    if not fp8_ok:
        return False, f"Transformer Engine's FP8 recipes need FP8 GEMMs: {fp8_reason}"
    problem = te_settings_problem()
    return (False, problem) if problem is not None else (ok, reason)


def supports(spec: LayerSpec, shape: Optional[tuple[int, int, int]] = None) -> Capability:
    """Whether TE computes ``spec`` exactly (and, given ``(tokens, in, out)``, takes that shape)."""
    fmt, reason = te_format(spec)
    if fmt is None:
        return False, reason
    if shape is not None and not te_shapes_fit(*shape):
        return False, f"shape (tokens, in, out) = {shape}: TE's FP8 GEMMs need tokens % 8, in % 16, out % 8 == 0"
    return True, f"{reason}(fp8_format={fmt})"


def worth_auto(device: torch.device) -> Capability:
    return True, ""


_POW2_ENV = "NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES"
_BACKWARD_ENV = "NVTE_BACKWARD_OVERRIDE"  # TE's default for the recipe's backward_override


def te_settings_problem() -> Optional[str]:
    """Why TE's current scaling would not be the reference's here (``None``: it is).

    TE reads this variable when it is imported, into class-level ``QParams`` that the
    recipe's ``use_power_2_scales`` argument does not change."""
    if os.environ.get(_POW2_ENV, "0") == "1":
        return f"{_POW2_ENV}=1 rounds TE's scales down to powers of two, unlike the reference's fmax / amax"
    if os.environ.get(_BACKWARD_ENV):
        return f"{_BACKWARD_ENV}={os.environ[_BACKWARD_ENV]} makes TE's backward GEMMs unquantized, unlike the recipe"
    return None


@functools.lru_cache(maxsize=4)
def _recipe(fmt_name: str):
    from transformer_engine.common import recipe as te_recipe

    split = te_recipe.MMParams(use_split_accumulator=True)  # fp32 accumulation in every GEMM
    recipe = te_recipe.Float8CurrentScaling(
        fp8_format=getattr(te_recipe.Format, fmt_name),
        use_power_2_scales=False,
        fp8_gemm_fprop=split,
        fp8_gemm_dgrad=split,
        fp8_gemm_wgrad=split,
    )
    for role in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
        qparams = getattr(recipe, role, None)
        if qparams is not None and (qparams.power_2_scale or qparams.amax_epsilon != 0.0):
            raise RuntimeError(
                f"Transformer Engine's {role} is {qparams}: power-of-two scales or an amax epsilon "
                f"would not match the reference quantizer (is {_POW2_ENV} set?)"
            )
    if getattr(recipe, "backward_override", None) is not None:
        raise RuntimeError(
            f"Transformer Engine's backward_override is {recipe.backward_override!r}: the backward "
            f"GEMMs would not be quantized as the recipe says (is {_BACKWARD_ENV} set?)"
        )
    return recipe


def _te_autocast(recipe):
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):  # TE >= 2.9
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def _module_for(weight: nn.Parameter, slot: Optional[dict]) -> nn.Module:
    """The hidden ``te.Linear`` whose weight is ``weight``: kept in the calling layer's
    ``slot`` (a dict the layer owns, so it lives and dies with the layer), or built for this
    call alone when there is no layer (``quant_linear`` called as a function)."""
    module = slot.get("te_linear") if slot is not None else None
    if module is None or tuple(module.weight.shape) != tuple(weight.shape) or module.weight.dtype != weight.dtype:
        import transformer_engine.pytorch as te

        out_features, in_features = weight.shape
        # meta: TE allocates and initialises no weight of its own; ours is swapped in at once
        module = te.Linear(in_features, out_features, bias=False, params_dtype=weight.dtype, device="meta")
        if slot is not None:
            slot["te_linear"] = module
    if module._parameters.get("weight") is not weight:
        module._parameters["weight"] = weight
    return module


def te_shapes_fit(n_tokens: int, in_features: int, out_features: int) -> bool:
    """TE's FP8 GEMM shape rule (``assert_dim_for_fp8_exec``)."""
    return n_tokens > 0 and n_tokens % 8 == 0 and in_features % 16 == 0 and out_features % 8 == 0


@torch.compiler.disable  # te.Linear.forward is no_torch_dynamo anyway: one clean graph break
def te_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    spec: LayerSpec,
    compute_dtype: torch.dtype,
    autocast_on: bool,
    slot: Optional[dict] = None,
) -> Optional[torch.Tensor]:
    """``F.linear`` with FP8 current scaling in Transformer Engine, or ``None`` where TE cannot
    take this call exactly (the caller then runs the same quantized operands another way).

    ``slot``: the calling layer's dict for its hidden ``te.Linear``."""
    fmt, _ = te_format(spec)
    n_tokens = x.numel() // max(x.shape[-1], 1)
    if (
        fmt is None
        or not isinstance(weight, nn.Parameter)
        or x.device.type not in TE_DEVICE_TYPES
        or not te_shapes_fit(n_tokens, weight.shape[1], weight.shape[0])
    ):
        return None
    if not autocast_on and x.dtype != weight.dtype:
        # outside torch.autocast TE wants the input in the weight's dtype: casting x first
        # would quantize a rounded copy of it, which the reference does not
        return None
    module = _module_for(weight, slot)
    with _te_autocast(_recipe(fmt)):
        y = module(x)
    y = y.to(compute_dtype)
    if bias is not None:
        # added to TE's output in the compute dtype (one rounding more than F.linear's
        # epilogue): TE's own FP8 path would round an fp32 bias to bf16 first
        with torch.autocast(x.device.type, enabled=False) if autocast_on else contextlib.nullcontext():
            y = y + bias.to(compute_dtype)
    return y
