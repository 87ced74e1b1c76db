"""What the law predicts for the demo's runs, each with its 5-95% band over the law's bootstrap refits."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..lightning.critical import INTERVAL, ScaleGroups, law_point, scale_group_sizes
from ..recipe import QuantRecipe
from ..scaling.capybara import CapybaraLaw
from ..scaling.law import ExtrapolationWarning


@dataclass(frozen=True)
class Band:
    """A prediction and its interval (``low``/``high`` equal ``mid`` when the law has no refits)."""

    mid: float
    low: float
    high: float

    def text(self, fmt: str = ".3f") -> str:
        if self.low == self.mid == self.high:
            return f"{self.mid:{fmt}} (no interval: the law has no bootstrap refits)"
        return f"{self.mid:{fmt}} (90%: {self.low:{fmt}}-{self.high:{fmt}})"


class Predictor:
    """The law's loss, penalty and D_crit for one recipe at the demo's N, with intervals."""

    def __init__(
        self, law: CapybaraLaw, n_params: int, recipe: QuantRecipe, groups: Optional[ScaleGroups] = None
    ) -> None:
        self.law, self.n_params, self.recipe, self.groups = law, n_params, recipe, groups
        self.refits = law.resampled()
        self.point = law_point(recipe, law, n_params, groups)

    def _each(self, value) -> Band:
        """``value(law, point)`` for the law and for every refit (NaN-safe percentiles)."""
        with warnings.catch_warnings():  # the range is said once by the demo, not per point
            warnings.simplefilter("ignore", ExtrapolationWarning)
            mid = float(value(self.law, self.point))
            samples = [
                float(value(refit, law_point(self.recipe, refit, self.n_params, self.groups))) for refit in self.refits
            ]
        finite = [s for s in samples if math.isfinite(s)]
        if not finite:
            return Band(mid, mid, mid)
        low, high = np.percentile(finite, INTERVAL)
        return Band(mid, float(low), float(high))

    def loss(self, tokens: float) -> Band:
        """Final loss (nats/token) of a run annealed to ``tokens`` tokens."""
        return self._each(lambda law, point: point.loss(law, self.n_params, tokens))

    def penalty(self, tokens: float) -> Band:
        """The quantization term of that loss (0 when nothing is quantized)."""
        return self._each(lambda law, point: point.penalty(law, self.n_params, tokens))

    def d_crit(self) -> Optional[Band]:
        """D_crit in tokens (``None``: nothing quantized)."""
        if self.point.fmt is None:
            return None
        return self._each(lambda law, point: point.critical_data_size(law, self.n_params))

    @property
    def label(self) -> str:
        return self.point.short_str()


def recipe_for(cfg: Any, fmt: str) -> QuantRecipe:
    """The recipe the demo trains ``fmt`` with (as the runs build it)."""
    return QuantRecipe.from_name(cfg.recipe, block_size=cfg.block).with_format(fmt, block_size=cfg.block)


def predictor_for(cfg: Any, law: CapybaraLaw, n_params: int, fmt: str) -> Predictor:
    """The law's predictions for the demo's run of ``fmt``, with the elements per channel or
    tensor scale counted in the demo's model and batch, as its ``CriticalDataMonitor`` counts them."""
    recipe = recipe_for(cfg, fmt)
    groups = None
    if any(op is not None and not isinstance(op.block_size, int) for op in recipe.default.operands):
        from ..lightning.precision import FPQuantPrecision
        from .model import GPTConfig, GPTLightning

        config = dataclasses.asdict(dataclasses.replace(GPTConfig.from_name(cfg.model), block_size=cfg.block_size))
        model = GPTLightning(config)
        FPQuantPrecision(recipe=recipe).convert_module(model)
        groups = scale_group_sizes(model, cfg.tokens_per_step)
    return Predictor(law, n_params, recipe, groups)


def curve(predict, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``predict(D) -> Band`` over ``tokens``: (mid, low, high) arrays for a plot."""
    bands = [predict(float(d)) for d in tokens]
    return tuple(np.array([getattr(b, k) for b in bands]) for k in ("mid", "low", "high"))  # type: ignore[return-value]
