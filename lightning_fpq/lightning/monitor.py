"""Early warning: how far a run is towards the critical data size of its precision."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from .. import _config
from ..recipe import QuantRecipe
from ..scaling.law import ExtrapolationWarning
from .critical import (
    LawLike,
    LawPoint,
    ScaleGroups,
    check_n_params,
    critical_interval,
    critical_tokens,
    find_plugin,
    predicted_loss,
    resolve_law,
    resolve_n_params,
    scale_group_sizes,
)
from .progressive import ProgressivePrecision
from .tokens import TokenCounter, TokenCountFn, check_count_tokens, global_sum

ACTIONS = ("warn", "stop", "raise-precision")


class CriticalDataMonitor(Callback):
    """Compares the tokens seen with the critical data size D_crit of the active recipe.

    D_crit (arXiv 2501.02423) is the token count past which more data at the current
    precision makes the model worse. How a recipe maps to the law's (E, M, B) is explained
    in :mod:`lightning_fpq.lightning.critical` (the most binding quantized operand).

    Args:
        law: None or "paper" (the paper's constants), "demo-calibration" (fitted to this
            project's CPU sweep of tiny GPTs), a ``CapybaraLaw``, or a law YAML path. ``None``: a
            ``ProgressivePrecision``'s law, else the paper's (one law per run). The paper's
            constants belong to LLaMA on Dolma: refit them for your setup (``lightning-fpq fit``).
        n_params: N for the law: "auto" counts the model's non-embedding parameters.
        thresholds: fractions of D_crit at which to warn, once each per stage.
        action: what to do when the tokens reach D_crit (the fraction 1.0): "warn" only;
            "stop" the run; "raise-precision": move a ``ProgressivePrecision`` callback to its
            next stage (an error at setup if there is none).
        plateau_window: steps over which the smoothed training loss must still fall while a
            low-precision stage is active; 0 (the default) disables this check: on noisy,
            healthy runs a smoothed-loss plateau is no evidence of D_crit. ``QuantizationHealth``
            measures what the precision costs instead.
        plateau_tolerance: the relative decrease over a window below which the loss counts as
            no longer falling (default 0.1%).
        count_tokens: ``batch -> int`` for the shared TokenCounter (if this callback creates it).

    Logs ``fpq/tokens_seen``, ``fpq/d_crit`` with ``fpq/d_crit_low``/``fpq/d_crit_high`` (the
    5-95% interval over the law's bootstrap refits; -1: the law has none), ``fpq/d_crit_fraction``,
    ``fpq/predicted_loss`` (the final loss of a run whose schedule ends at the tokens seen, not
    the loss now) and ``fpq/predicted_penalty`` (its quantization term, the law's counterpart of
    :class:`~lightning_fpq.lightning.gap.QuantizationGap`),
    ``fpq/format_bits`` and ``fpq/calibrated`` (0: the law was not fitted on this recipe's shape,
    or is the paper's) through the Trainer's loggers, and shows the active format (``*``:
    uncalibrated) and the D_crit fraction in the progress bar. Before the first step it warns
    when the planned budget (``max_steps`` x tokens per step) passes D_crit.
    """

    def __init__(
        self,
        law: LawLike = None,
        n_params: Union[str, int] = "auto",
        thresholds: Sequence[float] = (0.5, 0.8, 1.0),
        action: str = "warn",
        *,
        plateau_window: int = 0,
        plateau_tolerance: float = 1e-3,
        count_tokens: Optional[TokenCountFn] = None,
    ) -> None:
        #: the law given explicitly (None: the run's ProgressivePrecision's, else the paper's)
        self.law_given = None if law is None else resolve_law(law)
        self.law = self.law_given or resolve_law(None)
        self.n_params_arg = check_n_params(n_params)
        values = list(thresholds)
        if not values or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 for t in values):
            raise ValueError(
                f"thresholds={thresholds!r} is not valid: expected positive fractions of D_crit, e.g. (0.5, 0.8, 1.0)"
            )
        self.thresholds = tuple(sorted(float(t) for t in values))
        self.action = _config.choice(action, ACTIONS, what="action")
        self.plateau_window = _config.integer(plateau_window, what="plateau_window", low=0)  # 0 disables the check
        self.plateau_tolerance = _config.number(
            plateau_tolerance, what="plateau_tolerance", low=0.0, high=1.0, high_open=True
        )
        self._count_tokens = check_count_tokens(count_tokens)
        self.n_params: Optional[int] = None
        self.d_crit = math.inf
        #: the 5-95% interval of D_crit over the law's bootstrap refits (None: the law has none)
        self.d_crit_interval: Optional[tuple[float, float]] = None
        self.point: Optional[LawPoint] = None
        self._groups: ScaleGroups = {}  # elements per channel/tensor scale, counted at the first batch
        self.warned: list[str] = []  # "<format>@<threshold>" once each
        self._loss_ema: Optional[float] = None
        self._ema_history: list[float] = []
        self._plateau_warned: list[str] = []
        self._acted_on: list[str] = []
        self._counter: Optional[TokenCounter] = None
        self._budget_checked = False
        self._plugin: Any = None
        self._progressive: Optional[ProgressivePrecision] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(thresholds=self.thresholds, action=self.action)

    # ---------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._plugin = find_plugin(trainer, needed_by="CriticalDataMonitor")
        self._counter = TokenCounter.attach(trainer, self._count_tokens, requested_by="CriticalDataMonitor")
        progressive = [c for c in trainer.callbacks if isinstance(c, ProgressivePrecision)]
        if self.action == "raise-precision" and not progressive:
            raise ValueError(
                "CriticalDataMonitor(action='raise-precision') needs a ProgressivePrecision callback to raise the "
                "precision with: add ProgressivePrecision([...]) to the Trainer's callbacks, or use action='warn' or 'stop'"
            )
        self._progressive = progressive[0] if progressive else None
        if self.law_given is None and self._progressive is not None and self._progressive.law_given is not None:
            self.law = self._progressive.law_given  # one law per run
        self.n_params = resolve_n_params(self.n_params_arg, pl_module)
        for warning in self.law.extrapolation(N=self.n_params):  # the model lies outside the fitted range
            rank_zero_warn(f"[lightning-fpq] {warning}: the law's predictions for this model are extrapolated")
        self._on_switch(None, self._plugin.recipe)
        self._plugin.state.subscribe(self._on_switch)  # a precision switch changes D_crit
        self._wrap_progress_bar(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._plugin is not None:
            self._plugin.state.unsubscribe(self._on_switch)

    def _on_switch(self, old: Optional[QuantRecipe], new: QuantRecipe) -> None:
        """D_crit of the recipe now active (the quantization state's switch event); said in the
        log when it changed (a recount of the scale groups often changes nothing)."""
        before = (self.d_crit, self.point)
        self.d_crit, self.point = critical_tokens(new, self.law, self.n_params, self._groups)
        self.d_crit_interval = critical_interval(new, self.law, self.n_params, self._groups)
        if math.isfinite(self.d_crit) and (self.d_crit, self.point) != before:
            rank_zero_info(
                f"[lightning-fpq] D_crit = {self.d_crit_text()} tokens for {self.point.short_str()} "
                f"(N = {self.n_params:,}; law: {self.law.short_str()}{'' if self.law_calibrated else ', uncalibrated: the paper constants'})"
            )

    def d_crit_text(self) -> str:
        """D_crit with its bootstrap interval when the law has one, e.g. ``4.1e+06 (90%: 1.8e+06-3.7e+08)``."""
        if self.d_crit_interval is None:
            return f"{self.d_crit:.3g}"
        low, high = self.d_crit_interval
        return f"{self.d_crit:.3g} (90%: {low:.2g}-{high:.2g})"

    def _predicted_loss(self, tokens: int) -> float:
        # early tokens lie below the law's fitted D range every run: said once at setup, not every step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExtrapolationWarning)
            return predicted_loss(self.point, self.law, self.n_params, tokens)

    @property
    def law_calibrated(self) -> bool:
        """Whether the law was fitted to runs (the paper's constants belong to another model
        family, data set and batch size: their predictions here are uncalibrated)."""
        return self.law.provenance.source != "paper"

    def warn_about_the_budget(self, trainer: Trainer, tokens_per_step: int) -> None:
        """Before training: compare the planned token budget (``max_steps`` x tokens per step)
        with D_crit, and warn when the run is planned past it."""
        if trainer.max_steps is None or trainer.max_steps < 0 or not math.isfinite(self.d_crit):
            return
        budget = trainer.max_steps * tokens_per_step
        if budget > self.d_crit:
            rank_zero_warn(
                f"[lightning-fpq] the run is planned for {budget:,} tokens ({trainer.max_steps} steps x "
                f"{tokens_per_step:,}), {budget / self.d_crit:.1f}x D_crit = {self.d_crit:.3g} "
                f"tokens for {self.point.short_str()}: past D_crit the law predicts a worse model at this precision; "
                "plan a switch (ProgressivePrecision) or a wider format",
                category=UserWarning,
            )

    @property
    def tokens_seen(self) -> int:
        """Training tokens counted so far by the trainer's shared TokenCounter (0 before setup)."""
        return self._counter.tokens_seen if self._counter else 0

    @property
    def fraction(self) -> float:
        return 0.0 if not math.isfinite(self.d_crit) else self.tokens_seen / self.d_crit

    # ---------------------------------------------------------------------- hooks
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._budget_checked:
            self._budget_checked = True  # once, before the first step
            local = int(self._counter.count_tokens(batch))
            # the elements per channel/tensor scale depend on the batch: count them now, then D_crit again
            self._groups = scale_group_sizes(pl_module, local)
            if self._groups and self.law.provenance.source != "paper":
                self._on_switch(None, self._plugin.recipe)
            per_step = global_sum(trainer, local) * trainer.accumulate_grad_batches
            self.warn_about_the_budget(trainer, per_step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens = self._counter.observe(trainer, batch)  # counted once, whichever hook runs first
        fraction = self.fraction
        metrics = {
            "fpq/tokens_seen": float(tokens),
            "fpq/d_crit": self.d_crit if math.isfinite(self.d_crit) else -1.0,
            "fpq/d_crit_fraction": fraction,
            # the final loss of a run whose schedule ends at this token count, not the loss now
            "fpq/predicted_loss": self._predicted_loss(tokens),
            "fpq/predicted_penalty": self.point.penalty(self.law, self.n_params, max(tokens, 1)),
            "fpq/d_crit_low": self.d_crit_interval[0] if self.d_crit_interval else -1.0,
            "fpq/d_crit_high": self.d_crit_interval[1] if self.d_crit_interval else -1.0,
            "fpq/format_bits": float(self.point.fmt.bits if self.point.fmt else 16),
            "fpq/calibrated": float(self.point.calibrated and self.law_calibrated),
        }
        if trainer.loggers:  # the values are identical on every rank: no sync needed
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, batch_size=1, sync_dist=False)
        self._check_thresholds(trainer, tokens, fraction)
        self._counter.watch("CriticalDataMonitor", self._next_decision())
        self._check_plateau(outputs)

    def _next_decision(self) -> Optional[float]:
        """The token count of this monitor's next warning or action (``None``: none left)."""
        if not math.isfinite(self.d_crit):
            return None
        name = self.point.short_str()
        pending = [t for t in self.thresholds if f"{name}@{t:g}" not in self.warned]
        if self.action != "warn" and name not in self._acted_on:
            pending.append(1.0)
        return min(pending) * self.d_crit if pending else None

    def _check_thresholds(self, trainer: Trainer, tokens: int, fraction: float) -> None:
        name = self.point.short_str()
        for threshold in self.thresholds:
            key = f"{name}@{threshold:g}"
            if fraction < threshold or key in self.warned:
                continue
            self.warned.append(key)
            rank_zero_warn(
                f"[lightning-fpq] {tokens:,} tokens = {fraction:.0%} of the critical data size "
                f"D_crit = {self.d_crit_text()} tokens for {name} (N = {self.n_params:,}; law: "
                f"{type(self.law).__name__}, {self.law.provenance.short_str()}). " + self._advice(threshold),
                category=UserWarning,
            )
        if fraction >= 1.0 and name not in self._acted_on:
            self._acted_on.append(name)
            if self.action == "stop":
                trainer.should_stop = True
            elif self.action == "raise-precision" and self._progressive is not None:
                self._progressive.advance(trainer, reason=f"D_crit reached ({fraction:.0%})")

    def _advice(self, threshold: float) -> str:
        if threshold < 1.0:
            return (
                "Past D_crit more tokens at this precision raise the loss: plan a switch to a wider format "
                "(ProgressivePrecision) before then."
            )
        return {
            "warn": "More tokens at this precision are predicted to make the model worse: raise the precision now "
            "(ProgressivePrecision, or CriticalDataMonitor(action='raise-precision')).",
            "stop": "Stopping the run (action='stop'). Its learning-rate schedule did not end here, so its loss is "
            "above the law's, which describes runs annealed to D: to compare, train a run whose schedule ends at "
            "this token count.",
            "raise-precision": "Raising the precision (action='raise-precision').",
        }[self.action]

    def _check_plateau(self, outputs: Any) -> None:
        """Empirical check beside the law: the smoothed loss stopped falling at low precision."""
        if not self.plateau_window or self.point is None or self.point.fmt is None or self.point.fmt.bits >= 16:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
        if not math.isfinite(value):
            return
        alpha = 2.0 / (self.plateau_window + 1)  # EMA span = window
        self._loss_ema = value if self._loss_ema is None else (1 - alpha) * self._loss_ema + alpha * value
        self._ema_history.append(self._loss_ema)
        if len(self._ema_history) <= 2 * self.plateau_window:
            return  # let the EMA settle for one window, then compare across a full window
        self._ema_history = self._ema_history[-(self.plateau_window + 1) :]
        before, now = self._ema_history[0], self._ema_history[-1]
        name = self.point.short_str()
        if now > before * (1 - self.plateau_tolerance) and name not in self._plateau_warned:
            self._plateau_warned.append(name)
            rank_zero_warn(
                f"[lightning-fpq] the smoothed training loss stopped falling at {name} "
                f"({before:.4f} -> {now:.4f} over {self.plateau_window} steps, {self.fraction:.0%} of the law's D_crit). "
                "The scaling law predicts this past the critical data size: raise the precision "
                "(ProgressivePrecision), or refit the law to your runs (lightning-fpq fit) if this comes early.",
                category=UserWarning,
            )

    # ------------------------------------------------------------- progress bar
    def _wrap_progress_bar(self, trainer: Trainer) -> None:
        """Add the active format and D_crit fraction to the progress bar's metrics.

        Loggers take numbers only; the bar can show text. Lightning's bars build their
        postfix from ``get_metrics``, so we extend that one bound method of this trainer's
        bar (never the class, never another trainer's).
        """
        bar = trainer.progress_bar_callback
        if bar is None or getattr(bar, "_fpq_wrapped", False):
            return
        original = bar.get_metrics

        def get_metrics(trainer_: Trainer, pl_module: LightningModule) -> dict[str, Any]:
            items = dict(original(trainer_, pl_module))
            if self.point is not None:
                fmt = self.point.fmt.name if self.point.fmt else "bf16"
                items["fmt"] = fmt if self.point.calibrated and self.law_calibrated else f"{fmt}*"  # * uncalibrated
                items["D/Dcrit"] = f"{self.fraction:.1%}" if math.isfinite(self.d_crit) else "-"
            return items

        bar.get_metrics = get_metrics  # type: ignore[method-assign]
        bar._fpq_wrapped = True

    # ----------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "warned": list(self.warned),
            "plateau_warned": list(self._plateau_warned),
            "acted_on": list(self._acted_on),
            "loss_ema": self._loss_ema,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = list(state_dict.get("warned", []))
        self._plateau_warned = list(state_dict.get("plateau_warned", []))
        self._acted_on = list(state_dict.get("acted_on", []))
        self._loss_ema = state_dict.get("loss_ema")
