"""The laws' arguments, each checked with one ``ValueError`` line naming it: sizes and compute
(finite numbers > 0, scalars or arrays), formats, and total bit widths."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from lightning_fpq.formats import FormatLike, FPFormat

__all__ = ["MIN_BITS", "check_bits", "format_or_none", "positive_array", "scalar_or_array"]

MIN_BITS = 2
"""Narrowest precision the planners consider: 1 sign bit + one exponent or mantissa bit."""


def positive_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a float array, every entry finite and > 0, else ValueError naming it."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}={value!r} is not a number: expected a finite number > 0 (or an array of them)"
        ) from None
    good = np.isfinite(arr) & (arr > 0)
    if not np.all(good):
        bad = arr[~good].flat[0] if arr.ndim else arr.item()
        raise ValueError(f"{name}={bad!r} is not valid: expected a finite number > 0")
    return arr


def scalar_or_array(x: np.ndarray) -> Union[float, np.ndarray]:
    """Scalars in, a Python float out; arrays in, an array out."""
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def format_or_none(fmt: Optional[FormatLike]) -> Optional[FPFormat]:
    """``None`` (unquantized) or the format ``fmt`` names."""
    return None if fmt is None else FPFormat.parse(fmt)


def check_bits(bits: Any, hi: int) -> int:
    """A total bit width in MIN_BITS..hi (1 sign bit + exponent + mantissa)."""
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= hi:
        raise ValueError(
            f"bits={bits!r} is not valid: expected an int in {MIN_BITS}..{hi} (1 sign bit + exponent + mantissa)"
        )
    return int(bits)
