"""Triton kernels, installed as ``lightning_fpq.kernels``.

One op a file: the ``@triton.jit`` kernel and its host wrapper. Nothing here imports
Lightning; modules outside import only the wrappers and the capability checks below.

- ``quantize_triton`` / ``pack_triton`` (``kernels/quantize.py``): fused block-scaled
  quantization to any ExMy, bit-identical to ``lightning_fpq.quantize.quantize`` / ``pack``.
- ``gemm_fp4`` (``kernels/gemm_fp4.py``): ``unpack(a) @ unpack(b).T`` from packed E2M1
  operands and their block scales, fp32 accumulation.
- ``triton_available``, ``fp8_tensor_cores_available``, ``dot_scaled_available``,
  ``native_fp4_available``: cached ``(ok, reason)`` checks (``kernels/capability.py``).

Importing this package never fails for want of triton or a GPU: the wrappers raise a
RuntimeError carrying the capability's reason instead.
"""

from .capability import (
    device_capability,
    dot_scaled_available,
    fp8_tensor_cores_available,
    interpreting,
    kernel_device,
    native_fp4_available,
    triton_available,
)
from .gemm_fp4 import gemm_fp4
from .quantize import pack_triton, quantize_triton

__all__ = [
    "device_capability",
    "dot_scaled_available",
    "fp8_tensor_cores_available",
    "gemm_fp4",
    "interpreting",
    "kernel_device",
    "native_fp4_available",
    "pack_triton",
    "quantize_triton",
    "triton_available",
]
