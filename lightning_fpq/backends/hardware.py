"""Hardware capabilities the backends share: real FP8 GEMMs (``torch._scaled_mm``)."""

from __future__ import annotations

import functools
from typing import Optional

import torch

Capability = tuple[bool, str]
"""``(ok, reason)``: every capability check returns one, and the reason is shown to users."""


@functools.cache
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


def device_index(device: torch.device) -> Optional[int]:
    return device.index if device.type == "cuda" else None
