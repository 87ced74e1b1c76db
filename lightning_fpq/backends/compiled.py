"""The ``compiled`` layer backend: the ``torch.compile``'d quantizer of ``fastquant.py`` (CPU
tensors; bit-identical to the reference), then the GEMMs in the compute dtype."""

from __future__ import annotations

from typing import Optional

import torch

from ..spec import LayerSpec
from .hardware import Capability

QUANTIZER = "auto"  # quantize's "auto" runs the compiled quantizer on CPU tensors it fits
GEMM = "compute dtype"


def machine_available() -> Capability:
    """Cached in fastquant (and turned off there when a compile fails), so not cached again here."""
    from .. import fastquant

    return fastquant.compiled_available()


def device_available(device_type: str) -> Capability:
    ok, reason = machine_available()
    if ok and device_type != "cpu":
        return False, f"the compiled quantizer runs on CPU tensors only, not {device_type!r}"
    return ok, reason


def supports(spec: LayerSpec, shape: Optional[tuple[int, int, int]] = None) -> Capability:
    return True, "torch.compile'd quantizer (bit-identical to the reference); GEMMs in the compute dtype"


def worth_auto(device: torch.device) -> Capability:
    return True, ""
