"""Progressive precision: train early in an aggressive format, raise it as data grows.

The paper's recommendation (arXiv 2501.02423, section 4): low precision converges fast
while the "knowledge intensity" D^b/N^a is small; as it grows the quantization penalty
grows with it, so the precision should rise (FP4 -> FP8 -> BF16).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from .. import _config
from ..formats import FPFormat
from ..recipe import QuantRecipe
from ..scaling.capybara import CapybaraLaw
from .critical import LawLike, LawPoint, check_n_params, critical_tokens, find_plugin, resolve_law, resolve_n_params
from .tokens import TokenCounter, TokenCountFn, check_count_tokens, global_sum

StageLike = Union[str, FPFormat, QuantRecipe]
UNITS = ("tokens", "budget", "dcrit")
UNQUANTIZED_BITS = 16  # an unquantized stage computes in bf16


def auto_switch_tokens(
    law: Any, n_params: int, current: LawPoint, nxt: LawPoint, current_bits: int, next_bits: int
) -> float:
    """Token count at which the next stage starts to pay off better per FLOP (the "auto" rule).

    With the paper's compute model C = (6/16) P N D, a token at P bits costs P units, so the
    rule saves compute only where the stage's GEMMs really run at P bits. The current stage is
    worth keeping while its loss decrease per unit of compute, ``-dL_c/dD / P_c``, beats the
    next stage's. With the law's ``-dL/dD = b d D^(-b-1) (1 - (D/D_crit)^(2b))`` the two are
    equal at the closed form (docs/science.md section 4)::

        D_switch = D_crit,c * [(P_n - P_c) / (P_n - r P_c)]^(1/(2b)),  r = (D_crit,c / D_crit,n)^(2b)

    It lies before D_crit,c when the next stage's D_crit is larger (r < 1), after it when the
    next stage's is smaller; when ``P_n - r P_c <= 0`` the next stage never pays off better
    (inf). Returns inf when nothing is quantized now.
    """
    d_cur = current.critical_data_size(law, n_params)
    if not math.isfinite(d_cur) or next_bits <= current_bits:
        return math.inf
    r = (d_cur / nxt.critical_data_size(law, n_params)) ** (2 * law.b)
    denominator = next_bits - r * current_bits
    if denominator <= 0:
        return math.inf
    return d_cur * ((next_bits - current_bits) / denominator) ** (1 / (2 * law.b))


class ProgressivePrecision(Callback):
    """Raise the training precision along a schedule, e.g. ``["e2m1", "e4m3", "bf16"]``.

    Args:
        schedule: the stages, lowest precision first. A format ("e2m1", an ``FPFormat``)
            re-parameterises the plugin's recipe (``QuantRecipe.with_format``; "bf16" turns
            quantization off); a ``QuantRecipe`` or a recipe YAML path is used as it is.
        switch_at: where each stage ends (one value per switch, ``len(schedule) - 1``), in
            ``unit``; or ``"auto"``: derived from the law, see ``auto_switch_tokens`` — switch
            when the next stage buys more loss reduction per FLOP than the current one.
        unit: "tokens" (token counts), "budget" (fractions of the run's token budget:
            ``token_budget``, or ``max_steps`` x the tokens of the first batch), or "dcrit"
            (fractions of each stage's own critical data size, from the law).
        law, n_params: the scaling law and N for "auto" and "dcrit" (see CriticalDataMonitor).
        block_size: block size given to format stages (default: the recipe's own).
        token_budget: the run's tokens, for ``unit="budget"``.
        allow_decreasing: accept a schedule whose precision does not rise.
        count_tokens: ``batch -> int`` for the shared TokenCounter (if this callback creates it).

    Switches happen at an optimizer-step boundary (``on_train_batch_start`` of the first batch of
    a gradient-accumulation window), from the token count summed over all ranks, so every rank
    switches at the same step and every micro-batch of one optimizer step has one precision.
    Schedule, stage and history are saved in checkpoints; a resumed run continues in the same
    stage, and a resume with another schedule is refused.
    """

    def __init__(
        self,
        schedule: Sequence[StageLike] = ("e2m1", "e4m3", "bf16"),
        switch_at: Union[str, Sequence[float]] = "auto",
        *,
        unit: str = "tokens",
        law: LawLike = None,
        n_params: Union[str, int] = "auto",
        block_size: Union[None, int, str] = None,
        token_budget: Optional[int] = None,
        allow_decreasing: bool = False,
        count_tokens: Optional[TokenCountFn] = None,
    ) -> None:
        if isinstance(schedule, (str, FPFormat, QuantRecipe)) or not len(schedule):
            raise ValueError(
                f"schedule={schedule!r} is not valid: expected a non-empty list of formats or recipes, e.g. ['e2m1', 'e4m3', 'bf16']"
            )
        self._entries = [self._check_entry(entry) for entry in schedule]
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r} is not valid: expected one of {UNITS}")
        self.unit = unit
        self.switch_at = self._check_switch_at(switch_at, unit, len(self._entries))
        if token_budget is not None and (
            isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget <= 0
        ):
            raise ValueError(f"token_budget={token_budget!r} is not valid: expected a positive int or None")
        self.token_budget = token_budget
        bits = [self._entry_bits(entry) for entry in self._entries]
        if not allow_decreasing and any(b2 <= b1 for b1, b2 in zip(bits, bits[1:])):
            names = [self._entry_name(e) for e in self._entries]
            raise ValueError(
                f"schedule {names} does not rise in precision (bits {bits}): order the stages lowest "
                "precision first, e.g. ['e2m1', 'e4m3', 'bf16'], or pass allow_decreasing=True"
            )
        self._law_arg, self._n_params_arg = law, check_n_params(n_params)
        # a bad law is an error now, not at the first batch; None: the monitor's law, else the paper's
        self.law_given = None if law is None else resolve_law(law)
        if block_size is not None:
            _config.block_size(block_size, what="ProgressivePrecision block_size")
        self.block_size = block_size
        self._count_tokens = check_count_tokens(count_tokens)
        self.stage = 0
        self._requested: list[str] = []  # reasons of switches asked for, applied at the next step boundary
        self.history: list[dict[str, Any]] = []
        self.stages: list[QuantRecipe] = []
        self.thresholds: list[float] = []  # token count ending each stage, once resolved
        self._counter: Optional[TokenCounter] = None
        self._plugin: Any = None

    # ----------------------------------------------------------------- validation
    @staticmethod
    def _check_entry(entry: StageLike) -> Union[FPFormat, QuantRecipe]:
        if isinstance(entry, QuantRecipe):
            return entry
        if isinstance(entry, os.PathLike) or (
            isinstance(entry, str) and entry.strip().lower().endswith((".yaml", ".yml"))
        ):
            return QuantRecipe.from_yaml(entry)
        try:
            return FPFormat.parse(entry)
        except ValueError as err:
            raise ValueError(
                f"schedule entry {entry!r} is not valid: expected a format, a QuantRecipe or a recipe YAML path ({err})"
            ) from None

    @staticmethod
    def _entry_bits(entry: Union[FPFormat, QuantRecipe]) -> int:
        if isinstance(entry, FPFormat):
            return entry.bits
        return entry.fmt.bits if entry.quantizes_anything else UNQUANTIZED_BITS

    @staticmethod
    def _entry_name(entry: Union[FPFormat, QuantRecipe]) -> str:
        return entry.name if isinstance(entry, FPFormat) else entry.short_str()

    @staticmethod
    def _check_switch_at(switch_at: Any, unit: str, n_stages: int) -> Union[str, list[float]]:
        if isinstance(switch_at, str):
            if switch_at != "auto":
                raise ValueError(
                    f"switch_at={switch_at!r} is not valid: expected 'auto' or a list of {n_stages - 1} numbers"
                )
            return switch_at
        values = list(switch_at)
        if len(values) != n_stages - 1:
            raise ValueError(
                f"switch_at has {len(values)} values for {n_stages} stages: expected {n_stages - 1} (one per switch)"
            )
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values):
            raise ValueError(f"switch_at={values!r} is not valid: expected positive numbers")
        if unit == "tokens" and any(v < 1 for v in values):
            raise ValueError(
                f"switch_at={values!r} with unit='tokens' must be token counts >= 1; for fractions use unit='budget' or unit='dcrit'"
            )
        if unit == "budget" and any(v > 1 for v in values):
            raise ValueError(f"switch_at={values!r} with unit='budget' must be fractions of the token budget in (0, 1]")
        if unit != "dcrit" and any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"switch_at={values!r} must increase: each stage ends after the one before it")
        return [float(v) for v in values]

    # ------------------------------------------------------------------- resolve
    @property
    @override
    def state_key(self) -> str:
        # one schedule per trainer; the saved state names its schedule, checked on resume
        return "ProgressivePrecision"

    @property
    def schedule_names(self) -> list[str]:
        return [self._entry_name(e) for e in self._entries]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._plugin = find_plugin(trainer, needed_by="ProgressivePrecision")
        self._counter = TokenCounter.attach(trainer, self._count_tokens, requested_by="ProgressivePrecision")
        self.law = self._shared_law(trainer)
        base = self._plugin.recipe
        self.stages = [
            entry if isinstance(entry, QuantRecipe) else base.with_format(entry, block_size=self.block_size)
            for entry in self._entries
        ]

    def _shared_law(self, trainer: Trainer) -> CapybaraLaw:
        """One law per run: this callback's, else a ``CriticalDataMonitor``'s, else the paper's;
        two different laws given explicitly are a warning naming both."""
        from .monitor import CriticalDataMonitor  # the monitor module imports this one

        monitor = next((c for c in trainer.callbacks if isinstance(c, CriticalDataMonitor)), None)
        if self.law_given is None:
            return monitor.law if monitor is not None else CapybaraLaw.paper()
        if monitor is not None and monitor.law_given is not None and monitor.law_given != self.law_given:
            rank_zero_warn(
                f"ProgressivePrecision uses law {self.law_given.short_str()} and CriticalDataMonitor "
                f"{monitor.law_given.short_str()}: their switch points and warnings disagree; give one law to both"
            )
        return self.law_given

    def _resolve_thresholds(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> list[float]:
        if self.switch_at == "auto" or self.unit == "dcrit":
            law = self.law
            n_params = resolve_n_params(self._n_params_arg, pl_module)
            points = [critical_tokens(recipe, law, n_params) for recipe in self.stages]
            falling = [(a[1].short_str(), b[1].short_str()) for a, b in zip(points, points[1:]) if b[0] < a[0]]
            if falling:
                rank_zero_warn(
                    f"ProgressivePrecision: D_crit falls from one stage to the next ({falling}): the later stage "
                    "stops paying off sooner; with switch_at='auto' a switch may come after the current D_crit"
                )
            if self.switch_at == "auto":
                bits = [self._entry_bits(r) for r in self.stages]
                return [
                    auto_switch_tokens(law, n_params, points[i][1], points[i + 1][1], bits[i], bits[i + 1])
                    for i in range(len(self.stages) - 1)
                ]
            return [fraction * points[i][0] for i, fraction in enumerate(self.switch_at)]
        if self.unit == "tokens":
            return list(self.switch_at)
        budget = self.token_budget
        if budget is None:
            if trainer.max_steps is None or trainer.max_steps < 0:
                raise ValueError(
                    "ProgressivePrecision(unit='budget') needs the run's token budget: pass token_budget=<tokens> "
                    "or set Trainer(max_steps=...)"
                )
            batch_tokens = global_sum(trainer, self._counter.count_tokens(batch))  # the first batch, all ranks
            budget = trainer.max_steps * trainer.accumulate_grad_batches * batch_tokens
        return [fraction * budget for fraction in self.switch_at]

    # --------------------------------------------------------------------- hooks
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After any checkpoint restore: make the plugin run this callback's stage (a no-op when the
        # restored recipe is that stage's already)
        self._plugin.set_recipe(self.stages[self.stage])

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.thresholds:
            self.thresholds = self._resolve_thresholds(trainer, pl_module, batch)
        if batch_idx % trainer.accumulate_grad_batches != 0:
            return  # inside a gradient-accumulation window: one optimizer step, one precision
        while self._requested:
            self._switch(trainer, self._requested.pop(0))
        tokens = self._counter.tokens_seen
        while self.stage < len(self.stages) - 1 and tokens >= self.thresholds[self.stage]:
            self._switch(
                trainer,
                f"{self.unit if self.switch_at != 'auto' else 'auto'} threshold {self.thresholds[self.stage]:.4g} tokens",
            )
        last = self.stage >= len(self.stages) - 1
        self._counter.watch("ProgressivePrecision", None if last else self.thresholds[self.stage])

    def advance(self, trainer: Trainer, *, reason: str) -> bool:
        """Ask for the next stage: it starts at the next optimizer-step boundary (the next batch,
        without gradient accumulation). False when the last stage is already active or asked for."""
        if self.stage + len(self._requested) >= len(self.stages) - 1:
            return False
        self._requested.append(reason)
        return True

    def _switch(self, trainer: Trainer, reason: str) -> None:
        old, new = self.stages[self.stage], self.stages[self.stage + 1]
        self._plugin.set_recipe(new)
        self.stage += 1
        record = {
            "step": trainer.global_step,
            "tokens": self._counter.tokens_seen if self._counter else 0,
            "from": old.short_str(),
            "to": new.short_str(),
            "reason": reason,
        }
        self.history.append(record)
        rank_zero_info(
            f"[lightning-fpq] step {record['step']}, {record['tokens']:,} tokens: precision {old.fmt.name} -> "
            f"{new.fmt.name if new.quantizes_anything else 'bf16 (unquantized)'} ({reason})"
        )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.loggers:
            pl_module.log("fpq/stage", float(self.stage), on_step=True, on_epoch=False, logger=True, batch_size=1)

    # ----------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule_names,
            "stage": self.stage,
            "requested": list(self._requested),
            "history": list(self.history),
            "thresholds": list(self.thresholds),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("schedule")
        if saved is not None and list(saved) != self.schedule_names:
            raise ValueError(
                f"ProgressivePrecision: the checkpoint was trained with schedule {list(saved)} (in stage "
                f"{state_dict['stage']}), this run gives {self.schedule_names}: its stage index would mean another "
                "precision; resume with the same schedule, or start a new run"
            )
        self.stage = int(state_dict["stage"])
        self._requested = list(state_dict.get("requested", []))
        self.history = list(state_dict.get("history", []))
        self.thresholds = [float(t) for t in state_dict.get("thresholds", [])]
