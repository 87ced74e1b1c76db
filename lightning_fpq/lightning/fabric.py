"""``FPQuantFabricPrecision``: the precision plugin for Lightning Fabric (LitGPT's training scripts
and other hand-written loops).

It is built on Fabric's own ``Precision`` and does what the Trainer plugin does
(:class:`~lightning_fpq.lightning.quantized_precision.QuantPrecisionMixin`): ``fabric.setup``
converts the model's linear layers in place, every forward runs quantized, ``set_recipe``
switches precision between two steps, and ``fabric.save``/``fabric.load`` checkpoint it. A loop
has no callbacks, so the plugin also counts tokens (:meth:`count_tokens`, summed over ranks) for
the loop to decide switches with::

    plugin = FPQuantFabricPrecision("paper", fmt="e2m1")
    fabric = Fabric(plugins=[plugin])
    model, optimizer = fabric.setup(model, optimizer)
    for batch in loader:
        if plugin.count_tokens(batch) >= 40_000_000:
            plugin.set_recipe("paper", fmt="e4m3")   # a no-op once active
        loss = model(batch).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Optional, Union

import torch
from lightning.fabric.plugins.precision import Precision
from typing_extensions import override

from .. import backends
from ..recipe import QuantRecipe
from .quantized_precision import QuantPrecisionMixin
from .tokens import TokenCountFn, check_count_tokens, count_batch_tokens


class FPQuantFabricPrecision(QuantPrecisionMixin, Precision):
    """Floating-point quantized training under Fabric. The arguments are those of
    :class:`~lightning_fpq.lightning.precision.FPQuantPrecision`, plus ``count_tokens``
    (``batch -> int``, the tokens of one batch on this rank; default ``count_batch_tokens``).
    """

    def __init__(
        self, recipe: Union[str, QuantRecipe] = "paper", *, count_tokens: Optional[TokenCountFn] = None, **kwargs: Any
    ) -> None:
        super().__init__(recipe, **kwargs)
        self._count_tokens = check_count_tokens(count_tokens) or count_batch_tokens
        #: training tokens counted by :meth:`count_tokens`, summed over all ranks
        self.tokens_seen = 0

    def count_tokens(self, batch: Any) -> int:
        """Add ``batch``'s tokens, summed over all ranks, and return the run's count. Call it once
        per training batch on every rank (it is a collective when there are several)."""
        local = int(self._count_tokens(batch))
        if local < 0:
            raise ValueError(f"count_tokens returned {local} for a batch: expected a count >= 0")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            module = self._module()
            device = self._device(module) if module is not None else torch.device("cpu")
            total = torch.tensor(
                float(local), dtype=torch.float64, device=device
            )  # NCCL: a tensor on the model's device
            torch.distributed.all_reduce(total)
            local = int(total.item())
        self.tokens_seen += local
        return self.tokens_seen

    @override
    def forward_context(self) -> AbstractContextManager:
        # Fabric moves the model to its device after convert_module: the first forward knows it
        module = self._module()
        if module is not None and self._device_type is None:
            self._device_type = self._device(module).type
            backends.require(self._state.backend, self._device_type)  # a forced backend this device cannot run
            self._log_backends(module)
        return super().forward_context()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tokens_seen": self.tokens_seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))


__all__ = ["FPQuantFabricPrecision"]
