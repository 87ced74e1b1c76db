"""``FPQuantPrecision``: the precision plugin for Lightning's ``Trainer`` (glue only).

What it does is :class:`~lightning_fpq.lightning.quantized_precision.QuantPrecisionMixin`; this
class adds the Trainer's ``connect`` hook (the model's device is known there: a forced backend
that cannot run on it is refused, and each stage's backends are logged).

Strategies: single device, DDP and ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` in
``configure_model``). ``FSDPStrategy`` (FSDP1) accepts only its own ``FSDPPrecision`` plugin and
refuses this one; its error message then says to use ``ModelParallelStrategy``.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn
from typing_extensions import override

from .. import backends
from .quantized_precision import FSDP1_HINT, QuantPrecisionMixin


class FPQuantPrecision(QuantPrecisionMixin, Precision):
    """Floating-point quantized training of every selected linear layer.

    Example::

        trainer = Trainer(plugins=[FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=128)])

    Args:
        recipe: a named recipe ("paper", "full", "fp8", "fp4", "nvfp4", "mxfp4", "mxfp8",
            "bf16"), a :class:`~lightning_fpq.recipe.QuantRecipe`, or the path of a recipe YAML.
        fmt: shortcut: the recipe's format (any "eXmY" name or ``FPFormat``).
        block_size: shortcut: the recipe's block size (an int, "channel", "tensor" or "none").
        compute_dtype: dtype of the GEMMs and of the operations that are not quantized: autocast
            runs on the device type the model actually lives on. ``None``/"fp32" means no
            autocast; "bf16" is what the paper's runs used on GPUs. "fp16" runs without a loss
            scaler (a warning says so): prefer "bf16".
        backend: "auto" (per layer and recipe stage, the fastest backend that computes the
            stage exactly on the model's device; the choice is logged once per stage), or one of
            "emulated", "compiled", "triton", "torchao_float8" ("torchao"),
            "transformer_engine" ("te") forced (see :mod:`lightning_fpq.backends`). A forced
            backend this machine cannot run raises ``BackendUnavailableError`` here, one the
            model's device cannot run raises it at setup.
        seed: base seed of the stochastic-rounding generators (``None``: from
            ``torch.initial_seed()``, so ``seed_everything`` makes runs reproducible).
        rng: the stochastic-rounding noise. "torch" (default): ``torch.rand`` on a
            ``torch.Generator`` per layer, written as one float32 tensor per stochastically
            rounded operand. "philox": a counter-based stream per layer (Triton's ``tl.rand4x``),
            which the Triton kernels and the compiled quantizer compute in place (no noise
            tensor); the reference computes the same draws, so every backend still agrees bit
            for bit. A checkpoint resumes only with the ``rng`` it was saved with.
        save_quantized_weight: keep q4(W) from forward for backward (faster) or quantize W
            again in backward (less memory). ``None``: keep it, except under FSDP2 sharding.
        cache_weights: quantize each weight once per optimizer step rather than once per
            micro-batch (gradient accumulation, validation loops), at the cost of keeping two
            quantized copies of each weight between steps. Ignored under FSDP2 sharding.
        quantize_tied: also quantize linear layers whose weight is an embedding's (tied output
            heads); by default they stay unquantized, like the other output heads.
    """

    @override
    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple:
        # called after the model moved to its device: the autocast device type comes from here
        self._device_type = self._device(model).type
        backends.require(self._state.backend, self._device_type)  # a forced backend this device cannot run
        module = self._module()
        if module is not None:
            self._log_backends(module)
        return super().connect(model, optimizers, lr_schedulers)

    @override
    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:
        if not isinstance(module, LightningModule):  # Fabric calls this hook with no LightningModule
            raise TypeError(
                "FPQuantPrecision is the Trainer's plugin; with Fabric use "
                "lightning_fpq.lightning.fabric.FPQuantFabricPrecision (the same arguments)"
            )
        return super().pre_backward(tensor, module)

    def __str__(self) -> str:
        # Lightning's FSDPStrategy (FSDP1) refuses this plugin with
        # f"... can only work with the `FSDPPrecision` plugin, found {plugin}": say there how to fix it.
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.endswith("strategies.fsdp"):
            return f"{self!r}. {FSDP1_HINT}"
        return repr(self)

    def __format__(self, spec: str) -> str:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.endswith("strategies.fsdp"):
            return f"{self!r}. {FSDP1_HINT}"
        return format(repr(self), spec)


__all__ = ["FPQuantPrecision"]
