"""The quantization gap: the held-out loss the active recipe adds to the same weights."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import TinyLM, quiet_trainer, token_loader
from lightning_fpq import FPQuantPrecision, QuantRecipe
from lightning_fpq.lightning.gap import QuantizationGap, gap_slope, log_log_slope
from lightning_fpq.linear import restore_linears
from lightning_fpq.spec import OperandSpec
from lightning_fpq.state import QuantState


def tiny_loss(module, batch):
    x, y = batch
    h = torch.relu(module.hidden(module.emb(x)))
    return F.cross_entropy(module.lm_head(h).flatten(0, 1), y.flatten())


def _fit(callbacks, recipe, steps=4, seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    trainer = quiet_trainer(max_steps=steps, plugins=[FPQuantPrecision(recipe, seed=0)], callbacks=callbacks)
    trainer.fit(model, token_loader(steps, 4, 8, seed=1))
    return trainer, model


def test_the_gap_is_the_quantized_minus_the_plain_loss_of_the_same_weights():
    held_out = next(iter(token_loader(1, 8, 8, seed=2)))
    gap = QuantizationGap(tiny_loss, batch=held_out, every_n_steps=2)
    recipe = QuantRecipe.from_name("full", fmt="e2m1", block_size=16)
    trainer, model = _fit([gap], recipe)
    assert [h["step"] for h in gap.history] == [2, 4]
    last = gap.history[-1]
    # independent references with the final weights: a copy with plain nn.Linear layers, and the
    # quantized model evaluated directly (eval mode, no grad)
    plain = copy.deepcopy(model)
    restore_linears(plain)
    with torch.no_grad():
        assert last["loss_unquantized"] == pytest.approx(float(tiny_loss(plain, held_out)), abs=1e-6)
        model.eval()
        assert last["loss_quantized"] == pytest.approx(float(tiny_loss(model, held_out)), abs=1e-6)
    assert last["gap"] == pytest.approx(last["loss_quantized"] - last["loss_unquantized"])
    assert last["gap"] != 0.0  # E2M1 on every operand changes the loss
    assert model.hidden.spec is not None  # the recipe is active again after the measurement


def test_measuring_the_gap_leaves_training_bit_identical():
    # stochastic rounding on the forward operands: the measurement draws noise that must not leak
    sr = OperandSpec("e2m1", 16, rounding="stochastic")
    recipe = QuantRecipe(input=sr, weight=sr)
    held_out = next(iter(token_loader(1, 8, 8, seed=2)))
    _, with_gap = _fit([QuantizationGap(tiny_loss, batch=held_out, every_n_steps=1)], recipe)
    _, without = _fit([], recipe)
    for a, b in zip(with_gap.parameters(), without.parameters()):
        assert torch.equal(a, b)


def test_the_first_validation_batch_is_kept_when_no_batch_is_given():
    gap = QuantizationGap(tiny_loss, every_n_steps=1)
    torch.manual_seed(0)
    model = TinyLM()
    model.validation_step = lambda *args: None
    trainer = quiet_trainer(
        max_steps=3,
        num_sanity_val_steps=1,
        plugins=[FPQuantPrecision("full", fmt="e2m1", block_size=16)],
        callbacks=[gap],
    )
    val = token_loader(2, 4, 8, seed=3)
    trainer.fit(model, token_loader(3, 4, 8, seed=1), val)
    assert [h["step"] for h in gap.history] == [1, 2, 3]  # the sanity check kept the batch before step 1
    assert torch.equal(gap._batch[0], next(iter(val))[0])


def test_state_unquantized_switches_every_layer_off_and_back_without_an_event():
    state = QuantState("full", seed=0)
    state.register("a")
    heard = []
    state.subscribe(lambda old, new: heard.append(new))
    with state.unquantized():
        assert state.layer_spec("a") is None
    assert state.layer_spec("a") is not None and not heard


def test_rng_preserved_restores_and_forgets_generators():
    state = QuantState("full", seed=0)
    gen = state.generator("a", torch.device("cpu"))
    before = gen.get_state()
    with state.rng_preserved():
        torch.rand(3, generator=gen)
        torch.rand(3, generator=state.generator("b", torch.device("cpu")))
    assert torch.equal(state.generator("a", torch.device("cpu")).get_state(), before)
    fresh = QuantState("full", seed=0).generator("b", torch.device("cpu")).get_state()
    assert torch.equal(state.generator("b", torch.device("cpu")).get_state(), fresh)  # made afresh


def test_rng_preserved_restores_philox_counters():
    # rng="philox": a measurement inside the block must not move the layer's counter either
    state = QuantState("nvfp4", seed=0, rng="philox")
    gen = state.generator("a", torch.device("cpu"))
    gen.uniform((5,))  # 5 draws: the stream moves to 8 (each call starts on a fresh counter)
    with state.rng_preserved():
        gen.uniform((1000,))
        assert gen.offset == 1008
    assert state.generator("a", torch.device("cpu")).offset == 8


def test_log_log_slope_matches_numpy_and_needs_three_positive_points():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e6, 7)
    y = 0.01 * x**0.57 * np.exp(rng.normal(0, 0.05, x.size))
    assert log_log_slope(list(zip(x, y))) == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0], rel=1e-9)
    assert log_log_slope([(1.0, 1.0), (2.0, 2.0)]) is None
    assert log_log_slope([(1.0, -1.0), (2.0, 0.0), (3.0, 3.0), (4.0, math.nan)]) is None


def test_the_gap_slope_follows_its_size_whatever_its_sign_but_not_a_change_of_sign():
    x = [1e3, 1e4, 1e5, 1e6]
    assert gap_slope([(d, -0.01 * d**0.5) for d in x]) == pytest.approx(0.5)  # adapted weights: negative
    assert gap_slope([(d, 0.01 * d**0.5) for d in x]) == pytest.approx(0.5)
    assert gap_slope([(1e3, -0.1), (1e4, 0.2), (1e5, 0.3), (1e6, 0.4)]) is None
    assert gap_slope([(1e3, 0.0), (1e4, 0.2), (1e5, 0.3)]) is None  # two non-zero points


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="loss_fn=3 is not valid"):
        QuantizationGap(3)
    with pytest.raises(ValueError, match="every_n_steps"):
        QuantizationGap(tiny_loss, every_n_steps=0)


def test_under_ddp_every_rank_logs_the_mean_of_the_ranks_gaps(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "callback_scripts" / "ddp_gap.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"gap{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 2
    assert ranks[0]["quantized"] != ranks[1]["quantized"]  # each rank held out its own batch
    last = ranks[0]["history"][-1]  # measured with the final weights, identical on both ranks
    assert last["loss_quantized"] == pytest.approx((ranks[0]["quantized"] + ranks[1]["quantized"]) / 2, abs=1e-5)
    assert last["loss_unquantized"] == pytest.approx((ranks[0]["unquantized"] + ranks[1]["unquantized"]) / 2, abs=1e-5)


def test_the_history_survives_a_checkpoint():
    held_out = next(iter(token_loader(1, 8, 8, seed=2)))
    gap = QuantizationGap(tiny_loss, batch=held_out, every_n_steps=2)
    _fit([gap], QuantRecipe.from_name("full", fmt="e2m1", block_size=16))
    restored = QuantizationGap(tiny_loss, batch=held_out, every_n_steps=2)
    restored.load_state_dict(copy.deepcopy(gap.state_dict()))
    assert restored.history == gap.history and restored._last_step == gap._last_step == 4
    assert restored.state_key == gap.state_key
