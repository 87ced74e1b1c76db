"""The ``torchao_float8`` layer backend (alias ``torchao``): ``F.linear`` through torchao's
float8 training autograd function (the one ``torchao.float8.convert_to_float8_training``
installs), which scales, casts to FP8 and multiplies with ``torch._scaled_mm``: real FP8 GEMMs
on CUDA SM89+, torchao's own fp32 emulation elsewhere. Only FP8 specs it expresses exactly
(:func:`supports`). torchao is imported lazily (on CPU it prints two "Failed to load ... .so"
lines).

``torch._scaled_mm`` refuses a GEMM whose reduction length K or output width N is not a
multiple of 16. Of one call with ``(tokens, in, out)``: the forward has K = in, N = out; dgrad
K = out, N = in; wgrad K = tokens (a last partial batch), N = in. Where real FP8 GEMMs run, such
a call is padded with zeros (:func:`padding_plan`): a reduction length inside torchao after the
cast (its ``pad_inner_dim``), in/out features here before it (X's and W's columns, W's rows and
the bias), the output sliced back. Zeros change no amax, so every FP8 value and scale of the real
rows and columns is the reference's, and zero products add nothing to an fp32 sum.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..formats import FPFormat
from ..spec import ROLES, LayerSpec, OperandSpec
from .hardware import Capability, device_index, fp8_gemm_available

QUANTIZER = "torchao's float8 casts"
GEMM = "torch._scaled_mm (FP8) on SM89+, torchao's fp32 emulation elsewhere"
_DTYPES = {FPFormat.parse("e4m3"): torch.float8_e4m3fn, FPFormat.parse("e5m2"): torch.float8_e5m2}
SCALED_MM_ALIGN = 16  # torch._scaled_mm: K and N multiples of 16 (M is free)
logger = logging.getLogger(__name__)
_LOGGED: set[tuple] = set()


class Padding(NamedTuple):
    """How one call is padded for ``torch._scaled_mm`` (all zeros: an aligned call)."""

    d_in: int  # columns of zeros added to X and W (in_features)
    d_out: int  # rows of zeros added to W and the bias (out_features)
    inner: tuple[bool, bool, bool]  # torchao pads K of (forward, dgrad, wgrad) after the cast

    @property
    def needed(self) -> bool:
        return bool(self.d_in or self.d_out or any(self.inner))

    def describe(self) -> str:
        parts = []
        if self.d_in:
            parts.append(f"in_features +{self.d_in}")
        if self.d_out:
            parts.append(f"out_features +{self.d_out}")
        if self.inner[2]:
            parts.append("the tokens of the wgrad GEMM")
        return ", ".join(parts) + " padded with zeros to multiples of 16 for torch._scaled_mm"


def padding_plan(n_tokens: int, d_in: int, d_out: int) -> Padding:
    """The zero padding that makes all three GEMMs of a ``(tokens, in, out)`` call legal for
    ``torch._scaled_mm`` (K % 16 == 0 and N % 16 == 0 in forward, dgrad and wgrad)."""
    pad_in, pad_out = -d_in % SCALED_MM_ALIGN, -d_out % SCALED_MM_ALIGN
    # features are padded here, so only the token count can leave a reduction length unaligned
    return Padding(pad_in, pad_out, (False, False, n_tokens % SCALED_MM_ALIGN != 0))


@functools.cache
def machine_available() -> Capability:
    """Whether torchao's float8 training path can be imported."""
    try:
        from torchao.float8.config import Float8LinearConfig  # noqa: F401
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args  # noqa: F401
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig  # noqa: F401
    except Exception as err:  # ImportError, or a torchao that moved these names
        return False, f"torchao float8 training is not importable: {type(err).__name__}: {err}"
    import torchao

    return True, f"torchao {torchao.__version__} float8 training"


def device_available(device_type: str) -> Capability:
    return machine_available()  # real FP8 GEMMs on SM89+, its emulation elsewhere


def torchao_dtype(fmt: FPFormat) -> Optional[torch.dtype]:
    return _DTYPES.get(fmt)


@functools.lru_cache(maxsize=256)
def _supports_spec(spec: LayerSpec) -> Capability:
    if spec.fp4.active:
        return False, "torchao float8 has no DGE/OCC"
    for op, label in zip(spec.operands, ("P1", "P2", "P3", "P4", "P5", "P6")):
        if op is None:
            return False, f"{label} is not quantized: torchao quantizes both operands of every GEMM"
        if torchao_dtype(op.fmt) is None:
            return False, f"{label} format {op.fmt.name} is not e4m3 or e5m2"
        if op.block_size not in ("tensor", "channel"):
            return False, f"{label} block size {op.block_size!r}: torchao scales tensorwise or rowwise only"
        if op.scale_format != "fp32":
            return False, f"{label} {op.scale_format} scales: torchao float8 uses fp32 scales"
        if op.rounding != "nearest":
            return False, f"{label} rounding {op.rounding!r}: torchao rounds to nearest"
    for a, b, what in (
        ("input", "input_for_grad_weight", "X (P1, P6)"),
        ("weight", "weight_for_grad_input", "W (P2, P4)"),
        ("grad_output", "grad_output_for_grad_weight", "dY (P3, P5)"),
    ):
        first, second = getattr(spec, a), getattr(spec, b)
        if first != second:
            return False, (
                f"{what} differ ({first.short_str()} vs {second.short_str()}): torchao casts a tensor "
                "alike for both GEMMs"
            )
    return True, "expressible as a torchao Float8LinearConfig"


def supports(spec: LayerSpec, shape: Optional[tuple[int, int, int]] = None) -> Capability:
    """Whether torchao's float8 linear computes exactly this layer spec (and, given the call's
    ``(tokens, in, out)``, how that shape runs: padded where ``torch._scaled_mm`` would refuse it)."""
    ok, reason = _supports_spec(spec)
    if ok and shape is not None:
        padding = padding_plan(*shape)
        if padding.needed:
            return True, f"{reason}; on FP8 GEMMs {padding.describe()} (the same FP8 values)"
    return ok, reason


def worth_auto(device: torch.device) -> Capability:
    """Only where it brings real FP8 GEMMs (checked first: no torchao import on CPU)."""
    return fp8_gemm_available(device.type, device_index(device))


@functools.lru_cache(maxsize=64)
def _torchao_configs(spec: LayerSpec, emulate: bool, pad_inner: tuple[bool, bool, bool] = (False, False, False)):
    from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    def cast(op: OperandSpec) -> CastConfig:
        granularity = ScalingGranularity.TENSORWISE if op.block_size == "tensor" else ScalingGranularity.AXISWISE
        return CastConfig(scaling_granularity=granularity, target_dtype=torchao_dtype(op.fmt))

    # our operand roles are torchao's cast-config names
    config = Float8LinearConfig(
        **{f"cast_config_{role}": cast(getattr(spec, role)) for role in ROLES},
        emulate=emulate,
        round_scales_to_power_of_2=False,  # our fp32 scales, not rounded
    )
    # no fast accumulation (fp32 accumulate), no fp8 output; pad_inner_dim per GEMM where needed
    output, grad_input, grad_weight = (ScaledMMConfig(emulate, False, False, pad) for pad in pad_inner)
    return config, LinearMMConfig(output, grad_input, grad_weight)


@torch.compiler.disable  # a rare call: one graph break rather than tracing the logging
def _log_padding_once(key: tuple, message: str) -> None:
    """Log ``message`` once per process and ``key``, on rank zero only."""
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    logger.warning("lightning_fpq torchao_float8: %s", message)


def torchao_float8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    spec: LayerSpec,
    compute_dtype: torch.dtype,
    autocast_on: bool,
) -> torch.Tensor:
    """``F.linear`` through torchao's float8 autograd function (real FP8 GEMMs on SM89+).

    X and W reach torchao in their own dtypes, so that it scales and casts the incoming
    activation and the fp32 master weight themselves, as the reference quantizer does (a
    bf16 copy would have a different amax, hence other FP8 values); the bias is added in
    torchao's output dtype and the sum cast to the compute dtype.
    """
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    emulate = not fp8_gemm_available(x.device.type, device_index(x.device))[0]
    d_out, d_in = weight.shape
    # torchao's emulation takes any shape; only torch._scaled_mm needs alignment
    padding = Padding(0, 0, (False, False, False)) if emulate else padding_plan(x.numel() // max(d_in, 1), d_in, d_out)
    if padding.needed:
        features = bool(padding.d_in or padding.d_out)
        _log_padding_once(
            ("features", d_in, d_out) if features else ("tokens",),
            f"layer ({d_in} -> {d_out}), {x.numel() // max(d_in, 1)} tokens: {padding.describe()}"
            + ("" if features else " (logged once, for the first such batch)"),
        )
    config, mm_config = _torchao_configs(spec, emulate, padding.inner)
    device_type = x.device.type
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        if padding.d_in or padding.d_out:
            # zeros: no amax changes, so the real rows' and columns' FP8 values are unchanged;
            # autograd slices the padded gradients back
            x = F.pad(x, (0, padding.d_in))
            weight = F.pad(weight, (0, padding.d_in, 0, padding.d_out))
        out = matmul_with_hp_or_float8_args.apply(x, weight.t(), mm_config, config)
        if padding.d_out:
            out = out[..., :d_out]
        if bias is not None:  # in torchao's output dtype (x's), before the one rounding to cd
            out = out + bias.to(out.dtype)
    return out.to(compute_dtype)
