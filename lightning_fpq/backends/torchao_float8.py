"""The ``torchao_float8`` layer backend: ``F.linear`` through torchao's float8 training.

torchao's autograd function (the one ``torchao.float8.convert_to_float8_training`` installs)
scales, casts to FP8 and multiplies with ``torch._scaled_mm``: real FP8 GEMMs on CUDA SM89+,
torchao's own fp32 emulation elsewhere. ``backends.torchao_supports`` decides which layer
specs it computes exactly; this module only runs them. torchao is imported lazily (on CPU it
prints two "Failed to load ... .so" lines).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from . import fp8_gemm_available, torchao_dtype
from ..recipe import LayerSpec, OperandSpec


@functools.lru_cache(maxsize=64)
def _torchao_configs(spec: LayerSpec, emulate: bool):
    from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    def cast(op: OperandSpec) -> CastConfig:
        granularity = ScalingGranularity.TENSORWISE if op.block_size == "tensor" else ScalingGranularity.AXISWISE
        return CastConfig(scaling_granularity=granularity, target_dtype=torchao_dtype(op.fmt))

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

    X and W reach torchao in their own dtypes, so that it scales and casts the incoming
    activation and the fp32 master weight themselves, as the reference quantizer does (a
    bf16 copy would have a different amax, hence other FP8 values); the bias is added in
    torchao's output dtype and the sum cast to the compute dtype.
    """
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    emulate = not fp8_gemm_available(x.device.type, x.device.index if x.device.type == "cuda" else None)[0]
    config, mm_config = _torchao_configs(spec, emulate)
    device_type = x.device.type
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        out = matmul_with_hp_or_float8_args.apply(x, weight.t(), mm_config, config)
        if bias is not None:  # in torchao's output dtype (x's), before the one rounding to cd
            out = out + bias.to(out.dtype)
    return out.to(compute_dtype)
