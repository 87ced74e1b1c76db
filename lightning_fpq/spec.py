"""What one linear layer does in one training step: a :class:`LayerSpec`.

A linear layer computes three GEMMs per step (docs/science.md section 3, arXiv 2501.02423
eq. 8). Each GEMM has two inputs, and each input is quantized along *that GEMM's* reduction
dimension. The six operands are named by their role in their GEMM (as torchao names its cast
configs) and keep their paper numbers P1..P6 in everything printed:

====  ==============================  ==========  ====================  ============================
 op   role                            tensor      GEMM                  blocked along (the reduction)
====  ==============================  ==========  ====================  ============================
 P1   ``input``                       X (N, in)   Y  = X  @ W.T         in_features  (a row of X)
 P2   ``weight``                      W (out, in) Y  = X  @ W.T         in_features  (a row of W)
 P3   ``grad_output``                 dY (N, out) dX = dY @ W           out_features (a row of dY)
 P4   ``weight_for_grad_input``       W (out, in) dX = dY @ W           out_features (a column of W)
 P5   ``grad_output_for_grad_weight`` dY (N, out) dW = dY.T @ X         tokens N     (a column of dY)
 P6   ``input_for_grad_weight``       X (N, in)   dW = dY.T @ X         tokens N     (a column of X)
====  ==============================  ==========  ====================  ============================

N is the number of tokens (every leading dimension of the input flattened). An operand is an
:class:`OperandSpec`, or ``None`` to keep it in the compute dtype. The FP4 options of arXiv
2501.17116 (DGE, OCC) are one frozen :class:`FP4Options`.

Everything here is frozen and hashable, so ``torch.compile`` treats a spec as a constant.
This module knows formats and nothing of recipes, layers or Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _config
from ._config import BlockSize
from .formats import FPFormat
from .quantize import ROUNDING_MODES, SCALE_FORMATS

ROLES = (
    "input",
    "weight",
    "grad_output",
    "weight_for_grad_input",
    "grad_output_for_grad_weight",
    "input_for_grad_weight",
)
"""The six operands in paper order: ``ROLES[i]`` is P(i+1)."""
P_NUMBERS = tuple(f"p{i + 1}" for i in range(len(ROLES)))
ROLE_OF = {**dict(zip(P_NUMBERS, ROLES)), **{role: role for role in ROLES}}
"""Every accepted operand key (``p1``..``p6`` or a role name) -> the role."""


def operand_label(role: str) -> str:
    """``"P2 (weight)"``: how an operand is named in messages."""
    return f"P{ROLES.index(role) + 1} ({role})"


# ---------------------------------------------------------------------- one operand
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
        if self.fmt is None:
            raise ValueError("OperandSpec fmt=None is not valid: leave the operand out (None) to keep it unquantized")
        try:
            fmt = FPFormat.parse(self.fmt)
        except ValueError as err:
            raise ValueError(f"OperandSpec fmt: {err}") from None
        object.__setattr__(self, "fmt", fmt)
        object.__setattr__(self, "block_size", _config.block_size(self.block_size, what="OperandSpec block_size"))
        object.__setattr__(
            self, "scale_format", _config.choice(self.scale_format, SCALE_FORMATS, what="OperandSpec scale_format")
        )
        object.__setattr__(self, "rounding", _config.choice(self.rounding, ROUNDING_MODES, what="OperandSpec rounding"))

    def short_str(self) -> str:
        """``e2m1/16/e4m3/sr``: format / block / scale format (if not fp32) / ``sr`` if stochastic."""
        parts = [self.fmt.name, _config.block_size_text(self.block_size)]
        if self.scale_format != "fp32":
            parts.append(self.scale_format)
        if self.rounding == "stochastic":
            parts.append("sr")
        return "/".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fmt": self.fmt.name,
            "block_size": _config.block_size_yaml(self.block_size),
            "scale_format": self.scale_format,
            "rounding": self.rounding,
        }

    @classmethod
    def coerce(cls, value: Any, *, what: str = "operand") -> Optional[OperandSpec]:
        """``None`` (not quantized), an ``OperandSpec``, a format name, or a mapping of its fields."""
        if value is None or isinstance(value, OperandSpec):
            return value
        if isinstance(value, (str, FPFormat)):
            try:
                return cls(fmt=FPFormat.parse(value))
            except ValueError as err:
                raise ValueError(f"{what}: {err}") from None
        if isinstance(value, Mapping):
            if value.get("fmt") is None and not set(value) - set(_config.field_names(cls)):
                raise ValueError(
                    f"{what}: a mapping needs 'fmt' (write null instead of the mapping to leave "
                    "the operand unquantized)"
                )
            return _config.from_mapping(cls, value, what=what)
        raise ValueError(
            f"{what}={value!r} is not valid: expected None, a format name, an OperandSpec or a mapping of its fields"
        )


# ---------------------------------------------------------------------- FP4 options
@dataclass(frozen=True)
class FP4Options:
    """The FP4 training options of arXiv 2501.17116 (docs/science.md section 6).

    Args:
        dge: the differentiable gradient estimator: the weight gradient is multiplied by
            ``min(dge_clamp, (1/dge_k) |2x/delta - 1|^(1/dge_k - 1))``, x the position of the
            scaled weight inside its quantization interval delta. Needs a quantized weight (P2).
        dge_k, dge_clamp: DGE's sharpness k (> 0) and the clamp of its factor (> 0).
        occ: outlier clamping and compensation: the input (P1) is clamped at the
            ``occ_quantile`` of |X| before it is quantized, and the clamped-off residual is added
            back through a compute-dtype GEMM. Needs a quantized input (P1).
        occ_quantile: the clamp quantile, in (0, 1].
    """

    dge: bool = False
    dge_k: float = 5.0
    dge_clamp: float = 3.0
    occ: bool = False
    occ_quantile: float = 0.99

    def __post_init__(self) -> None:
        _config.flag(self.dge, what="dge")
        _config.flag(self.occ, what="occ")
        object.__setattr__(self, "dge_k", _config.number(self.dge_k, what="dge_k", low=0.0, low_open=True))
        object.__setattr__(self, "dge_clamp", _config.number(self.dge_clamp, what="dge_clamp", low=0.0, low_open=True))
        object.__setattr__(
            self,
            "occ_quantile",
            _config.number(self.occ_quantile, what="occ_quantile", low=0.0, high=1.0, low_open=True),
        )

    @property
    def active(self) -> bool:
        return self.dge or self.occ

    def short_str(self) -> str:
        flags = []
        if self.dge:
            flags.append(f"dge(k={self.dge_k:g})")
        if self.occ:
            flags.append(f"occ(q={self.occ_quantile:g})")
        return " ".join(flags)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FP4_OPTION_NAMES = tuple(_config.field_names(FP4Options))


# ------------------------------------------------------------------------ layer spec
@dataclass(frozen=True)
class LayerSpec:
    """The six operand specs of one layer (positional in paper order P1..P6, or by role) and its
    FP4 options. ``spec.p2`` reads the same operand as ``spec.weight``; ``spec.dge`` reads
    ``spec.fp4.dge``. Build from keywords that may mix P numbers, roles and FP4 option names with
    :meth:`build`."""

    input: Optional[OperandSpec] = None
    weight: Optional[OperandSpec] = None
    grad_output: Optional[OperandSpec] = None
    weight_for_grad_input: Optional[OperandSpec] = None
    grad_output_for_grad_weight: Optional[OperandSpec] = None
    input_for_grad_weight: Optional[OperandSpec] = None
    fp4: FP4Options = field(default_factory=FP4Options)

    def __post_init__(self) -> None:
        for index, role in enumerate(ROLES):
            object.__setattr__(self, role, OperandSpec.coerce(getattr(self, role), what=f"p{index + 1} ({role})"))
        if isinstance(self.fp4, Mapping):
            object.__setattr__(self, "fp4", _config.from_mapping(FP4Options, self.fp4, what="fp4"))
        elif not isinstance(self.fp4, FP4Options):
            raise ValueError(
                f"fp4={self.fp4!r} is not valid: expected FP4Options or a mapping of {list(FP4_OPTION_NAMES)}"
            )
        if self.fp4.dge and self.weight is None:
            raise ValueError("dge=True needs a quantized weight (p2): DGE differentiates the weight's quantizer")
        if self.fp4.occ and self.input is None:
            raise ValueError("occ=True needs a quantized input (p1): OCC clamps the input before quantizing it")

    @classmethod
    def build(cls, base: Optional[LayerSpec] = None, *, what: str = "LayerSpec", **changes: Any) -> LayerSpec:
        """``base`` (default: nothing quantized) with ``changes``: operands by P number or role,
        FP4 options by name (``dge=True``) or all at once (``fp4=FP4Options(...)``)."""
        base = base if base is not None else cls()
        operands, options = {}, {}
        for key, value in changes.items():
            if key in ROLE_OF:
                role = ROLE_OF[key]
                if role in operands:
                    raise ValueError(f"{what}: operand {operand_label(role)} is given twice (as a P number and a role)")
                operands[role] = value
            elif key in FP4_OPTION_NAMES:
                options[key] = value
            elif key == "fp4":
                options.update(value.to_dict() if isinstance(value, FP4Options) else dict(value))
            else:
                raise ValueError(
                    f"{what}: unknown key {key!r}; valid keys are the operands {list(P_NUMBERS)} "
                    f"(or their roles {list(ROLES)}), the FP4 options {list(FP4_OPTION_NAMES)} or 'fp4'"
                )
        fp4 = dataclasses.replace(base.fp4, **options) if options else base.fp4
        return dataclasses.replace(base, **operands, fp4=fp4)

    # ------------------------------------------------------------------ reading
    def __getattr__(self, name: str) -> Any:
        # P numbers read the role's operand, FP4 option names the option (only reached when
        # normal lookup fails, so fields and methods are unaffected)
        if name in P_NUMBERS:
            return getattr(self, ROLE_OF[name])
        if name in FP4_OPTION_NAMES:
            return getattr(self.fp4, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def operands(self) -> tuple[Optional[OperandSpec], ...]:
        """The six operand specs in paper order P1..P6."""
        return tuple(getattr(self, role) for role in ROLES)

    @property
    def nominal(self) -> Optional[OperandSpec]:
        """The operand that names the spec's format and block size (what the scaling law is asked
        about): the first quantized one, weights first (P2, P1, P4, P6, P3, P5)."""
        order = (
            self.weight,
            self.input,
            self.weight_for_grad_input,
            self.input_for_grad_weight,
            self.grad_output,
            self.grad_output_for_grad_weight,
        )
        return next((op for op in order if op is not None), None)

    @property
    def is_identity(self) -> bool:
        """Nothing quantized and no DGE/OCC: the layer is exactly ``nn.Linear``."""
        return all(op is None for op in self.operands) and not self.fp4.active

    @property
    def needs_generator(self) -> bool:
        return any(op is not None and op.rounding == "stochastic" for op in self.operands)

    def short_str(self) -> str:
        ops = " ".join(f"P{i + 1}={'-' if op is None else op.short_str()}" for i, op in enumerate(self.operands))
        flags = self.fp4.short_str()
        return ops + (" " + flags if flags else "")

    def to_dict(self) -> dict[str, Any]:
        """Operands by P number (``None``: not quantized) and the FP4 options."""
        return {
            "operands": {p: None if op is None else op.to_dict() for p, op in zip(P_NUMBERS, self.operands)},
            "fp4": self.fp4.to_dict(),
        }
