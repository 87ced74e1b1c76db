"""The critical data size of the recipe a run is training with.

How a recipe maps onto the law (arXiv 2501.02423), which was fitted on runs that quantize P2,
P4 and P6 identically: every quantized operand of the recipe's default layer spec adds its
share of the penalty, ``log2 B / ((E+0.5)^dl (M+0.5)^nu) / 3``
(:meth:`~lightning_fpq.scaling.capybara.CapybaraLaw.operand_factor`), and the law is
evaluated with the sum. For the ``paper`` recipe (three equal operands) this is exactly the
law; a recipe that quantizes more operands (``full``: six) gets a larger penalty and an
earlier D_crit. Any other shape (other operands, scale formats other than fp32, stochastic
rounding, tensor-wise or unscaled blocks, DGE/OCC) is outside what the law was fitted on: its
prediction is labelled *uncalibrated* everywhere it is shown. Per-layer rules are not
counted (the default spec covers most of the compute); operands without scaling are
evaluated as ``"tensor"``. Nothing quantized (``bf16``): D_crit is infinite.

Channel- and tensor-wise scales: the paper's law uses its fitted constant (log2 B = 13.16 for a
channel, twice that for a tensor, from 2M-token batches). For any other law the number of
elements that really share one scale is counted in the model and batch at hand
(:func:`scale_group_sizes`: a channel is the GEMM's reduction length, a tensor its numel), and
log2 of it is used instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from lightning.pytorch import LightningModule, Trainer

from .. import _config
from ..formats import FPFormat
from ..linear import quantized_layers
from ..recipe import QuantRecipe
from ..scaling.capybara import CapybaraLaw
from ..scaling.law import NAMED_LAWS, resolve_named_law
from ..scaling.params import count_params
from ..spec import ROLES, LayerSpec

LawLike = Union[None, str, os.PathLike, CapybaraLaw]


def resolve_law(law: LawLike) -> CapybaraLaw:
    """None or "paper" -> the paper's constants; a named law of
    :data:`~lightning_fpq.scaling.law.NAMED_LAWS` ("demo-calibration": fitted to this project's
    own CPU sweep, examples/calibration/); a ``CapybaraLaw``; or a law YAML file saved by
    ``law.save``. Only a Capybara law has a critical data size."""
    if not isinstance(law, CapybaraLaw):
        if law is not None and not isinstance(law, (str, os.PathLike)):
            raise ValueError(
                f"law={law!r} is not valid: expected None, one of {NAMED_LAWS}, a CapybaraLaw or the path "
                "of a law YAML file"
            )
        law = resolve_named_law(law)
    if not isinstance(law, CapybaraLaw):
        raise ValueError(
            f"law {law.short_str()} has no critical data size (KumarLaw/ChinchillaLaw): give a CapybaraLaw, "
            f"one of {list(NAMED_LAWS)} or a Capybara law file"
        )
    return law


def check_n_params(n_params: Union[str, int]) -> Union[str, int]:
    if n_params == "auto":
        return n_params
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params <= 0:
        raise ValueError(
            f"n_params={n_params!r} is not valid: expected 'auto' (counted from the model) or a positive int"
        )
    return n_params


def resolve_n_params(n_params: Union[str, int], module: LightningModule) -> int:
    """'auto': the model's non-embedding parameters, as the law counts them (``count_params``)."""
    return count_params(module) if n_params == "auto" else int(n_params)


@dataclass(frozen=True)
class LawPoint:
    """What the law is asked about for a recipe: the summed penalty factor of its quantized
    operands, the recipe's nominal format (for display), and whether the law was fitted on
    recipes of this shape."""

    factor: float  # sum of CapybaraLaw.operand_factor over the quantized operands (0: none)
    fmt: Optional[FPFormat]  # the recipe's nominal format; None: nothing quantized
    label: str
    calibrated: bool
    why: str = ""  # what makes it uncalibrated

    def short_str(self) -> str:
        return self.label if self.calibrated else f"{self.label} [uncalibrated: {self.why}]"

    def critical_data_size(self, law: CapybaraLaw, n_params: int) -> float:
        return float(law.recipe_critical_data_size(n_params, self.factor))

    def loss(self, law: CapybaraLaw, n_params: int, tokens: float) -> float:
        """The law's final loss (nats/token) of a run annealed to ``tokens`` tokens."""
        return float(law.recipe_loss(n_params, max(tokens, 1.0), self.factor))

    def penalty(self, law: CapybaraLaw, n_params: int, tokens: float) -> float:
        """The law's quantization penalty (nats/token): this point's loss minus the unquantized one."""
        return self.loss(law, n_params, tokens) - float(law.recipe_loss(n_params, max(tokens, 1.0), 0.0))


_FITTED_ROLES = ("weight", "weight_for_grad_input", "input_for_grad_weight")  # P2, P4, P6

#: per role, (the GEMM dimension a channel scale runs along, the tensor's two dimensions), in
#: terms of a layer's in/out features and the batch's tokens
_SCALE_GROUPS = {
    "input": ("in", ("tokens", "in")),
    "weight": ("in", ("out", "in")),
    "grad_output": ("out", ("tokens", "out")),
    "weight_for_grad_input": ("out", ("out", "in")),
    "grad_output_for_grad_weight": ("tokens", ("tokens", "out")),
    "input_for_grad_weight": ("tokens", ("tokens", "in")),
}

ScaleGroups = dict[str, dict[str, float]]  # role -> {"channel": elements, "tensor": elements}


def scale_group_sizes(module: Any, tokens_per_batch: int) -> ScaleGroups:
    """How many elements share one channel-wise and one tensor-wise scale, per operand role,
    in ``module``'s quantized layers for batches of ``tokens_per_batch`` tokens: the geometric
    mean over the layers, weighted by each layer's weight count (its share of the GEMM work).
    Empty when the module has no quantized layer."""
    layers = [layer.gemm_weight().shape for _, layer in quantized_layers(module)]
    if not layers or tokens_per_batch <= 0:
        return {}
    weights = np.array([out * inp for out, inp in layers], dtype=float)
    out: ScaleGroups = {}
    for role, (channel, tensor) in _SCALE_GROUPS.items():
        sizes = [{"in": inp, "out": o, "tokens": tokens_per_batch} for o, inp in layers]
        log_channel = np.array([math.log2(d[channel]) for d in sizes])
        log_tensor = np.array([math.log2(d[tensor[0]] * d[tensor[1]]) for d in sizes])
        out[role] = {
            "channel": 2.0 ** float(np.average(log_channel, weights=weights)),
            "tensor": 2.0 ** float(np.average(log_tensor, weights=weights)),
        }
    return out


def law_point(recipe: QuantRecipe, law: CapybaraLaw, n_params: int, groups: Optional[ScaleGroups] = None) -> LawPoint:
    """The law point of ``recipe``'s default spec (see the module docstring). ``groups``
    (:func:`scale_group_sizes`): counted elements per channel/tensor scale, used for every law
    but the paper's."""
    spec = recipe.default
    quantized = [(i, role, op) for i, (role, op) in enumerate(zip(ROLES, spec.operands)) if op is not None]
    if not quantized:
        return LawPoint(0.0, None, "unquantized", True)
    counted = groups if groups and law.provenance.source != "paper" else {}
    factor = 0.0
    for _, role, op in quantized:
        block = "tensor" if op.block_size is None else op.block_size
        shared = counted[role][block] if counted and block in ("channel", "tensor") else None
        factor += law.operand_factor(op.fmt, block, shared_elements=shared)
    labels = sorted({f"{op.fmt.name} B={_config.block_size_text(op.block_size)}" for _, _, op in quantized})
    label = f"{' + '.join(labels)} on {','.join(f'P{i + 1}' for i, _, _ in quantized)}"
    return LawPoint(factor, recipe.fmt, label, *_calibration(spec, law))


def _calibration(spec: LayerSpec, law: CapybaraLaw) -> tuple[bool, str]:
    """Whether ``law`` was fitted on layers like ``spec`` (the paper's setup, at block sizes it
    saw), and if not why."""
    quantized = {role for role in ROLES if getattr(spec, role) is not None}
    if quantized != set(_FITTED_ROLES):
        return False, "the law was fitted on P2, P4, P6 quantized alike"
    ops = {getattr(spec, role) for role in _FITTED_ROLES}
    op = next(iter(ops))
    if len(ops) > 1:
        return False, "P2, P4, P6 differ"
    if op.scale_format != "fp32" or op.rounding != "nearest" or spec.fp4.active:
        return False, "fitted with fp32 scales, nearest rounding, no DGE/OCC"
    fitted = law.provenance.block_sizes
    if fitted is None:  # not recorded (the paper's law): integer blocks and channel-wise scaling were fitted
        if op.block_size in (None, "tensor"):
            return False, "no tensor-wise or unscaled runs were fitted"
        return True, ""
    ints = [b for b in fitted if isinstance(b, int)]
    inside = isinstance(op.block_size, int) and bool(ints) and min(ints) <= op.block_size <= max(ints)
    if op.block_size not in fitted and not inside:
        return False, f"the law was fitted on blocks of {', '.join(map(str, fitted))} elements"
    return True, ""


def critical_tokens(
    recipe: QuantRecipe, law: CapybaraLaw, n_params: int, groups: Optional[ScaleGroups] = None
) -> tuple[float, LawPoint]:
    """(D_crit in tokens, the law point) for ``recipe``; D_crit is inf when nothing is quantized."""
    point = law_point(recipe, law, n_params, groups)
    return point.critical_data_size(law, n_params), point


INTERVAL = (5.0, 95.0)  # percentiles of the bootstrap refits


def critical_interval(
    recipe: QuantRecipe, law: CapybaraLaw, n_params: int, groups: Optional[ScaleGroups] = None
) -> Optional[tuple[float, float]]:
    """The 5-95% interval of D_crit for ``recipe`` over the law's bootstrap refits
    (:meth:`~lightning_fpq.scaling.law.Law.resampled`); ``None`` when the law has none."""
    samples = [critical_tokens(recipe, refit, n_params, groups)[0] for refit in law.resampled()]
    finite = [d for d in samples if math.isfinite(d)]
    if not finite:
        return None
    low, high = np.percentile(finite, INTERVAL)
    return float(low), float(high)


def predicted_loss(point: LawPoint, law: CapybaraLaw, n_params: int, tokens: float) -> float:
    """The law's final loss (nats/token) of a run annealed to ``tokens`` tokens at ``point``
    (not the loss mid-run: the law describes runs whose schedule ends at D)."""
    return point.loss(law, n_params, tokens)


def find_plugin(trainer: Trainer, *, needed_by: str) -> Any:
    """The trainer's ``FPQuantPrecision``, or a clear error naming what needs it."""
    from .precision import FPQuantPrecision  # callbacks and precision are both Lightning glue

    plugin = trainer.precision_plugin
    if not isinstance(plugin, FPQuantPrecision):
        raise ValueError(
            f"{needed_by} needs the FPQuantPrecision plugin, but the trainer's precision plugin is "
            f"{type(plugin).__name__}: use Trainer(plugins=[FPQuantPrecision(recipe=...)], callbacks=[{needed_by}(...)])"
        )
    return plugin
