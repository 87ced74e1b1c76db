"""Quantization health: SQNR, flushed, saturated and NaN fractions of each quantized operand."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import TinyLM, quiet_trainer, token_loader
from lightning_fpq import FPQuantPrecision
from lightning_fpq.lightning.health import QuantizationHealth
from lightning_fpq.operand_health import operand_health
from lightning_fpq.spec import OperandSpec


def test_unscaled_e2m1_counts_flushed_saturated_and_nan_values():
    x = torch.tensor([0.1, 7.0, math.inf, math.nan, 1.0, -0.3])
    health = operand_health(x, OperandSpec("e2m1", None), -1)
    # E2M1: 0.1 -> 0 (flushed), 7 -> 6 and inf -> 6 (saturated), -0.3 -> -0.5, 1 -> 1, NaN stays NaN
    assert health.flushed == pytest.approx(1 / 4)  # of the four non-zero finite values
    assert health.saturated == pytest.approx(2 / 6) and health.nan == pytest.approx(1 / 6)
    signal, noise = 0.1**2 + 7**2 + 1 + 0.3**2, 0.1**2 + 1 + 0.2**2
    assert health.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)


def test_block_scaling_saturates_nothing_but_inf_and_mx_scales_can_saturate():
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    assert operand_health(x, OperandSpec("e2m1", 32), -1).saturated == 0.0  # absmax lands on the max
    x[3, 5] = math.inf
    assert operand_health(x, OperandSpec("e2m1", 32), -1).saturated == pytest.approx(1 / x.numel())
    # an E8M0 (power-of-two) scale rounds down: a block's absmax can exceed the largest magnitude
    y = torch.full((1, 32), 0.5)
    y[0, 0] = 7.0 / 4.0  # 1.75: E8M0 scale 1 for E2M1 (emax 2) -> 1.75 * 4 = 7 > 6
    assert operand_health(y, OperandSpec("e2m1", 32, "e8m0"), -1).saturated > 0
    assert math.isinf(operand_health(torch.ones(4, 32), OperandSpec("e2m1", 32), -1).sqnr_db)  # exact


def _fit_with_health(tmp_path, model, *, every_n_steps: int, max_steps: int) -> QuantizationHealth:
    """Train ``model`` a few steps with the `full` E2M1 recipe and the callback; returns it."""
    health = QuantizationHealth(every_n_steps=every_n_steps)
    trainer = quiet_trainer(
        max_steps=max_steps,
        default_root_dir=tmp_path,
        plugins=[FPQuantPrecision("full", fmt="e2m1", block_size=16)],
        callbacks=[health],
    )
    trainer.fit(model, token_loader(3, 4, 8, seed=0))
    return health


def _operands(health: QuantizationHealth, layer: str) -> set:
    return {key.split("/")[3] for key in health.last if key.startswith(f"fpq/health/{layer}/")}


def test_the_callback_logs_every_quantized_operand_of_every_layer(tmp_path):
    health = _fit_with_health(tmp_path, TinyLM(), every_n_steps=2, max_steps=3)
    operands = _operands(health, "hidden")
    assert operands == {f"P{i}" for i in range(1, 7)}  # `full` quantizes all six; lm_head is excluded
    assert not any(key.startswith("fpq/health/lm_head/") for key in health.last)
    assert 0 < health.last["fpq/health/min_sqnr_db"] < 30  # E2M1 keeps about 3 bits
    assert health.last["fpq/health/max_saturated"] == 0.0


class _Attention(TinyLM):
    """TinyLM with a self-attention layer between the embedding and the hidden layer."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.emb(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        logits = self.lm_head(torch.relu(self.hidden(h)))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_attention_layers_report_their_input_and_weight_operands(tmp_path):
    health = _fit_with_health(tmp_path, _Attention(), every_n_steps=1, max_steps=1)
    # the in-projection's X and W operands; its dY is inside the attention, not the layer's output gradient
    assert _operands(health, "attn") == {"P1", "P2", "P4", "P6"}
    assert _operands(health, "attn.out_proj") == {f"P{i}" for i in range(1, 7)}
