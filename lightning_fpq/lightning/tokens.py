"""The one source of truth for the number of training tokens seen.

``TokenCounter`` counts each training batch once, sums the count over all ranks, and lives
in checkpoints. ``CriticalDataMonitor`` and ``ProgressivePrecision`` read it; when the user
did not add one, the first of them to be set up attaches one to the trainer, so there is
never more than one count.

The default counting rule (``count_batch_tokens``), override it with ``count_tokens=``:

- a tensor batch: its number of elements (a ``(B, T)`` batch of token ids is B*T tokens);
- a tuple or list: the first element, counted by these rules (``(x, y)`` counts ``x``);
- a dict: the first of the keys ``input_ids``, ``tokens``, ``idx``, ``x``, ``inputs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from .. import _config

TOKEN_KEYS = ("input_ids", "tokens", "idx", "x", "inputs")
TokenCountFn = Callable[[Any], int]


def count_batch_tokens(batch: Any) -> int:
    """Tokens in one batch by the default rule (see the module docstring)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (tuple, list)) and batch:
        return count_batch_tokens(batch[0])
    if isinstance(batch, dict):
        for key in TOKEN_KEYS:
            if key in batch:
                return count_batch_tokens(batch[key])
        raise ValueError(
            f"cannot count tokens in a dict batch with keys {sorted(batch)}: expected one of "
            f"{TOKEN_KEYS}, or pass count_tokens=<function batch -> int> to the callback"
        )
    raise ValueError(
        f"cannot count tokens in a batch of type {type(batch).__name__}: expected a tensor, a "
        "tuple/list whose first item holds the token ids, or a dict; or pass count_tokens=<function>"
    )


class TokenCounter(Callback):
    """Counts training tokens, summed over all ranks; saved in and restored from checkpoints.

    On one process the count is exact after every batch and costs nothing. With several ranks,
    each rank counts its own batches and the global sum is taken with one all-reduce on the
    strategy's root device (NCCL reduces CUDA tensors only), when a decision needs it: at every
    step while the count may reach a token target a callback watches (:meth:`watch`: a switch
    threshold, a D_crit warning), at least every ``sync_every`` steps otherwise, and before a
    checkpoint is written and when training ends. Between syncs, :attr:`tokens_seen` is the count of the last sync.
    The projection that decides when a target is near assumes the global tokens per step of
    the last interval; with batches that grow between syncs a decision can come up to
    ``sync_every`` steps late.

    Args:
        count_tokens: ``batch -> int``, the tokens of one batch on this rank. Default:
            ``count_batch_tokens``.
        sync_every: the most steps between two all-reduces when no target is near (several ranks only).
    """

    def __init__(self, count_tokens: Optional[TokenCountFn] = None, *, sync_every: int = 50) -> None:
        self.count_tokens = check_count_tokens(count_tokens) or count_batch_tokens
        self.sync_every = _config.integer(sync_every, what="sync_every", low=1)
        self._chosen_by = "TokenCounter" if count_tokens is not None else None  # who set count_tokens
        self.tokens_seen = 0  # global, as of the last sync
        self._pending = 0  # this rank's tokens since the last sync
        self._steps_since_sync = 0
        self._rate = 0.0  # global tokens per step over the last sync interval
        self._targets: dict[str, float] = {}  # watcher -> the token count its next decision is at
        self._counted_batch = -1  # index of the last batch counted (idempotent observe)

    @property
    @override
    def state_key(self) -> str:
        return "TokenCounter"  # one counter per trainer

    @staticmethod
    def attach(
        trainer: Trainer, count_tokens: Optional[TokenCountFn] = None, *, requested_by: str = "a callback"
    ) -> TokenCounter:
        """The trainer's counter; one is added to ``trainer.callbacks`` if there is none.

        Called from ``setup`` of our callbacks: Lightning iterates ``trainer.callbacks`` live,
        so an added counter still gets its own ``setup`` and its checkpoint state. It goes in
        before the checkpoint callbacks (which Lightning has moved to the end of the list), so
        that a checkpoint written at the end of a batch already counts that batch.

        A callback's ``count_tokens`` must agree with the counter's (there is one count per
        run): two different functions are a ``ValueError`` naming both and who gave them.
        """
        for callback in trainer.callbacks:
            if isinstance(callback, TokenCounter):
                callback._agree(count_tokens, requested_by)
                return callback
        counter = TokenCounter(count_tokens)
        counter._chosen_by = requested_by if count_tokens is not None else None
        first_checkpoint = next(
            (i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)), len(trainer.callbacks)
        )
        trainer.callbacks.insert(first_checkpoint, counter)
        return counter

    def _agree(self, count_tokens: Optional[TokenCountFn], requested_by: str) -> None:
        if count_tokens is None or count_tokens is self.count_tokens:
            return
        if self._chosen_by is None:  # the default rule so far: the first explicit function sets it
            self.count_tokens, self._chosen_by = count_tokens, requested_by
            return
        raise ValueError(
            f"{requested_by} counts tokens with {_name(count_tokens)} but {self._chosen_by} counts them with "
            f"{_name(self.count_tokens)}: a run has one token count; give the same count_tokens to both, or "
            "pass it to a single TokenCounter() in the Trainer's callbacks"
        )

    def watch(self, watcher: str, target: Optional[float]) -> None:
        """``watcher``'s next decision happens when the count reaches ``target`` tokens (``None``:
        no decision left). Call it on every rank with the same values (they come from the count)."""
        if target is None or not math.isfinite(target):
            self._targets.pop(watcher, None)
        else:
            self._targets[watcher] = float(target)

    def observe(self, trainer: Trainer, batch: Any) -> int:
        """Count ``batch`` once (safe to call from several hooks); returns ``tokens_seen``."""
        batch_index = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if batch_index != self._counted_batch:
            local = int(self.count_tokens(batch))
            if local < 0:
                raise ValueError(f"count_tokens returned {local} for a batch: expected a count >= 0")
            self._pending += local
            self._steps_since_sync += 1
            self._counted_batch = batch_index
            if trainer.world_size == 1:
                self.tokens_seen, self._pending = self.tokens_seen + self._pending, 0
            elif self._sync_due():
                self.sync(trainer)
        return self.tokens_seen

    def _sync_due(self) -> bool:
        if self._steps_since_sync >= self.sync_every or not self._rate:
            return True
        # the count the next step could reach, projected from the last interval's rate
        reach = self.tokens_seen + self._rate * (self._steps_since_sync + 1)
        return any(reach >= target for target in self._targets.values())

    def sync(self, trainer: Trainer) -> int:
        """All-reduce the ranks' pending tokens (one collective on the strategy's root device)."""
        total = global_sum(trainer, self._pending)
        if self._steps_since_sync:
            self._rate = total / self._steps_since_sync
        self.tokens_seen += total
        self._pending, self._steps_since_sync = 0, 0
        return self.tokens_seen

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.observe(trainer, batch)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending or self._steps_since_sync:  # the run's final count is exact
            self.sync(trainer)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # every rank writes (or joins) a checkpoint together: the count it holds is the exact one
        if self._pending or self._steps_since_sync:
            self.sync(trainer)
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "counted_batch": self._counted_batch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict["tokens_seen"])
        self._counted_batch = int(state_dict.get("counted_batch", -1))


def check_count_tokens(count_tokens: Optional[TokenCountFn]) -> Optional[TokenCountFn]:
    """``None`` or a callable ``batch -> int``, else a ValueError naming the value."""
    if count_tokens is not None and not callable(count_tokens):
        raise ValueError(f"count_tokens={count_tokens!r} is not callable: expected None or a function batch -> int")
    return count_tokens


def global_sum(trainer: Trainer, value: int) -> int:
    """``value`` summed over all ranks: one all-reduce of a tensor on the strategy's root device
    (NCCL, Lightning's backend on CUDA, reduces CUDA tensors only); no collective on one process."""
    if trainer.world_size == 1:
        return int(value)
    tensor = torch.tensor(float(value), dtype=torch.float64, device=trainer.strategy.root_device)
    return int(trainer.strategy.reduce(tensor, reduce_op="sum").item())


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
