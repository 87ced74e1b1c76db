"""Quantization recipes: which of a linear layer's six GEMM operands are quantized, and how.

A linear layer computes three GEMMs per training step (SCIENCE.md section 3, arXiv 2501.02423
eq. 8). Each GEMM has two inputs, and each input is quantized along *that GEMM's* reduction
dimension:

====  ==============  ====================  ==============================================
 op   tensor          GEMM                  blocked along (the reduction dimension)
====  ==============  ====================  ==============================================
 P1   X   (N, in)     Y  = X  @ W.T         in_features  (a row of X)
 P2   W   (out, in)   Y  = X  @ W.T         in_features  (a row of W)
 P3   dY  (N, out)    dX = dY @ W           out_features (a row of dY)
 P4   W   (out, in)   dX = dY @ W           out_features (a column of W)
 P5   dY  (N, out)    dW = dY.T @ X         tokens N     (a column of dY)
 P6   X   (N, in)     dW = dY.T @ X         tokens N     (a column of X)
====  ==============  ====================  ==============================================

N is the number of tokens (every leading dimension of the input flattened).

A :class:`QuantRecipe` holds one :class:`OperandSpec` (or ``None``: kept in the compute dtype)
per operand, the FP4 options (DGE, OCC; arXiv 2501.17116), and per-layer rules: which layers
are quantized (``include``/``exclude`` fnmatch patterns on fully qualified module names) and
which get a different recipe (``rules``). Named recipes come from :meth:`QuantRecipe.from_name`;
recipes round-trip through YAML (OmegaConf structured configs).

This module knows formats and nothing of Lightning or of the layers that consume it.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from .formats import FPFormat, FormatLike, as_format
from .quantize import ROUNDING_MODES, SCALE_FORMATS, BlockSize

OPERANDS = ("p1", "p2", "p3", "p4", "p5", "p6")
OPERAND_ROLES = {
    "p1": "X, forward, blocked along in_features",
    "p2": "W, forward, blocked along in_features",
    "p3": "dY, dgrad, blocked along out_features",
    "p4": "W, dgrad, blocked along out_features",
    "p5": "dY, wgrad, blocked along tokens",
    "p6": "X, wgrad, blocked along tokens",
}

#: Layers left unquantized unless a recipe says otherwise (the paper quantizes the linear layers
#: of the transformer blocks only: not the embeddings, which are not ``nn.Linear`` anyway, and not
#: the output classifier). Patterns are fnmatch'ed against the fully qualified module name as
#: ``model.named_modules()`` gives it, e.g. ``"model.lm_head"`` inside a LightningModule, so each
#: head is listed bare and under a parent. Heads are matched by their last name component only,
#: so a block's inner ``attention.output.dense`` (BERT) is *not* excluded.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head", "*.lm_head",      # GPT-style language-model heads
    "*classifier*",              # HF / torchvision classifiers
    "head", "*.head",            # timm ViT heads
    "output", "*.output",        # "output" projections used as the model's last layer
    "score", "*.score",          # HF sequence-classification heads
)
DEFAULT_INCLUDE: tuple[str, ...] = ("*",)

_BLOCK_WORDS = ("channel", "tensor")
_VALID_BLOCK = "a positive int, 'channel', 'tensor' or 'none' (no scaling)"


# --------------------------------------------------------------------------- helpers
def _check_block(value: Any, *, what: str, allow_inherit: bool) -> Union[BlockSize, str]:
    """Normalise a user block size. ``"none"`` means "no scaling" (kept as the string where a
    ``None`` would mean "inherit"/"default"; see :func:`_block_value`)."""
    if value is None:
        if allow_inherit:
            return None
        return "none"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _BLOCK_WORDS or text == "none":
            return text
        if text.isdigit() and int(text) > 0:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"{what}={value!r} is not valid: expected {_VALID_BLOCK}")


def _block_value(value: Union[BlockSize, str]) -> BlockSize:
    """The block size as ``quantize`` takes it (``"none"`` -> ``None``)."""
    return None if value == "none" else value


def _block_str(value: BlockSize) -> str:
    return "none" if value is None else str(value)


def _block_yaml(value: Union[BlockSize, str]) -> Union[int, str, None]:
    """Block size as written to YAML: ints stay ints, no scaling is "none"."""
    return "none" if value is None else value


def _check_choice(what: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{what}={value!r} is not valid: expected one of {choices}")
    return value.lower()


def _check_fraction(what: str, value: Any, *, low: float, high: float, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}={value!r} is not valid: expected a number in {'(' if open_low else '['}{low}, {high}]")
    value = float(value)
    if not ((low < value) if open_low else (low <= value)) or not value <= high:
        raise ValueError(f"{what}={value!r} is out of range: expected a number in {'(' if open_low else '['}{low}, {high}]")
    return value


def _check_patterns(what: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ValueError(f"{what}={value!r} is not valid: expected a list of fnmatch patterns") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{what} holds {p!r}: expected non-empty fnmatch pattern strings")
    return patterns


def _fmt_or_none(what: str, value: Any) -> Optional[FPFormat]:
    if value is None:
        return None
    try:
        return as_format(value)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


# ---------------------------------------------------------------------- operand spec
@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized.

    Args:
        fmt: the element format (an ``FPFormat`` or a name: "e2m1", "e4m3", any "eXmY").
        block_size: B consecutive elements along the operand's reduction dimension share a
            scale; ``"channel"``: one scale per row of the reduction (token-wise for X and dY,
            channel-wise for W); ``"tensor"``: one scale; ``"none"``/``None``: no scaling.
        scale_format: "fp32" (the paper), "e8m0" (OCP MX) or "e4m3" (NVFP4, two-level).
        rounding: "nearest" (ties to even) or "stochastic" (reproducible from the layer's seed).
    """

    fmt: FPFormat
    block_size: BlockSize = 128
    scale_format: str = "fp32"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        fmt = _fmt_or_none("OperandSpec fmt", self.fmt)
        if fmt is None:
            raise ValueError("OperandSpec fmt=None is not valid: leave the operand out (None) to keep it unquantized")
        object.__setattr__(self, "fmt", fmt)
        block = _check_block(self.block_size, what="OperandSpec block_size", allow_inherit=False)
        object.__setattr__(self, "block_size", _block_value(block))
        object.__setattr__(self, "scale_format", _check_choice("OperandSpec scale_format", self.scale_format, SCALE_FORMATS))
        object.__setattr__(self, "rounding", _check_choice("OperandSpec rounding", self.rounding, ROUNDING_MODES))

    def short_str(self) -> str:
        """``e2m1/16/e4m3/sr``: format / block / scale format (if not fp32) / ``sr`` if stochastic."""
        parts = [self.fmt.name, _block_str(self.block_size)]
        if self.scale_format != "fp32":
            parts.append(self.scale_format)
        if self.rounding == "stochastic":
            parts.append("sr")
        return "/".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"fmt": self.fmt.name, "block_size": _block_yaml(self.block_size),
                "scale_format": self.scale_format, "rounding": self.rounding}

    @classmethod
    def coerce(cls, value: Any, *, what: str = "operand") -> Optional["OperandSpec"]:
        """``None`` (not quantized), an ``OperandSpec``, a format name, or a dict of its fields."""
        if value is None or isinstance(value, OperandSpec):
            return value
        if isinstance(value, (str, FPFormat)):
            return cls(fmt=value)
        if isinstance(value, dict):
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = set(value) - set(valid)
            if unknown:
                raise ValueError(f"{what}: unknown key(s) {sorted(unknown)}; valid keys are {valid}")
            if value.get("fmt") is None:
                raise ValueError(f"{what}: a mapping needs 'fmt' (write null instead of the mapping to leave the operand unquantized)")
            try:
                return cls(**value)
            except ValueError as err:
                raise ValueError(f"{what}: {err}") from None
        raise ValueError(f"{what}={value!r} is not valid: expected None, a format name, an OperandSpec or a dict of its fields")


# ------------------------------------------------------------------------ layer spec
@dataclass(frozen=True)
class LayerSpec:
    """What one layer does in one step: the resolved operand specs plus the FP4 options.

    Hashable and immutable, so ``torch.compile`` treats it as a constant (a recipe switch
    hands the layer a new ``LayerSpec`` and recompiles once).
    """

    operands: tuple[Optional[OperandSpec], ...] = (None,) * 6
    dge: bool = False
    dge_k: float = 5.0
    dge_clamp: float = 3.0
    occ: bool = False
    occ_quantile: float = 0.99
    source: str = field(default="", compare=False)

    @property
    def p1(self) -> Optional[OperandSpec]:
        return self.operands[0]

    @property
    def p2(self) -> Optional[OperandSpec]:
        return self.operands[1]

    @property
    def p3(self) -> Optional[OperandSpec]:
        return self.operands[2]

    @property
    def p4(self) -> Optional[OperandSpec]:
        return self.operands[3]

    @property
    def p5(self) -> Optional[OperandSpec]:
        return self.operands[4]

    @property
    def p6(self) -> Optional[OperandSpec]:
        return self.operands[5]

    @property
    def is_identity(self) -> bool:
        """Nothing quantized and no DGE/OCC: the layer is exactly ``nn.Linear``."""
        return all(op is None for op in self.operands) and not self.dge and not self.occ

    @property
    def needs_generator(self) -> bool:
        return any(op is not None and op.rounding == "stochastic" for op in self.operands)

    def short_str(self) -> str:
        ops = " ".join(f"P{i + 1}={'-' if op is None else op.short_str()}" for i, op in enumerate(self.operands))
        flags = []
        if self.dge:
            flags.append(f"dge(k={self.dge_k:g})")
        if self.occ:
            flags.append(f"occ(q={self.occ_quantile:g})")
        return ops + ("" if not flags else " " + " ".join(flags))


# ---------------------------------------------------------------------- named recipes
class RecipeName(str, enum.Enum):
    """The named recipes. Notation: ``q[fmt, B, axis]`` fake-quantizes with blocks of B along
    ``axis``; ``X`` is (N, in), ``W`` is (out, in), ``dY`` is (N, out); hp = compute dtype."""

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
    # fp8 (torchao / TE style; default fmt e4m3, block "tensor" = tensorwise, "channel" = rowwise):
    #   tensorwise: Y = q[e4m3,T](X) @ q[e4m3,T](W).T; dX = q[e5m2,T](dY) @ q[e4m3,T](W);
    #               dW = q[e5m2,T](dY).T @ q[e4m3,T](X)      (torchao TENSORWISE)
    #   rowwise:    the same GEMMs with one fp32 scale per row of each reduction, all e4m3
    #               (torchao ROWWISE, except that its scales are rounded to powers of two)
    FP8 = "fp8"
    # fp4 (Microsoft, arXiv 2501.17116; default fmt e2m1, block "channel"):
    #   Y  = q[e2m1, tokenwise](clamp(X, +-t)) @ q[e2m1, channelwise](W).T + (X - clamp(X, +-t)) @ W.T
    #        with t the 0.99 quantile of |X| (OCC)
    #   dX = dY @ W                                       (gradients in the compute dtype)
    #   dW = (dY.T @ X) * f'(W),  f'(x) = min(3, (1/k)|2x/delta - 1|^(1/k - 1)), k = 5 (DGE)
    FP4 = "fp4"
    # nvfp4 (NVIDIA, arXiv 2509.25149; default fmt e2m1, B=16, E4M3 block scales + fp32 tensor scale):
    #   Y = q(X) @ q(W).T; dX = q_sr(dY) @ q(W); dW = q_sr(dY).T @ q(X)   (q_sr: stochastic rounding)
    #   (the random Hadamard transform on wgrad inputs is not applied; keep the last layers in
    #    higher precision with a rule)
    NVFP4 = "nvfp4"
    # mxfp4 (OCP MX; default fmt e2m1, B=32, E8M0 power-of-two scales): all six operands
    #   Y = q(X) @ q(W).T; dX = q(dY) @ q(W); dW = q(dY).T @ q(X)
    MXFP4 = "mxfp4"
    # mxfp8 (OCP MX; default fmt e4m3, B=32, E8M0 scales): all six operands, e4m3 for gradients too
    #   Y = q(X) @ q(W).T; dX = q(dY) @ q(W); dW = q(dY).T @ q(X)
    MXFP8 = "mxfp8"
    # bf16: nothing quantized (the compute dtype throughout): Y = X @ W.T; dX = dY @ W; dW = dY.T @ X
    BF16 = "bf16"

    @classmethod
    def from_name(cls, name: Union[str, "RecipeName"]) -> "RecipeName":
        if isinstance(name, RecipeName):
            return name
        valid = [m.value for m in cls]
        if not isinstance(name, str) or name.strip().lower() not in valid:
            raise ValueError(f"recipe name {name!r} is not valid: expected one of {valid}")
        return cls(name.strip().lower())


# name -> (default fmt, default block size)
_DEFAULTS: dict[RecipeName, tuple[str, Union[int, str]]] = {
    RecipeName.PAPER: ("e4m3", 128),
    RecipeName.FULL: ("e4m3", 128),
    RecipeName.FP8: ("e4m3", "tensor"),
    RecipeName.FP4: ("e2m1", "channel"),
    RecipeName.NVFP4: ("e2m1", 16),
    RecipeName.MXFP4: ("e2m1", 32),
    RecipeName.MXFP8: ("e4m3", 32),
    RecipeName.BF16: ("bf16", "none"),
}
E5M2 = FPFormat.parse("e5m2")


def _gradient_format(fmt: FPFormat) -> FPFormat:
    """TE HYBRID: an 8-bit forward format gets E5M2 gradients (the wider exponent range)."""
    if fmt.bits == 8 and fmt.ebits < E5M2.ebits:
        return E5M2
    return fmt


def _named_operands(name: RecipeName, fmt: FPFormat, block: BlockSize) -> tuple[tuple[Optional[OperandSpec], ...], dict[str, Any]]:
    """The operand specs and options of a named recipe (see the RecipeName comments)."""
    S = OperandSpec
    if name is RecipeName.BF16:
        return (None,) * 6, {}
    if name is RecipeName.PAPER:
        w = S(fmt, block)
        return (None, w, None, w, None, w), {}
    if name is RecipeName.FULL:
        f, g = S(fmt, block), S(_gradient_format(fmt), block)
        return (f, f, g, f, g, f), {}
    if name is RecipeName.FP8:
        f = S(fmt, block)
        g = S(_gradient_format(fmt), block) if block == "tensor" else f
        return (f, f, g, f, g, f), {}
    if name is RecipeName.FP4:
        f = S(fmt, block)
        return (f, f, None, None, None, None), {"dge": True, "dge_k": 5.0, "dge_clamp": 3.0, "occ": True, "occ_quantile": 0.99}
    if name is RecipeName.NVFP4:
        f, g = S(fmt, block, "e4m3"), S(fmt, block, "e4m3", "stochastic")
        return (f, f, g, f, g, f), {}
    if name in (RecipeName.MXFP4, RecipeName.MXFP8):
        f = S(fmt, block, "e8m0")
        return (f,) * 6, {}
    raise AssertionError(f"unhandled recipe {name}")  # pragma: no cover - every member is handled


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class LayerRule:
    """Layers whose name matches ``pattern`` (fnmatch) use another recipe.

    ``recipe``: a named recipe for those layers (its own default format and block size unless
    ``fmt``/``block_size`` are given); ``None``: the parent recipe re-parameterised with
    ``fmt``/``block_size``. Example: keep the first and last blocks in FP8 while the rest runs
    FP4: ``LayerRule("model.blocks.0.*", fmt="e4m3")``; keep them unquantized:
    ``LayerRule("model.blocks.0.*", recipe="bf16")``.
    """

    pattern: str
    recipe: Optional[str] = None
    fmt: Optional[FPFormat] = None
    block_size: Union[BlockSize, str] = None  # None: inherit; "none": no scaling

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"LayerRule pattern={self.pattern!r} is not valid: expected a non-empty fnmatch pattern")
        if self.recipe is not None:
            object.__setattr__(self, "recipe", RecipeName.from_name(self.recipe).value)
        object.__setattr__(self, "fmt", _fmt_or_none(f"LayerRule({self.pattern!r}) fmt", self.fmt))
        object.__setattr__(self, "block_size", _check_block(self.block_size, what=f"LayerRule({self.pattern!r}) block_size", allow_inherit=True))
        if self.recipe is None and self.fmt is None and self.block_size is None:
            raise ValueError(f"LayerRule({self.pattern!r}) changes nothing: give recipe=, fmt= or block_size=")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def short_str(self) -> str:
        bits = [b for b in (self.recipe, self.fmt and self.fmt.name, self.block_size and f"B={self.block_size}") if b]
        return f"{self.pattern}->{','.join(bits)}"

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "recipe": self.recipe, "fmt": self.fmt.name if self.fmt else None,
                "block_size": self.block_size}

    @classmethod
    def coerce(cls, value: Any) -> "LayerRule":
        if isinstance(value, LayerRule):
            return value
        if isinstance(value, dict):
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = set(value) - set(valid)
            if unknown:
                raise ValueError(f"LayerRule: unknown key(s) {sorted(unknown)}; valid keys are {valid}")
            return cls(**value)
        raise ValueError(f"rule {value!r} is not valid: expected a LayerRule or a dict with keys pattern, recipe, fmt, block_size")


# ---------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class QuantRecipe:
    """Which GEMM operands of which linear layers are quantized, and how.

    Build one with :meth:`from_name` (``QuantRecipe.from_name("paper", fmt="e3m2", block_size=64)``),
    from YAML (:meth:`from_yaml`), or field by field (``QuantRecipe(p2=OperandSpec("e4m3"))``).

    Args:
        name: the named recipe this came from, or "custom".
        fmt, block_size: the recipe's nominal format and block size (what the scaling law is
            asked about); derived from the first quantized operand when not given.
        p1 .. p6: one ``OperandSpec`` per GEMM operand (see the module docstring), ``None`` to
            keep the operand in the compute dtype.
        dge, dge_k, dge_clamp: the differentiable gradient estimator of arXiv 2501.17116
            (weight gradient times ``min(dge_clamp, (1/k)|2x/delta - 1|^(1/k - 1))``, x the
            position of the scaled weight inside its quantization interval delta). Needs P2.
        occ, occ_quantile: outlier clamping and compensation: P1 is clamped at the quantile of
            |X|, and the residual is added back through a compute-dtype GEMM. Needs P1.
        include, exclude: fnmatch patterns on fully qualified module names. A linear layer is
            quantized when it matches an include pattern and no exclude pattern (default: every
            layer but the output heads, :data:`DEFAULT_EXCLUDE`).
        rules: :class:`LayerRule` overrides, first match wins.
    """

    name: str = "custom"
    fmt: Optional[FPFormat] = None
    block_size: Union[BlockSize, str] = None
    p1: Optional[OperandSpec] = None
    p2: Optional[OperandSpec] = None
    p3: Optional[OperandSpec] = None
    p4: Optional[OperandSpec] = None
    p5: Optional[OperandSpec] = None
    p6: Optional[OperandSpec] = None
    dge: bool = False
    dge_k: float = 5.0
    dge_clamp: float = 3.0
    occ: bool = False
    occ_quantile: float = 0.99
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    rules: tuple[LayerRule, ...] = ()

    def __post_init__(self) -> None:
        valid_names = [m.value for m in RecipeName] + ["custom"]
        if not isinstance(self.name, str) or self.name.strip().lower() not in valid_names:
            raise ValueError(f"QuantRecipe name={self.name!r} is not valid: expected one of {valid_names}")
        object.__setattr__(self, "name", self.name.strip().lower())
        for op in OPERANDS:
            object.__setattr__(self, op, OperandSpec.coerce(getattr(self, op), what=f"QuantRecipe {op}"))
        for flag in ("dge", "occ"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantRecipe {flag}={getattr(self, flag)!r} is not valid: expected true or false")
        object.__setattr__(self, "dge_k", _check_fraction("QuantRecipe dge_k", self.dge_k, low=0.0, high=1e6))
        object.__setattr__(self, "dge_clamp", _check_fraction("QuantRecipe dge_clamp", self.dge_clamp, low=0.0, high=1e6))
        object.__setattr__(self, "occ_quantile", _check_fraction("QuantRecipe occ_quantile", self.occ_quantile, low=0.0, high=1.0))
        if self.dge and self.p2 is None:
            raise ValueError("QuantRecipe dge=True needs a quantized weight (p2): DGE differentiates P2's quantizer")
        if self.occ and self.p1 is None:
            raise ValueError("QuantRecipe occ=True needs a quantized input (p1): OCC clamps P1 before quantizing it")
        object.__setattr__(self, "include", _check_patterns("QuantRecipe include", self.include))
        object.__setattr__(self, "exclude", _check_patterns("QuantRecipe exclude", self.exclude))
        if isinstance(self.rules, (LayerRule, dict)):
            object.__setattr__(self, "rules", (self.rules,))
        object.__setattr__(self, "rules", tuple(LayerRule.coerce(r) for r in self.rules))
        # nominal format / block size: given, else the first quantized operand's (weights first)
        fmt = _fmt_or_none("QuantRecipe fmt", self.fmt)
        block = _check_block(self.block_size, what="QuantRecipe block_size", allow_inherit=True)
        first = next((op for op in (self.p2, self.p1, self.p4, self.p6, self.p3, self.p5) if op is not None), None)
        if fmt is None:
            fmt = first.fmt if first is not None else FPFormat.parse("bf16")
        if block is None:
            block = first.block_size if first is not None else None
            block = "none" if block is None else block
        object.__setattr__(self, "fmt", fmt)
        object.__setattr__(self, "block_size", _block_value(block))

    # -------------------------------------------------------------- construction
    @classmethod
    def from_name(
        cls,
        name: Union[str, RecipeName],
        *,
        fmt: Optional[FormatLike] = None,
        block_size: Union[BlockSize, str] = None,
        include: Optional[Iterable[str]] = None,
        exclude: Optional[Iterable[str]] = None,
        rules: Iterable[Union[LayerRule, dict]] = (),
    ) -> "QuantRecipe":
        """A named recipe (see :class:`RecipeName`), parameterised by format and block size.

        ``fmt``/``block_size`` default to the recipe's own (``None``); ``block_size="none"``
        asks for no scaling.
        """
        member = RecipeName.from_name(name)
        default_fmt, default_block = _DEFAULTS[member]
        fmt_ = _fmt_or_none(f"recipe {member.value!r} fmt", fmt) or as_format(default_fmt)
        block = _check_block(block_size, what=f"recipe {member.value!r} block_size", allow_inherit=True)
        block = default_block if block is None else block
        if member is RecipeName.BF16:
            if fmt is not None and fmt_ != as_format("bf16"):
                raise ValueError(f"recipe 'bf16' quantizes nothing: fmt={fmt!r} is not valid (leave it out or give 'bf16')")
            block = "none"
        operands, options = _named_operands(member, fmt_, _block_value(block))
        return cls(
            name=member.value, fmt=fmt_, block_size=block,
            **dict(zip(OPERANDS, operands)), **options,
            include=DEFAULT_INCLUDE if include is None else tuple(include),
            exclude=DEFAULT_EXCLUDE if exclude is None else tuple(exclude),
            rules=tuple(rules),
        )

    @classmethod
    def coerce(cls, recipe: Union[str, os.PathLike, "QuantRecipe"], *, fmt: Optional[FormatLike] = None,
               block_size: Union[BlockSize, str] = None) -> "QuantRecipe":
        """A ``QuantRecipe``, a recipe name or a YAML path -> ``QuantRecipe``; ``fmt``/``block_size``
        re-parameterise it (:meth:`with_format`)."""
        if isinstance(recipe, QuantRecipe):
            out = recipe
        elif isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and recipe.strip().lower().endswith((".yaml", ".yml"))):
            out = cls.from_yaml(recipe)
        elif isinstance(recipe, str):
            return cls.from_name(recipe, fmt=fmt, block_size=block_size)
        else:
            raise ValueError(f"recipe={recipe!r} is not valid: expected a QuantRecipe, a YAML path or one of {[m.value for m in RecipeName]}")
        if fmt is not None or block_size is not None:
            out = out.with_format(fmt if fmt is not None else out.fmt, block_size=block_size)
        return out

    def with_format(self, fmt: FormatLike, *, block_size: Union[BlockSize, str] = None) -> "QuantRecipe":
        """The same recipe at another format (and block size): what a precision switch asks for.

        A named recipe that was not modified is rebuilt by name (so ``full`` gets its E5M2
        gradients back at FP8); a custom one gets ``fmt`` on every quantized operand and
        ``block_size`` on every operand with an int block. ``"bf16"`` gives the bf16 recipe.
        Layer selection (include, exclude, rules) is kept.
        """
        fmt_ = as_format(fmt)
        keep = {"include": self.include, "exclude": self.exclude, "rules": self.rules}
        if fmt_ in (as_format("bf16"), as_format("fp32")):
            return QuantRecipe.from_name("bf16", **keep)
        block = _check_block(block_size, what="with_format block_size", allow_inherit=True)
        if self.name != "custom" and self.name != RecipeName.BF16.value and self._is_pristine():
            return QuantRecipe.from_name(self.name, fmt=fmt_, block_size=block if block is not None else self.block_size or "none", **keep)
        if self.name == RecipeName.BF16.value:
            return QuantRecipe.from_name("paper", fmt=fmt_, block_size=block, **keep)

        def swap(op: Optional[OperandSpec]) -> Optional[OperandSpec]:
            if op is None:
                return None
            new_block = op.block_size if (block is None or not isinstance(op.block_size, int)) else _block_value(block)
            return dataclasses.replace(op, fmt=fmt_, block_size=new_block)

        ops = {op: swap(getattr(self, op)) for op in OPERANDS}
        return dataclasses.replace(self, name="custom", fmt=fmt_, block_size=block, **ops)

    def _is_pristine(self) -> bool:
        """True when the operands and options are exactly the named recipe's."""
        try:
            ref = QuantRecipe.from_name(self.name, fmt=self.fmt, block_size=_block_str(self.block_size))
        except ValueError:
            return False
        return ref.layer_spec_default() == self.layer_spec_default()

    # ---------------------------------------------------------------- resolution
    def layer_spec_default(self) -> LayerSpec:
        """The spec of a layer that no rule matches."""
        return LayerSpec(
            operands=tuple(getattr(self, op) for op in OPERANDS),
            dge=self.dge, dge_k=self.dge_k, dge_clamp=self.dge_clamp,
            occ=self.occ, occ_quantile=self.occ_quantile, source=self.name,
        )

    def is_included(self, name: str) -> bool:
        """Whether the layer called ``name`` is quantized at all (include/exclude patterns)."""
        name = clean_module_name(name)
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def layer_spec(self, name: str) -> Optional[LayerSpec]:
        """The spec for the linear layer called ``name``; ``None`` when it is not quantized."""
        name = clean_module_name(name)
        if not self.is_included(name):
            return None
        for rule in self.rules:
            if rule.matches(name):
                sub = self._rule_recipe(rule)
                spec = sub.layer_spec_default()
                return dataclasses.replace(spec, source=f"rule {rule.pattern!r}: {sub.name}")
        return self.layer_spec_default()

    def _rule_recipe(self, rule: LayerRule) -> "QuantRecipe":
        """The recipe the layers matching ``rule`` use."""
        if rule.recipe is not None:
            return QuantRecipe.from_name(rule.recipe, fmt=rule.fmt, block_size=rule.block_size)
        return self.with_format(rule.fmt or self.fmt, block_size=rule.block_size)

    @property
    def quantizes_anything(self) -> bool:
        """Whether some layer gets a quantized operand (or DGE/OCC): the default spec or a rule's."""
        return not self.layer_spec_default().is_identity or any(
            not self._rule_recipe(r).layer_spec_default().is_identity for r in self.rules
        )

    # ------------------------------------------------------------------ printing
    def short_str(self) -> str:
        """One line: ``paper e2m1 B=128 | P1=- P2=e2m1/128 ... | exclude=9 rules=[...]``."""
        head = f"{self.name} {self.fmt.name} B={_block_str(self.block_size)}"
        tail = []
        if self.exclude != DEFAULT_EXCLUDE:
            tail.append(f"exclude={list(self.exclude)}")
        if self.include != DEFAULT_INCLUDE:
            tail.append(f"include={list(self.include)}")
        if self.rules:
            tail.append(f"rules=[{', '.join(r.short_str() for r in self.rules)}]")
        return " | ".join([head, self.layer_spec_default().short_str()] + tail)

    def __repr__(self) -> str:
        return f"QuantRecipe({self.short_str()})"

    def describe(self, model: Any) -> str:
        """A table of every ``nn.Linear`` of ``model``: name, shape (out x in), each operand's spec."""
        import torch.nn as nn  # local: keeps `import lightning_fpq.recipe` light

        header = ["layer", "shape", "P1", "P2", "P3", "P4", "P5", "P6", "options"]
        rows = [header]
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            shape = f"{module.out_features}x{module.in_features}"
            spec = self.layer_spec(name)
            if spec is None:
                rows.append([clean_module_name(name), shape] + ["-"] * 6 + ["excluded"])
                continue
            opts = []
            if spec.dge:
                opts.append("dge")
            if spec.occ:
                opts.append("occ")
            if spec.source.startswith("rule"):
                opts.append(spec.source)
            rows.append([clean_module_name(name), shape] + ["-" if op is None else op.short_str() for op in spec.operands]
                        + [" ".join(opts) or ""])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [self.short_str()]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    # ----------------------------------------------------------------- YAML / dict
    def to_dict(self) -> dict[str, Any]:
        """Every field, explicit (what ``to_yaml`` writes and ``from_dict`` reads back)."""
        return {
            "name": self.name,
            "fmt": self.fmt.name,
            "block_size": _block_yaml(self.block_size),
            "operands": {op: (None if getattr(self, op) is None else getattr(self, op).to_dict()) for op in OPERANDS},
            "dge": self.dge, "dge_k": self.dge_k, "dge_clamp": self.dge_clamp,
            "occ": self.occ, "occ_quantile": self.occ_quantile,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "QuantRecipe":
        """Validate ``data`` against the structured schema (:class:`RecipeConfig`) and build.

        Keys left out take the named recipe's values (``name`` defaults to "paper"); operands
        listed under ``operands`` override the named recipe's (``null`` = not quantized).
        """
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(data, QuantRecipe):
            return data
        try:
            raw = OmegaConf.create(data) if not OmegaConf.is_config(data) else data
            cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), raw)
        except OmegaConfBaseException as err:
            raise ValueError(_schema_error(err)) from None
        plain = OmegaConf.to_container(cfg, resolve=True)
        return cls._from_plain(plain, explicit=raw)

    @classmethod
    def _from_plain(cls, plain: dict[str, Any], explicit: Any) -> "QuantRecipe":
        from omegaconf import OmegaConf

        given = OmegaConf.to_container(explicit, resolve=True)
        given_ops = given.get("operands") or {}
        rules = [LayerRule.coerce(r) for r in plain["rules"]]
        include = DEFAULT_INCLUDE if plain["include"] is None else tuple(plain["include"])
        exclude = DEFAULT_EXCLUDE if plain["exclude"] is None else tuple(plain["exclude"])
        options = {k: plain[k] for k in ("dge", "dge_k", "dge_clamp", "occ", "occ_quantile") if plain[k] is not None}
        operands = {
            op: OperandSpec.coerce(plain["operands"][op], what=f"operands.{op}") if given_ops.get(op) is not None else None
            for op in OPERANDS if op in given_ops
        }
        name = plain["name"]
        if isinstance(name, str) and name.strip().lower() == "custom":
            return cls(name="custom", fmt=plain["fmt"], block_size=plain["block_size"], include=include,
                       exclude=exclude, rules=tuple(rules), **operands, **options)
        base = cls.from_name(name, fmt=plain["fmt"], block_size=plain["block_size"], include=include,
                             exclude=exclude, rules=rules)
        changes = {**operands, **options}
        return dataclasses.replace(base, **changes) if changes else base

    def to_yaml(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The recipe as YAML text (also written to ``path`` when given)."""
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: Union[str, os.PathLike]) -> "QuantRecipe":
        """Read a recipe from a YAML file path (or YAML text containing a newline)."""
        from omegaconf import OmegaConf

        if isinstance(source, str) and "\n" in source:
            data = OmegaConf.create(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"recipe YAML {str(path)!r} does not exist")
            data = OmegaConf.load(path)
        if not OmegaConf.is_dict(data):
            raise ValueError(f"recipe YAML {source!r} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)


# ------------------------------------------------------------------ YAML schema
@dataclass
class OperandConfig:
    """YAML schema of one operand (``null`` in place of the mapping: not quantized)."""

    fmt: Optional[str] = None
    block_size: Optional[Union[int, str]] = 128
    scale_format: str = "fp32"
    rounding: str = "nearest"


@dataclass
class OperandsConfig:
    p1: Optional[OperandConfig] = None
    p2: Optional[OperandConfig] = None
    p3: Optional[OperandConfig] = None
    p4: Optional[OperandConfig] = None
    p5: Optional[OperandConfig] = None
    p6: Optional[OperandConfig] = None


@dataclass
class RuleConfig:
    pattern: str = ""
    recipe: Optional[str] = None
    fmt: Optional[str] = None
    block_size: Optional[Union[int, str]] = None


@dataclass
class RecipeConfig:
    """YAML schema of a recipe (OmegaConf structured config: unknown keys are refused).

    ``name`` is a named recipe or "custom"; ``fmt``/``block_size`` parameterise it (``null``:
    its defaults); ``operands`` overrides single operands; options left ``null`` keep the
    named recipe's; ``include``/``exclude`` ``null`` keep the defaults.
    """

    name: str = "paper"
    fmt: Optional[str] = None
    block_size: Optional[Union[int, str]] = None
    operands: OperandsConfig = field(default_factory=OperandsConfig)
    dge: Optional[bool] = None
    dge_k: Optional[float] = None
    dge_clamp: Optional[float] = None
    occ: Optional[bool] = None
    occ_quantile: Optional[float] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    rules: List[RuleConfig] = field(default_factory=list)


def _schema_error(err: Exception) -> str:
    """Turn an OmegaConf error into one that names the key (and the valid keys or the bad value)."""
    from omegaconf.errors import ConfigKeyError

    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "")
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError):
        schema = getattr(err, "object_type", None)
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
            schema = RecipeConfig
        where = {RecipeConfig: "a recipe", OperandsConfig: "operands", OperandConfig: "an operand",
                 RuleConfig: "a rule"}.get(schema, schema.__name__)
        valid = [f.name for f in dataclasses.fields(schema)]
        return f"unknown recipe key {key!r}: valid keys in {where} are {valid}"
    return f"recipe key {key!r} has a bad value: {first_line}"


# ------------------------------------------------------------------------- names
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def clean_module_name(name: str) -> str:
    """The module name a user would write: wrapper components (torch.compile's ``_orig_mod``,
    activation checkpointing, FSDP1) removed."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def named_recipes() -> Dict[str, QuantRecipe]:
    """Every named recipe at its default format and block size."""
    return {m.value: QuantRecipe.from_name(m) for m in RecipeName}
