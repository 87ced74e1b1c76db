"""``QuantizationGap``: what the active precision costs the current weights, measured on held-out data.

Every ``every_n_steps`` optimizer steps it evaluates one fixed held-out batch twice with the
same weights, once quantized as the active recipe says and once unquantized, and logs through
the Trainer's loggers::

    fpq/gap/loss_quantized   fpq/gap/loss_unquantized   fpq/gap/gap  (quantized - unquantized, nats)
    fpq/gap/slope            d log|gap| / d log(tokens) over this stage's measurements (3 or more, one sign)

The scaling law's penalty term grows as D^b / N^a (docs/science.md): how much the precision
changes what the model computes, measured on held-out data as the tokens grow, is what can be
watched at run time, where a smoothed training loss cannot (its noise hides a penalty of a few
hundredths of a nat). The gap is not the law's penalty, which compares two whole runs: weights
trained quantized adapt to the grid, and then the gap is *negative*: its size says how far
the weights have come to rely on the grid (what the demo measured: docs/science.md, "The
quantization gap").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from .. import _config
from .critical import find_plugin
from .tokens import TokenCounter, TokenCountFn, check_count_tokens

LossFn = Callable[[LightningModule, Any], torch.Tensor]

MIN_POINTS_FOR_SLOPE = 3


class QuantizationGap(Callback):
    """Log the loss the active recipe adds to a fixed held-out batch, and its trend in tokens.

    Args:
        loss_fn: ``(module, batch) -> scalar loss tensor`` (e.g.
            ``lambda m, b: F.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())``): a
            LightningModule has no standard method for the loss of a batch, and
            ``validation_step`` logs.
        batch: the held-out batch, on the model's device or movable there by the strategy.
            ``None``: the first batch of the first validation dataloader, kept when validation
            first runs (the sanity check counts), so that every later measurement uses it.
        every_n_steps: measure after each optimizer step whose ``global_step`` is a multiple.
        count_tokens: ``batch -> int`` for the shared TokenCounter (if this callback creates it).

    The measurement runs in eval mode without gradients, inside the precision plugin's forward
    context, and leaves the stochastic-rounding generators as they were: training with this
    callback is bit-identical to training without it. ``history`` holds one
    ``{"step", "tokens", "recipe", "loss_quantized", "loss_unquantized", "gap"}`` per
    measurement and is saved in checkpoints.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        batch: Any = None,
        every_n_steps: int = 100,
        count_tokens: Optional[TokenCountFn] = None,
    ) -> None:
        if not callable(loss_fn):
            raise ValueError(
                f"loss_fn={loss_fn!r} is not valid: expected a callable (module, batch) -> scalar loss tensor"
            )
        self.loss_fn = loss_fn
        self.every_n_steps = _config.integer(every_n_steps, what="every_n_steps", low=1)
        self._count_tokens = check_count_tokens(count_tokens)
        self._batch = batch
        self._counter: Optional[TokenCounter] = None
        self._plugin: Any = None
        self._last_step = -1
        self.history: list[dict[str, Any]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._plugin = find_plugin(trainer, needed_by="QuantizationGap")
        self._counter = TokenCounter.attach(trainer, self._count_tokens, requested_by="QuantizationGap")

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._batch is None and batch_idx == 0 and dataloader_idx == 0:
            self._batch = apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone())

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens = self._counter.observe(trainer, batch)
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._last_step or self._batch is None:
            return
        self._last_step = step  # once per optimizer step under gradient accumulation
        quantized, unquantized = self.measure(trainer, pl_module)
        entry = {
            "step": step,
            "tokens": tokens,
            "recipe": self._plugin.recipe.short_str(),
            "loss_quantized": quantized,
            "loss_unquantized": unquantized,
            "gap": quantized - unquantized,
        }
        self.history.append(entry)
        metrics = {f"fpq/gap/{key}": float(entry[key]) for key in ("loss_quantized", "loss_unquantized", "gap")}
        slope = self.slope()
        if slope is not None:
            metrics["fpq/gap/slope"] = slope
        if trainer.loggers:  # reduced across ranks in measure(): identical everywhere
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, batch_size=1, sync_dist=False)

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[float, float]:
        """(quantized, unquantized) loss of the held-out batch with the current weights, averaged
        over ranks (each rank measures its own batch; the mean runs on the strategy's device)."""
        state = self._plugin.state
        batch = trainer.strategy.batch_to_device(self._batch)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), self._plugin.forward_context(), state.rng_preserved():
                quantized = self.loss_fn(pl_module, batch).detach().float()
                with state.unquantized():
                    unquantized = self.loss_fn(pl_module, batch).detach().float()
        finally:
            pl_module.train(was_training)
        both = torch.stack([quantized.reshape(()), unquantized.reshape(())])
        if trainer.world_size > 1:
            both = trainer.strategy.reduce(both.to(trainer.strategy.root_device), reduce_op="mean")
        q, u = (float(v) for v in both.cpu())
        if not (math.isfinite(q) and math.isfinite(u)):
            rank_zero_warn(
                f"[lightning-fpq] QuantizationGap: the held-out loss is not finite (quantized {q}, unquantized {u})"
            )
        return q, u

    def slope(self) -> Optional[float]:
        """d log|gap| / d log(tokens), least squares over the active stage's measurements
        (``None`` below 3 of them with a non-zero gap, or when the gap changed sign)."""
        if not self.history:
            return None
        recipe = self.history[-1]["recipe"]
        return gap_slope([(h["tokens"], h["gap"]) for h in self.history if h["recipe"] == recipe])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step", -1)


def gap_slope(points: list[tuple[float, float]]) -> Optional[float]:
    """:func:`log_log_slope` of (tokens, |gap|) when every non-zero gap has one sign, else ``None``."""
    nonzero = [(x, y) for x, y in points if y != 0 and math.isfinite(y)]
    if len({y > 0 for _, y in nonzero}) != 1:
        return None
    return log_log_slope([(x, abs(y)) for x, y in nonzero])


def log_log_slope(points: list[tuple[float, float]]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x) over the points with x, y > 0 and finite
    (``None`` when fewer than 3 remain or every x is the same)."""
    logs = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    if len(logs) < MIN_POINTS_FOR_SLOPE:
        return None
    mx = sum(x for x, _ in logs) / len(logs)
    my = sum(y for _, y in logs) / len(logs)
    sxx = sum((x - mx) ** 2 for x, _ in logs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in logs) / sxx
