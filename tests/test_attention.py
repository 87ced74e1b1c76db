"""nn.MultiheadAttention with its projections quantized (lightning_fpq.attention).

The reference is PyTorch's own ``nn.MultiheadAttention.forward`` with ``torch.nn.functional.linear``
replaced, for the duration of one call, by ``quant_linear`` on the layer's two weights: PyTorch's
attention code, its masks and layouts, with exactly the quantized GEMMs the converted layer
must run. Nearest rounding, the emulated backend: every comparison is bit for bit.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fpq.attention import QuantMultiheadAttention
from lightning_fpq.linear import (
    QuantGemm,
    QuantLinear,
    convert_linears,
    quantized_layers,
    restore_linears,
    unquantized_gemm_layers,
)
from lightning_fpq.linear_function import quant_linear
from lightning_fpq.recipe import QuantRecipe
from lightning_fpq.state import QuantState

E, H = 32, 4
RECIPE = QuantRecipe.from_name("paper", fmt="e2m1", block_size=16)


@contextlib.contextmanager
def quantized_torch_linear(mha: nn.MultiheadAttention, state: QuantState, name: str):
    """PyTorch's MHA forward with its linear calls on the in-projection and output weights
    quantized as ``state`` says for ``name`` and ``name.out_proj``."""
    real = F.linear
    in_w, out_w = mha.in_proj_weight, mha.out_proj.weight

    def linear(x, w, b=None):
        if w is out_w:
            spec = state.layer_spec(f"{name}.out_proj")
        elif w._base is in_w or w is in_w:  # the packed weight or one of its slices
            spec = state.layer_spec(name)
        else:
            raise AssertionError("an unexpected linear call")
        F.linear = real  # quant_linear's own GEMM is a plain F.linear
        try:
            return quant_linear(x, w, b, spec, backend="emulated")
        finally:
            F.linear = linear

    F.linear = linear
    try:
        yield
    finally:
        F.linear = real


def _pair(*, batch_first=False, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    plain = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, batch_first=batch_first)
    model = nn.Sequential()
    model.add_module("attn", copy.deepcopy(plain))
    state = QuantState(RECIPE, backend="emulated")
    converted, skipped = convert_linears(model, state)
    assert converted == ["attn", "attn.out_proj"] and not skipped
    return plain, model.attn, state


def _inputs(batch_first: bool, *, cross=False, distinct_kv=False, batched=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    L, S, B = 6, 5 if cross else 6, 3
    shape = (lambda n: (B, n, E) if batch_first else (n, B, E)) if batched else (lambda n: (n, E))
    q = torch.randn(shape(L), generator=g).requires_grad_()
    if not cross:
        return q, q, q
    k = torch.randn(shape(S), generator=g).requires_grad_()
    v = torch.randn(shape(S), generator=g).requires_grad_() if distinct_kv else k
    return q, k, v


def _compare(plain, quant, state, q, k, v, **kwargs):
    with quantized_torch_linear(plain, state, "attn"):
        expected = plain(q, k, v, **kwargs)
    got = quant(q, k, v, **kwargs)
    for a, b in zip(expected, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    grads = []
    for module, out in ((plain, expected[0]), (quant, got[0])):
        inputs = list({id(t): t for t in (q, k, v)}.values())
        params = [module.in_proj_weight, module.out_proj.weight]
        grads.append(torch.autograd.grad(out.square().sum(), inputs + params))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "weights"])
@pytest.mark.parametrize("attention", ["self", "cross", "cross_distinct_kv"])
def test_quantized_attention_is_pytorchs_with_quantized_projections(batch_first, need_weights, attention):
    plain, quant, state = _pair(batch_first=batch_first)
    q, k, v = _inputs(batch_first, cross=attention != "self", distinct_kv=attention == "cross_distinct_kv")
    _compare(plain, quant, state, q, k, v, need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "weights"])
def test_masks_causality_and_head_weights(need_weights):
    plain, quant, state = _pair(batch_first=True)
    q, k, v = _inputs(True, cross=True)
    L, S = q.shape[1], k.shape[1]
    padding = torch.zeros(3, S, dtype=torch.bool)
    padding[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    cases = [
        dict(key_padding_mask=padding),
        dict(attn_mask=torch.rand(L, S, generator=torch.Generator().manual_seed(3)) > 0.7),
        dict(attn_mask=torch.randn(3 * H, L, S), key_padding_mask=padding.float() * -1e4),
        dict(attn_mask=torch.ones(L, S, dtype=torch.bool).triu(1), key_padding_mask=padding),
        dict(average_attn_weights=False),
    ]
    for kwargs in cases:
        _compare(plain, quant, state, q, k, v, need_weights=need_weights, **kwargs)
    qs = _inputs(True)
    _compare(plain, quant, state, *qs, need_weights=need_weights, attn_mask=causal, is_causal=True)


def test_unbatched_input_no_bias_and_dropout():
    plain, quant, state = _pair(bias=False, dropout=0.25)
    q, k, v = _inputs(False, cross=True, batched=False)
    for training in (False, True):
        plain.train(training)
        quant.train(training)
        for need_weights in (False, True):
            torch.manual_seed(5)  # dropout draws: the same calls, the same stream
            with quantized_torch_linear(plain, state, "attn"):
                expected = plain(q, k, v, need_weights=need_weights)
            torch.manual_seed(5)
            got = quant(q, k, v, need_weights=need_weights)
            assert torch.equal(expected[0], got[0])
    assert expected[0].shape == (q.shape[0], E)


def test_the_quantized_projections_change_the_output():
    plain, quant, _ = _pair()
    q, k, v = _inputs(False)
    assert not torch.equal(plain(q, k, v)[0], quant(q, k, v)[0])


def test_transformer_layers_are_converted_and_restored():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True), 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert unquantized_gemm_layers(model) == {
        "layers.0.self_attn": "its q/k/v and output projections run inside F.multi_head_attention_forward",
        "layers.1.self_attn": "its q/k/v and output projections run inside F.multi_head_attention_forward",
    }
    state = QuantState(RECIPE, backend="emulated")
    converted, skipped = convert_linears(model, state)
    assert not skipped and unquantized_gemm_layers(model) == {}
    assert "layers.0.self_attn" in converted and "layers.0.self_attn.out_proj" in converted
    assert isinstance(model.layers[0].self_attn, QuantMultiheadAttention)
    assert isinstance(model.layers[0].self_attn.out_proj, QuantLinear)
    names = dict(quantized_layers(model))
    assert isinstance(names["layers.1.self_attn"], QuantGemm) and len(names) == 8
    assert state.layer_spec("layers.0.self_attn") is not None
    table = RECIPE.describe(model)
    assert f"layers.0.self_attn           {3 * E}x{E}" in table and f"layers.0.self_attn.out_proj  {E}x{E}" in table
    x = torch.randn(2, 7, E)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    model(x, mask=mask, is_causal=True).sum().backward()
    assert model.layers[0].self_attn.in_proj_weight.grad is not None
    assert model.state_dict().keys() == before.keys()
    restore_linears(model)
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    assert type(model.layers[0].self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "kwargs,why",
    [
        (dict(kdim=16, vdim=16), "kdim/vdim"),
        (dict(add_bias_kv=True), "add_bias_kv"),
        (dict(add_zero_attn=True), "add_zero_attn"),
    ],
)
def test_attention_the_converter_cannot_take_stays_plain_and_is_named(kwargs, why):
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(E, H, **kwargs))
    converted, skipped = convert_linears(model, QuantState(RECIPE))
    assert converted == [] and skipped == []
    assert type(model.attn) is nn.MultiheadAttention
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert why in unquantized_gemm_layers(model)["attn"]


def test_an_excluded_attention_layer_is_left_alone():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(E, H))
    recipe = QuantRecipe.from_name("paper", fmt="e2m1", block_size=16, exclude=["attn"])
    converted, _ = convert_linears(model, QuantState(recipe))
    assert converted == [] and type(model.attn) is nn.MultiheadAttention


def test_under_bf16_autocast():
    plain, quant, state = _pair(batch_first=True)
    q, k, v = _inputs(True, cross=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for need_weights in (False, True):
            _compare(plain, quant, state, q, k, v, need_weights=need_weights)
