"""Fast paths for ``quantize``: bit-identical to ``quantize_reference`` or not used at all.

``quantize_fast`` returns None when no fast path covers the request (``backend="auto"``
then falls back to the reference); a forced ``backend="compiled"`` that cannot be honoured
raises with the reason.
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import FPFormat


def quantize_fast(
    x: torch.Tensor,
    fmt: FPFormat,
    *,
    block_size,
    axis: int,
    scale_format: str,
    rounding: str,
    generator: Optional[torch.Generator],
    saturate: bool,
    backend: str,
) -> Optional[torch.Tensor]:
    if backend == "compiled":
        raise ValueError("backend='compiled' is not available yet: no compiled quantizer is built; use 'reference'")
    return None
