"""FPQuantFabricPrecision in a Fabric training loop: conversion, quantized forward, backward,
switching, token counting and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.fabric import Fabric

from lightning_fpq import FPQuantFabricPrecision, FPQuantPrecision
from lightning_fpq.linear import QuantLinear, convert_linears
from lightning_fpq.state import QuantState


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, 32, generator=g) for _ in range(n)]


def _step(model, optimizer, x, backward):
    loss = (model(x) - x).pow(2).mean()
    backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def test_a_fabric_loop_trains_quantized_and_switches_like_the_core(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    plugin = FPQuantFabricPrecision("paper", fmt="e2m1", block_size=16, count_tokens=lambda b: b.shape[0] * b.shape[1])
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    fabric_model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(model.fc1, QuantLinear) and isinstance(model.fc2, QuantLinear)

    # the same steps on the core alone: convert, train, switch by hand
    state = QuantState("paper", backend=plugin.backend)
    state.set_recipe(plugin.recipe)
    convert_linears(reference, state)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

    for i, x in enumerate(_batches(6)):
        if plugin.count_tokens(x) > 3 * 32:  # after 3 batches of 32 tokens
            plugin.set_recipe("paper", fmt="e4m3", block_size=16)
            state.set_recipe(plugin.recipe)
        loss = _step(fabric_model, optimizer, x, fabric.backward)
        ref_loss = _step(reference, ref_optimizer, x, lambda loss: loss.backward())
        assert torch.equal(loss, ref_loss), i
    assert plugin.tokens_seen == 6 * 32 and plugin.recipe.fmt.name == "e4m3"
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)

    fabric.save(tmp_path / "ckpt", {"model": fabric_model, "quant": plugin})
    resumed = FPQuantFabricPrecision("paper", fmt="e2m1", block_size=16)
    Fabric(accelerator="cpu", devices=1, plugins=[resumed]).load(tmp_path / "ckpt", {"quant": resumed})
    assert resumed.recipe == plugin.recipe and resumed.tokens_seen == plugin.tokens_seen


def test_the_trainers_plugin_under_fabric_says_which_plugin_to_use():
    model = MLP()
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[FPQuantPrecision()])
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="FPQuantFabricPrecision"):
        fabric.backward(model(torch.randn(2, 32)).sum())


def test_fabric_with_philox_noise_checkpoints_the_counters(tmp_path):
    # rng="philox" under Fabric: the layers draw from counter-based generators, saved and restored
    from lightning_fpq.philox import PhiloxGenerator

    torch.manual_seed(0)
    model = MLP()
    plugin = FPQuantFabricPrecision("nvfp4", rng="philox", seed=3)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    fabric_model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for x in _batches(2):
        _step(fabric_model, optimizer, x, fabric.backward)
    gen = plugin.state.generator("fc1", torch.device("cpu"))
    # 2 steps x q5 of fc1's dY (32 tokens x 64); no q3: the input needs no gradient, no dgrad
    assert isinstance(gen, PhiloxGenerator) and gen.offset == 2 * 32 * 64
    fabric.save(tmp_path / "ckpt", {"quant": plugin})
    resumed = FPQuantFabricPrecision("nvfp4", rng="philox", seed=3)
    Fabric(accelerator="cpu", devices=1, plugins=[resumed]).load(tmp_path / "ckpt", {"quant": resumed})
    assert torch.equal(resumed.state.generator("fc1", torch.device("cpu")).get_state(), gen.get_state())
