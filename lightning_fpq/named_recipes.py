"""The named recipes: for each, the layer spec it gives at a format and block size, and the
formats its name admits (a recipe whose name says "fp8" never holds E2M1).

Notation in the comments: ``q[fmt, B, axis]`` fake-quantizes with blocks of B along ``axis``;
``X`` is (N, in), ``W`` is (out, in), ``dY`` is (N, out); hp = the compute dtype.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

from ._config import BlockSize
from .formats import FPFormat
from .spec import FP4Options, LayerSpec, OperandSpec


class RecipeName(str, enum.Enum):
    """The named recipes (the per-GEMM maths of each is in the comment above it)."""

    # paper (arXiv 2501.02423, the setup the Capybara law was fitted on; default fmt e4m3, B=128, fp32 scales):
    #   Y  = X  @ q[fmt, B, in](W).T           P1 hp, P2 quantized
    #   dX = dY @ q[fmt, B, out](W)            P3 hp, P4 quantized
    #   dW = dY.T @ q[fmt, B, tokens](X)       P5 hp, P6 quantized
    PAPER = "paper"
    # full (every operand; forward format fmt, gradients E5M2 when fmt is an 8-bit format with
    # fewer exponent bits, like TE's HYBRID; otherwise fmt; default fmt e4m3, B=128, fp32 scales):
    #   Y  = q[fmt, B, in](X)     @ q[fmt, B, in](W).T
    #   dX = q[grad, B, out](dY)  @ q[fmt, B, out](W)
    #   dW = q[grad, B, tok](dY).T @ q[fmt, B, tok](X)
    FULL = "full"
    # fp8 (torchao / TE style; any 8-bit fmt, default e4m3; block "tensor" = tensorwise, "channel" = rowwise):
    #   tensorwise: Y = q[e4m3,T](X) @ q[e4m3,T](W).T; dX = q[e5m2,T](dY) @ q[e4m3,T](W);
    #               dW = q[e5m2,T](dY).T @ q[e4m3,T](X)      (torchao TENSORWISE)
    #   rowwise:    the same GEMMs with one fp32 scale per row of each reduction, all e4m3
    #               (torchao ROWWISE, except that its scales are rounded to powers of two)
    FP8 = "fp8"
    # fp4 (Microsoft, arXiv 2501.17116; any 4-bit fmt, default e2m1, block "channel"):
    #   Y  = q[e2m1, tokenwise](clamp(X, +-t)) @ q[e2m1, channelwise](W).T + (X - clamp(X, +-t)) @ W.T
    #        with t the 0.99 quantile of |X| (OCC)
    #   dX = dY @ W                                       (gradients in the compute dtype)
    #   dW = (dY.T @ X) * f'(W),  f'(x) = min(3, (1/k)|2x/delta - 1|^(1/k - 1)), k = 5 (DGE)
    FP4 = "fp4"
    # nvfp4 (NVIDIA, arXiv 2509.25149; e2m1, default B=16, E4M3 block scales + fp32 tensor scale):
    #   Y = q(X) @ q(W).T; dX = q_sr(dY) @ q(W); dW = q_sr(dY).T @ q(X)   (q_sr: stochastic rounding)
    #   (the random Hadamard transform on wgrad inputs is not applied; keep the last layers in
    #    higher precision with a rule)
    NVFP4 = "nvfp4"
    # mxfp4 (OCP MX; e2m1, default B=32, E8M0 power-of-two scales): all six operands
    #   Y = q(X) @ q(W).T; dX = q(dY) @ q(W); dW = q(dY).T @ q(X)
    MXFP4 = "mxfp4"
    # mxfp8 (OCP MX; e4m3 or e5m2, default e4m3, B=32, E8M0 scales): all six operands, one format for all
    #   Y = q(X) @ q(W).T; dX = q(dY) @ q(W); dW = q(dY).T @ q(X)
    MXFP8 = "mxfp8"
    # bf16: nothing quantized (the compute dtype throughout): Y = X @ W.T; dX = dY @ W; dW = dY.T @ X
    BF16 = "bf16"

    @classmethod
    def from_name(cls, name: Union[str, RecipeName]) -> RecipeName:
        if isinstance(name, RecipeName):
            return name
        valid = [m.value for m in cls]
        if not isinstance(name, str) or name.strip().lower() not in valid:
            raise ValueError(f"recipe name {name!r} is not valid: expected one of {valid}")
        return cls(name.strip().lower())


E2M1, E4M3, E5M2, BF16 = (FPFormat.parse(n) for n in ("e2m1", "e4m3", "e5m2", "bf16"))


def _any(fmt: FPFormat) -> bool:
    return True


def _bits(n: int) -> Callable[[FPFormat], bool]:
    return lambda fmt: fmt.bits == n


def _one_of(*formats: FPFormat) -> Callable[[FPFormat], bool]:
    return lambda fmt: fmt in formats


@dataclass(frozen=True)
class Scheme:
    """A named recipe's defaults and the formats its name admits (``admits_text`` says which)."""

    default_fmt: FPFormat
    default_block: BlockSize
    admits: Callable[[FPFormat], bool]
    admits_text: str


SCHEMES: dict[RecipeName, Scheme] = {
    RecipeName.PAPER: Scheme(E4M3, 128, _any, "any format"),
    RecipeName.FULL: Scheme(E4M3, 128, _any, "any format"),
    RecipeName.FP8: Scheme(E4M3, "tensor", _bits(8), "8-bit formats"),
    RecipeName.FP4: Scheme(E2M1, "channel", _bits(4), "4-bit formats"),
    RecipeName.NVFP4: Scheme(E2M1, 16, _one_of(E2M1), "e2m1"),
    RecipeName.MXFP4: Scheme(E2M1, 32, _one_of(E2M1), "e2m1"),
    RecipeName.MXFP8: Scheme(E4M3, 32, _one_of(E4M3, E5M2), "e4m3 or e5m2"),
    RecipeName.BF16: Scheme(BF16, None, _one_of(BF16), "bf16 (nothing is quantized)"),
}
#: recipes of one family at other widths: a switch of format moves to the sibling that admits it
FAMILIES: tuple[tuple[RecipeName, ...], ...] = ((RecipeName.MXFP4, RecipeName.MXFP8),)


def _gradient_format(fmt: FPFormat) -> FPFormat:
    """TE HYBRID: an 8-bit forward format gets E5M2 gradients (the wider exponent range)."""
    return E5M2 if fmt.bits == 8 and fmt.ebits < E5M2.ebits else fmt


def named_spec(name: RecipeName, fmt: FPFormat, block: BlockSize) -> LayerSpec:
    """The layer spec of the named recipe ``name`` at ``fmt`` and ``block`` (see the comments of
    :class:`RecipeName`). ``fmt`` must be one the name admits (:func:`check_admits`)."""
    S = OperandSpec
    if name is RecipeName.BF16:
        return LayerSpec()
    if name is RecipeName.PAPER:
        w = S(fmt, block)
        return LayerSpec(None, w, None, w, None, w)
    if name is RecipeName.FULL:
        f, g = S(fmt, block), S(_gradient_format(fmt), block)
        return LayerSpec(f, f, g, f, g, f)
    if name is RecipeName.FP8:
        f = S(fmt, block)
        g = S(_gradient_format(fmt), block) if block == "tensor" else f
        return LayerSpec(f, f, g, f, g, f)
    if name is RecipeName.FP4:
        f = S(fmt, block)
        return LayerSpec(f, f, fp4=FP4Options(dge=True, occ=True))
    if name is RecipeName.NVFP4:
        f, g = S(fmt, block, "e4m3"), S(fmt, block, "e4m3", "stochastic")
        return LayerSpec(f, f, g, f, g, f)
    if name in (RecipeName.MXFP4, RecipeName.MXFP8):
        f = S(fmt, block, "e8m0")
        return LayerSpec(f, f, f, f, f, f)
    raise AssertionError(f"unhandled recipe {name}")  # pragma: no cover - every member is handled


def check_admits(name: RecipeName, fmt: FPFormat) -> None:
    scheme = SCHEMES[name]
    if not scheme.admits(fmt):
        raise ValueError(
            f"recipe {name.value!r} with fmt={fmt.name!r} is a contradiction: the name admits "
            f"{scheme.admits_text} only (for another format use a recipe that admits it, e.g. "
            f"'paper' or 'full', or a custom recipe)"
        )


def sibling_for(name: RecipeName, fmt: FPFormat) -> Optional[RecipeName]:
    """``name`` when it admits ``fmt``, else the member of its family that does, else None."""
    if SCHEMES[name].admits(fmt):
        return name
    for family in FAMILIES:
        if name in family:
            return next((member for member in family if SCHEMES[member].admits(fmt)), None)
    return None
