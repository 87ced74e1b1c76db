"""Floating-point formats ExMy: one frozen object, every property derived from the bits.

A format has 1 sign bit, ``ebits`` exponent bits and ``mbits`` mantissa bits
(arXiv 2501.02423 writes ExMy). Bias, range and grid are computed from the bits and the
special-value mode; nothing is written out per format, so any eXmY works the same way.

Special-value modes (what the top exponent code means):

- ``"finite"``: ordinary numbers, no inf and no NaN (OCP FP4 E2M1, FP6, the paper's ExMy).
- ``"fn"``: no inf; only the all-ones mantissa at the top exponent is NaN (OCP FP8 E4M3FN).
- ``"ieee"``: the top exponent is reserved for inf/NaN (E5M2, FP16, BF16, FP32).

E0My formats have no exponent: a sign-magnitude integer grid ``0, 1, ..., 2**M - 1``
(we set ``bias = 1 - M`` so that the subnormal formula ``m/2**M * 2**(1 - bias)`` gives
exactly those integers, and every other formula stays uniform).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Union

import torch

SPECIAL_MODES = ("finite", "fn", "ieee")
MAX_EBITS = 8
MAX_MBITS = 23
# Enumerating a grid allocates 2**bits values; beyond 16 bits that stops being a "table".
MAX_ENUMERABLE_BITS = 17

# name -> (ebits, mbits, special). Hardware formats carry their hardware's special-value mode.
_NAMED: dict[str, tuple[int, int, str]] = {
    "fp4": (2, 1, "finite"),
    "e2m1": (2, 1, "finite"),
    "e2m3": (2, 3, "finite"),
    "e3m2": (3, 2, "finite"),
    "fp6": (3, 2, "finite"),  # the optimal 6-bit layout (docs/science.md section 4)
    "fp8": (4, 3, "fn"),
    "e4m3": (4, 3, "fn"),  # OCP E4M3FN, max 448
    "e5m2": (5, 2, "ieee"),
    "e3m4": (3, 4, "ieee"),  # as ml_dtypes.float8_e3m4
    "bf16": (8, 7, "ieee"),
    "e8m7": (8, 7, "ieee"),
    "fp16": (5, 10, "ieee"),
    "e5m10": (5, 10, "ieee"),
    "fp32": (8, 23, "ieee"),
    "e8m23": (8, 23, "ieee"),
}
_CANONICAL_NAMES = {
    (2, 1, "finite"): "e2m1",
    (2, 3, "finite"): "e2m3",
    (3, 2, "finite"): "e3m2",
    (4, 3, "fn"): "e4m3",
    (5, 2, "ieee"): "e5m2",
    (3, 4, "ieee"): "e3m4",
    (8, 7, "ieee"): "bf16",
    (5, 10, "ieee"): "fp16",
    (8, 23, "ieee"): "fp32",
}
_EXMY = re.compile(r"^e(\d+)m(\d+)$")
ACCEPTED_FORMS = (
    f"an FPFormat, 'eXmY' with X in 0..{MAX_EBITS} and Y in 0..{MAX_MBITS} (e.g. 'e3m2'), "
    f"optionally ':finite', ':fn' or ':ieee' (e.g. 'e4m3:ieee'), or one of {sorted(_NAMED)}"
)


@dataclass(frozen=True)
class FPFormat:
    """A sign + ``ebits`` exponent + ``mbits`` mantissa floating-point format.

    >>> FPFormat.parse("e4m3").max
    448.0
    >>> FPFormat(ebits=4, mbits=3, special="finite").max
    480.0
    """

    ebits: int
    mbits: int
    special: str = "finite"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for attr, hi in (("ebits", MAX_EBITS), ("mbits", MAX_MBITS)):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
                raise ValueError(f"FPFormat {attr}={value!r} is out of range: expected an int in 0..{hi}")
        if self.special not in SPECIAL_MODES:
            raise ValueError(f"FPFormat special={self.special!r} is not one of {SPECIAL_MODES}")
        if self.ebits == 0 and self.special != "finite":
            raise ValueError(
                f"an E0M{self.mbits} format has no exponent to reserve: special must be 'finite', got {self.special!r}"
            )
        if self.mbits == 0 and (self.ebits == 0 or (self.ebits == 1 and self.special != "finite")):
            raise ValueError(
                f"E{self.ebits}M0 with special={self.special!r} has no finite non-zero value; "
                "use at least one mantissa bit, or E1M0 with special='finite'"
            )
        if not self.name:
            # A name that parses back to this very format: canonical, else eXmY[:mode].
            default = _CANONICAL_NAMES.get((self.ebits, self.mbits, self.special))
            if default is None:
                default = f"e{self.ebits}m{self.mbits}"
                if _NAMED.get(default, (0, 0, "finite"))[2] != self.special:
                    default += f":{self.special}"
            object.__setattr__(self, "name", default)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, spec: Union[str, FPFormat]) -> FPFormat:
        """Accept an ``FPFormat`` or a case-insensitive name: 'e2m1', 'fp8', 'e4m3:ieee', ..."""
        if isinstance(spec, FPFormat):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"format {spec!r} is not a format: expected {ACCEPTED_FORMS}")
        text = spec.strip().lower()
        base, _, mode = text.partition(":")
        if mode and mode not in SPECIAL_MODES:
            raise ValueError(
                f"format {spec!r}: special-value mode {mode!r} is not one of {SPECIAL_MODES}; expected {ACCEPTED_FORMS}"
            )
        if base in _NAMED:
            ebits, mbits, special = _NAMED[base]
        else:
            match = _EXMY.match(base)
            if match is None:
                raise ValueError(f"unknown format {spec!r}: expected {ACCEPTED_FORMS}")
            ebits, mbits = int(match.group(1)), int(match.group(2))
            if not (0 <= ebits <= MAX_EBITS and 0 <= mbits <= MAX_MBITS):
                raise ValueError(f"format {spec!r} is out of range: expected {ACCEPTED_FORMS}")
            special = "finite"
        return cls(ebits=ebits, mbits=mbits, special=mode or special)

    # ------------------------------------------------------------ derived numbers
    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        if self.ebits == 0:
            return 1 - self.mbits  # integer grid, see the module docstring
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (also the subnormals' fixed exponent)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        top = 2**self.ebits - 1  # the top stored exponent code
        if self.ebits == 0:
            return self.mbits - 1  # the integer grid's largest value 2**M - 1 lies in [2**(M-1), 2**M)
        if self.special == "ieee" or (self.special == "fn" and self.mbits == 0):
            top -= 1
        return top - self.bias

    @property
    def max(self) -> float:
        if self.ebits == 0:
            return float(2**self.mbits - 1)
        if self.special == "ieee" and self.ebits == 1:
            return self.min_subnormal * (2**self.mbits - 1)  # only subnormals remain
        # largest mantissa at the top usable exponent: all ones, or all ones minus one for fn
        mantissa_ones = 2**self.mbits - 1
        if self.special == "fn" and self.mbits > 0:
            mantissa_ones -= 1
        return math.ldexp(1.0 + mantissa_ones / 2**self.mbits, self.emax)

    @property
    def min_normal(self) -> float:
        if self.ebits == 0:
            return self.min_subnormal  # no normals: the grid is uniform
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.mbits)

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special != "finite"

    @property
    def num_values(self) -> int:
        """Distinct finite values, +0 and -0 counted once."""
        codes = 2 ** (self.ebits + self.mbits)  # codes per sign
        if self.special == "fn":
            codes -= 1
        elif self.special == "ieee":
            codes -= 2**self.mbits
        return 2 * codes - 1

    # ----------------------------------------------------------------- grids
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Bit patterns (sign | exponent | mantissa, low ``bits`` bits of an int tensor) -> float64.

        NaN codes decode to NaN and, for ``ieee``, infinity codes to +-inf.
        """
        codes = codes.to(torch.int64)
        mant = codes & (2**self.mbits - 1)
        exp = (codes >> self.mbits) & (2**self.ebits - 1)
        sign = (codes >> (self.ebits + self.mbits)) & 1
        frac = mant.to(torch.float64) / 2**self.mbits
        is_normal = exp > 0
        magnitude = torch.where(
            is_normal,
            torch.ldexp(1.0 + frac, (exp - self.bias).to(torch.float64)),
            torch.ldexp(frac, torch.full_like(frac, float(self.emin))),
        )
        top = exp == 2**self.ebits - 1
        if self.special == "ieee" and self.ebits > 0:
            magnitude = torch.where(top & (mant == 0), torch.full_like(magnitude, math.inf), magnitude)
            magnitude = torch.where(top & (mant != 0), torch.full_like(magnitude, math.nan), magnitude)
        elif self.special == "fn":
            magnitude = torch.where(top & (mant == 2**self.mbits - 1), torch.full_like(magnitude, math.nan), magnitude)
        return torch.where(sign.bool(), -magnitude, magnitude)

    def values(self, *, include_negative: bool = True) -> torch.Tensor:
        """Every finite representable value, sorted ascending, as float64 (exact).

        The basis of brute-force tests; only for formats of at most 17 bits.
        """
        if self.bits > MAX_ENUMERABLE_BITS:
            raise ValueError(
                f"format {self.name} has {self.bits} bits: enumerating 2**{self.bits} values is "
                f"refused; values() accepts formats of at most {MAX_ENUMERABLE_BITS} bits"
            )
        positive = self.decode(torch.arange(2 ** (self.ebits + self.mbits)))
        positive = positive[torch.isfinite(positive)]
        if include_negative:
            positive = torch.cat([-positive[1:], positive])
        return torch.sort(positive).values

    def __str__(self) -> str:
        return self.name


FormatLike = Union[str, FPFormat]


def named_formats() -> dict[str, FPFormat]:
    """The formats known by name (aliases included), for tables and help texts."""
    return {name: FPFormat.parse(name) for name in _NAMED}
