"""The ``emulated`` layer backend: the pure-torch reference quantizer, then the GEMMs in the
compute dtype. It runs every recipe on every device and is the ground truth of the others."""

from __future__ import annotations

from typing import Optional

import torch

from ..spec import LayerSpec
from .hardware import Capability

QUANTIZER = "reference"  # quantize(backend=...) of its operands
GEMM = "compute dtype"


def machine_available() -> Capability:
    return True, "pure PyTorch fake quantization runs on every device"


def device_available(device_type: str) -> Capability:
    return machine_available()


def supports(spec: LayerSpec, shape: Optional[tuple[int, int, int]] = None) -> Capability:
    return True, "reference quantizer; GEMMs in the compute dtype"


def worth_auto(device: torch.device) -> Capability:
    return True, ""
