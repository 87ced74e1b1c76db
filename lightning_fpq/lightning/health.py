"""``QuantizationHealth``: per-layer, per-operand quantization health, logged at an interval.

Every ``every_n_steps`` training steps it captures, for each quantized layer, the tensors that
layer quantizes in that step (the input X by a forward pre-hook, the output gradient dY by a
backward hook, the weight W after the step) and logs, for every operand the active recipe
quantizes (:func:`lightning_fpq.operand_health.operand_health`), through the Trainer's loggers::

    fpq/health/<layer>/P<i>/sqnr_db   fpq/health/<layer>/P<i>/flushed
    fpq/health/<layer>/P<i>/saturated fpq/health/<layer>/P<i>/nan
    fpq/health/min_sqnr_db            fpq/health/max_saturated      fpq/health/max_flushed

The hooks exist only during the measured steps (under ``torch.compile`` those steps run eagerly
around the hooks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from .. import _config
from ..linear import QuantGemm, quantized_layers
from ..operand_health import operand_health
from .critical import find_plugin

# (P number, role, tensor, axis of the 2-D operand the GEMM reduces along)
_OPERANDS = (
    (1, "input", "x", -1),
    (2, "weight", "w", -1),
    (3, "grad_output", "dy", -1),
    (4, "weight_for_grad_input", "w", 0),
    (5, "grad_output_for_grad_weight", "dy", 0),
    (6, "input_for_grad_weight", "x", 0),
)


class QuantizationHealth(Callback):
    """Log how much each quantized operand loses (SQNR, flushed to zero, saturated, NaN).

    Args:
        every_n_steps: measure the step whose ``global_step`` is a multiple of this.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = _config.integer(every_n_steps, what="every_n_steps", low=1)
        self._captured: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []
        self.last: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        find_plugin(trainer, needed_by="QuantizationHealth")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps != 0 or self._handles:
            return
        for name, layer in quantized_layers(pl_module):
            self._handles.append(layer.register_forward_pre_hook(self._keep_input(name)))
            if layer.module_io_is_gemm_io:  # else the output's gradient is not the GEMM's dY: P3, P5 not measured
                self._handles.append(layer.register_full_backward_hook(self._keep_grad(name)))

    def _keep_input(self, name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self._captured.setdefault(name, {}).setdefault("x", args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    def _keep_grad(self, name: str):
        def hook(module: torch.nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            dy = grad_output[0]
            if dy is not None:
                self._captured.setdefault(name, {}).setdefault("dy", dy.detach().reshape(-1, dy.shape[-1]))

        return hook

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        metrics: dict[str, float] = {}
        layers = dict(quantized_layers(pl_module))
        for name, tensors in self._captured.items():
            metrics.update(self._layer_metrics(name, layers[name], tensors))
        self._captured = {}
        if not metrics:
            return
        summary = {
            "fpq/health/min_sqnr_db": min(v for k, v in metrics.items() if k.endswith("sqnr_db")),
            "fpq/health/max_saturated": max(v for k, v in metrics.items() if k.endswith("saturated")),
            "fpq/health/max_flushed": max(v for k, v in metrics.items() if k.endswith("flushed")),
        }
        self.last = {**metrics, **summary}
        if trainer.loggers:
            finite = {k: (v if math.isfinite(v) else (1e9 if v > 0 else -1e9)) for k, v in self.last.items()}
            pl_module.log_dict(finite, on_step=True, on_epoch=False, logger=True, batch_size=1)

    @staticmethod
    def _layer_metrics(name: str, layer: QuantGemm, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        spec = layer.spec
        if spec is None:
            return {}
        tensors = {**tensors, "w": layer.gemm_weight().detach()}
        metrics = {}
        for number, role, tensor, axis in _OPERANDS:
            op = getattr(spec, role)
            if op is None or tensor not in tensors:
                continue
            health = operand_health(tensors[tensor], op, axis)
            for key, value in vars(health).items():
                metrics[f"fpq/health/{name}/P{number}/{key}"] = float(value)
        return metrics
