"""The part of the precision plugin that the Trainer and Fabric share (Lightning's ``Precision``
hooks that both call: ``convert_module``, ``forward_context``, ``state_dict``,
``load_state_dict``), plus the recipe API callbacks and training loops use.

It converts the model's selected ``nn.Linear`` layers to ``QuantLinear`` in place (same
Parameters, same state_dict keys), creates the :class:`~lightning_fpq.state.QuantState` that
every converted layer reads its operand specs from, wraps each step in an autocast for the
operations that are not quantized, saves that state in checkpoints, and switches the recipe at
a batch boundary (``set_recipe``). It listens to the state's switch event: after every switch it
converts layers the new recipe includes and logs which backend runs which layers, once per stage.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from .. import _config
from ..linear import (
    convert_linears,
    is_gemm_layer,
    quantized_layers,
    tied_to_an_embedding,
    unquantized_gemm_layers,
)
from ..recipe import QuantRecipe, clean_module_name
from ..state import QuantState

_COMPUTE_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "32": torch.float32,
    "32-true": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "16": torch.float16,
    "16-mixed": torch.float16,
}
_PRECISION_STR = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}
FSDP1_HINT = (
    "FPQuantPrecision works with FSDP2: use strategy=ModelParallelStrategy() and call "
    "torch.distributed.fsdp.fully_shard in LightningModule.configure_model; Lightning's FSDPStrategy "
    "(FSDP1) accepts only its own FSDPPrecision plugin"
)


def _compute_dtype(value: Union[None, str, torch.dtype]) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype) and value in _PRECISION_STR:
        return value
    if isinstance(value, str) and value.strip().lower() in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[value.strip().lower()]
    raise ValueError(
        f"compute_dtype={value!r} is not valid: expected None (fp32), torch.float32/bfloat16/float16 or one of "
        f"{sorted(_COMPUTE_DTYPES)}"
    )


def _refuse_fsdp1(module: nn.Module) -> None:
    """A model already wrapped in FSDP1 (``FullyShardedDataParallel``) cannot be converted."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        raise TypeError(f"the model is wrapped in FSDP1 (FullyShardedDataParallel): {FSDP1_HINT}")


@contextmanager
def _no_transformer_fast_path() -> Iterator[None]:
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class QuantPrecisionMixin:
    """What both precision plugins do (:class:`~lightning_fpq.lightning.precision.FPQuantPrecision`
    for the Trainer, :class:`~lightning_fpq.lightning.fabric.FPQuantFabricPrecision` for Fabric):
    create and own the :class:`~lightning_fpq.state.QuantState`, convert the model's layers,
    autocast the operations that are not quantized, log each stage's backends, and checkpoint
    the state. The arguments are documented on ``FPQuantPrecision``.
    """

    def __init__(
        self,
        recipe: Union[str, QuantRecipe] = "paper",
        *,
        fmt: Optional[str] = None,
        block_size: Optional[Union[int, str]] = None,
        compute_dtype: Optional[Union[str, torch.dtype]] = None,
        backend: str = "auto",
        seed: Optional[int] = None,
        rng: str = "torch",
        save_quantized_weight: Optional[bool] = None,
        cache_weights: bool = False,
        quantize_tied: bool = False,
    ) -> None:
        super().__init__()  # the Precision base that follows in the MRO
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not valid: expected None or an int")
        if save_quantized_weight is not None and not isinstance(save_quantized_weight, bool):
            raise ValueError(
                f"save_quantized_weight={save_quantized_weight!r} is not valid: expected None, True or False"
            )
        self.quantize_tied = _config.flag(quantize_tied, what="quantize_tied")
        self._said_tied: list[str] = []
        self._said_rules: list[str] = []
        self._said_left: dict[str, str] = {}
        if not isinstance(cache_weights, bool):
            raise ValueError(f"cache_weights={cache_weights!r} is not valid: expected True or False")
        self.compute_dtype = _compute_dtype(compute_dtype)
        self.precision = _PRECISION_STR[self.compute_dtype]  # type: ignore[assignment]
        self._save_quantized_weight = save_quantized_weight
        #: the recipe this plugin was built with: what a resumed run compares with the checkpoint's
        self.requested_recipe = QuantRecipe.coerce(recipe, fmt=fmt, block_size=block_size)
        self._state = QuantState(
            self.requested_recipe,
            backend=backend,
            seed=seed,
            rng=rng,
            save_quantized_weight=True if save_quantized_weight is None else save_quantized_weight,
            cache_weights=cache_weights,
        )
        self._state.subscribe(self._on_switch)
        self._device_type: Optional[str] = None
        self._module_ref: Optional[weakref.ReferenceType] = None
        if self.compute_dtype == torch.float16:
            rank_zero_warn(
                "FPQuantPrecision(compute_dtype='fp16') applies no loss scaling: small gradients may underflow; prefer 'bf16'"
            )

    # ------------------------------------------------------------------ recipe API
    @property
    def recipe(self) -> QuantRecipe:
        """The active recipe (what callbacks read; replace it with :meth:`set_recipe`)."""
        return self._state.recipe

    @property
    def state(self) -> QuantState:
        """The one owner of the quantization state; every converted layer reads its spec from it
        (callbacks may ``state.subscribe`` to the switch event)."""
        return self._state

    @property
    def backend(self) -> str:
        return self._state.backend

    @property
    def backend_history(self) -> list[dict[str, Any]]:
        """One entry per recipe stage trained: ``{"recipe", "device", "backends": {backend: n_layers}}``."""
        return self._state.history

    def set_recipe(
        self,
        recipe: Union[str, QuantRecipe],
        *,
        fmt: Optional[str] = None,
        block_size: Optional[Union[int, str]] = None,
    ) -> QuantRecipe:
        """Switch precision: every layer uses ``recipe`` from its next call on.

        Call it at a batch boundary (a callback's ``on_train_batch_start``/``end``) on every
        rank. No module is rebuilt and no Parameter replaced; layers the new recipe includes
        that were not converted yet are converted in place. The recipe already active is a no-op.
        """
        return self._state.set_recipe(QuantRecipe.coerce(recipe, fmt=fmt, block_size=block_size))

    def _on_switch(self, old: QuantRecipe, new: QuantRecipe) -> None:
        module = self._module()
        if module is not None:
            self._convert(module)
        rank_zero_info(f"{type(self).__name__}: recipe is now {new.short_str()}")
        if module is not None and self._device_type is not None:
            self._log_backends(module)

    def _module(self) -> Optional[nn.Module]:
        return self._module_ref() if self._module_ref is not None else None

    def describe(self) -> str:
        """The active recipe's table for the converted model (layer, shape, each operand)."""
        module = self._module()
        if module is None:
            return self.recipe.short_str()
        return self.recipe.describe(module)

    # ---------------------------------------------------------------- Lightning hooks
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Convert the included ``nn.Linear`` layers in place (Lightning calls this once, in
        ``Strategy.setup``, after ``configure_model`` and after weights are restored)."""
        _refuse_fsdp1(module)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._state.rank = torch.distributed.get_rank()
        # FSDP2 shards parameters as DTensors: a saved or cached q(W) would be a full unsharded copy
        sharded = any(type(p).__name__ == "DTensor" for p in module.parameters())
        if self._save_quantized_weight is None:
            self._state.save_quantized_weight = not sharded
        if sharded and self._state.cache_weights:
            rank_zero_warn(
                "FPQuantPrecision(cache_weights=True) is ignored under FSDP2 sharding (full copies of sharded weights)"
            )
            self._state.cache_weights = False
        self._module_ref = weakref.ref(module)
        self._convert(module)
        return module

    def _convert(self, module: nn.Module) -> None:
        tied = [] if self.quantize_tied else tied_to_an_embedding(module)
        converted, skipped = convert_linears(module, self._state, leave=tied)
        for name in skipped:
            rank_zero_warn(f"{type(self).__name__}: layer {name!r} is an nn.Linear subclass and stays unquantized")
        if tied and self._said_tied != tied:
            self._said_tied = tied
            rank_zero_info(
                f"{type(self).__name__}: {tied} share their weight with an embedding (tied output heads) and stay "
                "unquantized; FPQuantPrecision(quantize_tied=True) quantizes them"
            )
        left = unquantized_gemm_layers(module)
        if left and self._said_left != left:
            self._said_left = left
            listed = "; ".join(f"{name or '(model)'}: {why}" for name, why in list(left.items())[:8])
            rank_zero_warn(
                f"{type(self).__name__}: {len(left)} layer(s) compute GEMMs that stay in the compute dtype "
                f"({listed}{' ...' if len(left) > 8 else ''})"
            )
        linear_names = [clean_module_name(n) for n, m in module.named_modules() if is_gemm_layer(m)]
        for rule in self.recipe.rules:
            if not any(rule.matches(name) for name in linear_names) and rule.pattern not in self._said_rules:
                self._said_rules.append(rule.pattern)
                rank_zero_warn(
                    f"{type(self).__name__}: rule {rule.short_str()!r} matches no nn.Linear layer of the model"
                )
        if not converted:
            rank_zero_warn(
                f"{type(self).__name__}: no nn.Linear layer matches the recipe's include/exclude patterns ({self.recipe.short_str()})"
            )

    def backend_choices(self, module: Optional[nn.Module] = None) -> dict[str, tuple[str, str]]:
        """``{layer: (backend, reason)}`` for the active recipe on the model's device: what
        runs each quantized layer now ("unquantized" for layers the recipe leaves alone)."""
        module = module if module is not None else self._module()
        if module is None:
            return {}
        device = self._device(module)
        choices = self._state.resolve_backends(device)
        return {name: choices[name] for name, _ in quantized_layers(module) if name in choices}

    def _log_backends(self, module: nn.Module) -> None:
        """Say once per recipe stage which backend runs which layers, and why."""
        device = self._device(module)
        stages = len(self._state.history)
        choices = self.backend_choices(module)
        if len(self._state.history) == stages:
            return  # this stage was resolved (and said) before
        groups: dict[tuple[str, str], list[str]] = {}
        for name, choice in choices.items():
            groups.setdefault(choice, []).append(name)
        for (backend, reason), names in groups.items():
            if backend == "unquantized":
                continue
            listed = f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
            message = (
                f"{type(self).__name__}: {self.recipe.short_str()} on {device.type}: {len(names)} layer(s) on "
                f"backend {backend!r} ({reason}): {listed}"
            )
            forced = self._state.backend
            if forced != "auto" and backend != forced:
                rank_zero_warn(message)
            else:
                rank_zero_info(message)

    @staticmethod
    def _device(module: nn.Module) -> torch.device:
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def forward_context(self) -> AbstractContextManager:
        """Autocast to ``compute_dtype`` on the model's device type (nothing for fp32), and no
        fast path of ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention``: in eval mode it would
        run their linear layers as fused kernels that bypass ``QuantLinear.forward``, so that
        validation would measure an unquantized model."""
        stack = ExitStack()
        stack.enter_context(_no_transformer_fast_path())
        if self.compute_dtype != torch.float32:
            device_type = self._device_type
            if device_type is None:
                module = self._module()
                device_type = self._device(module).type if module is not None else "cpu"
            stack.enter_context(torch.autocast(device_type=device_type, dtype=self.compute_dtype))
        return stack

    def state_dict(self) -> dict[str, Any]:
        state = {**self._state.state_dict(), "requested_recipe": self.requested_recipe.to_dict()}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank draws its own stochastic-rounding noise: keep each rank's generators
            # (Lightning builds the checkpoint on every rank; rank zero writes it)
            by_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(by_rank, state["rng"])
            state["rng"] = by_rank
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the quantization state of a checkpoint: the active recipe (a switch made during
        training, e.g. by ``ProgressivePrecision``), the seed and the stochastic-rounding generators.

        The recipe passed to this plugin is a deliberate choice: when it differs from the one the
        checkpoint's run was built with, training continues with the new one (a warning names
        both) and only the generators are restored."""
        if "recipe" not in state_dict:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint holds no recipe; keeping the plugin's own")
            return
        saved = state_dict.get("requested_recipe")
        if saved is not None and QuantRecipe.from_dict(saved) != self.requested_recipe:
            active = QuantRecipe.from_dict(state_dict["recipe"])
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's run was built with recipe {QuantRecipe.from_dict(saved).short_str()} "
                f"(active when saved: {active.short_str()}); this run passes {self.requested_recipe.short_str()}, "
                "a deliberate change: training continues with the recipe passed now"
            )
            state_dict = {key: value for key, value in state_dict.items() if key != "recipe"}
        self._state.load_state_dict(state_dict)

    # ----------------------------------------------------------------------- text
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(recipe={self.recipe.short_str()!r}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}, "
            f"backend={self._state.backend!r})"
        )
