"""The critical data size of the recipe a run is training with.

How a recipe maps onto the law's single (E, M, B): a recipe quantizes up to six operands,
each with its own format and block size, while the law (arXiv 2501.02423) was fitted on
runs that quantize P2, P4 and P6 identically. We evaluate D_crit for every quantized
operand of the recipe's default layer spec and take the **smallest**: the most binding
operand decides when the precision stops paying off. For the ``paper`` recipe (P2/P4/P6 in
one format) this is exactly the law's setting. Per-layer rules that override a few layers
are not counted: the default spec covers most of the compute. Operands without scaling
(block size None) are evaluated as ``"tensor"`` (one scale per tensor, the law's closest
granularity). Nothing quantized (``bf16``): D_crit is infinite.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning.pytorch import LightningModule, Trainer

from ..formats import FPFormat
from ..recipe import QuantRecipe
from ..scaling.capybara import CapybaraLaw
from ..scaling.law import load_law
from ..scaling.params import count_params

LawLike = Union[None, str, os.PathLike, CapybaraLaw]


NAMED_LAWS = ("paper", "demo-calibration")


def named_law_path(name: str) -> str:
    """The YAML shipped in ``lightning_fpq/scaling/calibrations/`` for a named law (``"demo-calibration"``)."""
    from importlib.resources import files

    path = files("lightning_fpq.scaling") / "calibrations" / f"{name.replace('-', '_')}.yaml"
    if not path.is_file():
        raise ValueError(f"law {name!r} is not shipped with this installation (no {path})")
    return str(path)


def resolve_law(law: LawLike) -> CapybaraLaw:
    """None or "paper" -> the paper's constants; "demo-calibration" -> the law fitted to this
    project's own CPU sweep (examples/calibration/); a ``CapybaraLaw``; or a YAML file saved
    by ``law.save``."""
    if law is None or law == "paper":
        return CapybaraLaw.paper()
    if law == "demo-calibration":
        law = named_law_path(law)
    if isinstance(law, (str, os.PathLike)):
        if not os.path.isfile(law):
            raise ValueError(
                f"law={os.fspath(law)!r} is neither a named law {list(NAMED_LAWS)} nor an existing law YAML file "
                "(written by CapybaraLaw.save or lightning-fpq fit --out)"
            )
        law = load_law(law)
    if not isinstance(law, CapybaraLaw):
        raise ValueError(
            f"law={law!r} is not valid: expected None, one of {NAMED_LAWS}, a CapybaraLaw or the path "
            "of a YAML file written by CapybaraLaw.save (KumarLaw/ChinchillaLaw have no critical data size)"
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
    """The (format, block size) the law is asked about for a recipe, and why."""

    fmt: Optional[FPFormat]  # None: nothing quantized
    block_size: Union[int, str]
    operand: str  # "P2", ..., or "-" when nothing is quantized

    def short_str(self) -> str:
        return "unquantized" if self.fmt is None else f"{self.fmt.name} B={self.block_size} ({self.operand})"


def law_point(recipe: QuantRecipe, law: CapybaraLaw, n_params: int) -> LawPoint:
    """The operand of ``recipe`` with the smallest D_crit (see the module docstring)."""
    best, best_d = LawPoint(None, "tensor", "-"), math.inf
    for index, spec in enumerate(recipe.default.operands):
        if spec is None:
            continue
        block = "tensor" if spec.block_size is None else spec.block_size
        d_crit = float(law.critical_data_size(n_params, spec.fmt, block))
        if d_crit < best_d:
            best, best_d = LawPoint(spec.fmt, block, f"P{index + 1}"), d_crit
    return best


def critical_tokens(recipe: QuantRecipe, law: CapybaraLaw, n_params: int) -> tuple[float, LawPoint]:
    """(D_crit in tokens, the law point) for ``recipe``; D_crit is inf when nothing is quantized."""
    point = law_point(recipe, law, n_params)
    if point.fmt is None:
        return math.inf, point
    return float(law.critical_data_size(n_params, point.fmt, point.block_size)), point


def predicted_loss(point: LawPoint, law: CapybaraLaw, n_params: int, tokens: float) -> float:
    """The law's loss (nats/token) after ``tokens`` tokens at ``point``."""
    return float(law.loss(n_params, max(tokens, 1.0), point.fmt, point.block_size))


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
