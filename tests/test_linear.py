"""QuantLinear against explicit references: quantize each operand with the reference quantizer
along its own reduction dimension, multiply in the same dtype, compare with torch.equal."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_fpq.formats import FPFormat
from lightning_fpq.linear import QuantLinear, convert_linears
from lightning_fpq.linear_function import quant_linear
from lightning_fpq.quantize import block_scales, quantize
from lightning_fpq.recipe import LayerRule, OperandSpec, QuantRecipe, RecipeName
from lightning_fpq.state import QuantState

NAMED = [m.value for m in RecipeName]


# ---------------------------------------------------------------- the reference
def rq(t, op, axis):
    """Reference fake quantization of one operand (nearest rounding), contiguous: CPU fp16 GEMMs
    round differently for different operand layouts, so both sides use row-major operands."""
    if op is None:
        return t
    return quantize(
        t,
        op.fmt,
        block_size=op.block_size,
        axis=axis,
        scale_format=op.scale_format,
        rounding="nearest",
        backend="reference",
    ).contiguous()


def dge_reference(w, op, k, clamp):
    """DGE from the format's value table (not from exponent arithmetic)."""
    grid = op.fmt.values(include_negative=False).to(torch.float32)
    assert op.block_size == "channel"
    # the block scales of P2's quantization, as the reference quantizer computes them
    scale = block_scales(w.float().abs().amax(dim=-1, keepdim=True), op.fmt, op.scale_format)
    y = w.float() * scale
    a = torch.clamp(y.abs(), max=op.fmt.max)  # saturate, as the quantizer does
    idx = torch.searchsorted(grid, a, right=True) - 1
    lo = grid[idx]
    hi = grid[torch.clamp(idx + 1, max=len(grid) - 1)]
    top = idx == len(grid) - 1  # |y| == max: the interval below it
    delta = torch.where(top, grid[-1] - grid[-2], hi - lo)
    t = 2.0 * (a - lo) / delta - 1.0
    return torch.clamp((1.0 / k) * t.abs().pow(1.0 / k - 1.0), max=clamp)


def reference(x, w, b, dy, recipe, cd):
    """Output and the three gradients, written out GEMM by GEMM."""
    p1, p2, p3, p4, p5, p6 = (getattr(recipe, f"p{i}") for i in range(1, 7))
    x2d = x.reshape(-1, x.shape[-1])  # (N, in)
    dy2d = dy.reshape(-1, dy.shape[-1]).to(cd)  # (N, out)
    if recipe.occ:
        a = x2d.abs().reshape(-1).sort().values
        tau = a[math.ceil(recipe.occ_quantile * a.numel()) - 1]
        xc = torch.clamp(x2d, -tau, tau)
        y = F.linear(rq(xc, p1, -1).to(cd), rq(w, p2, -1).to(cd), b.to(cd)) + F.linear((x2d - xc).to(cd), w.to(cd))
    else:
        y = F.linear(rq(x2d, p1, -1).to(cd), rq(w, p2, -1).to(cd), b.to(cd))
    dx = rq(dy2d, p3, -1) @ rq(w, p4, 0).to(cd)  # (N, out) @ (out, in)
    dw = rq(dy2d, p5, 0).t() @ rq(x2d, p6, 0).to(cd)  # (out, N) @ (N, in)
    if recipe.dge:
        dw = dw * dge_reference(w, p2, recipe.dge_k, recipe.dge_clamp).to(dw.dtype)
    return y.reshape(*x.shape[:-1], -1), dx.reshape(x.shape).to(x.dtype), dw.to(w.dtype), dy2d.sum(0).to(b.dtype)


def nearest(recipe):
    """The recipe with stochastic rounding replaced by nearest (what the exact test compares)."""
    ops = {
        f"p{i}": (None if op is None else dataclasses.replace(op, rounding="nearest"))
        for i, op in enumerate((getattr(recipe, f"p{j}") for j in range(1, 7)), start=1)
    }
    return recipe.with_spec(**ops)


def run_layer(recipe, x, w, b, dy, *, autocast=None):
    layer = QuantLinear(w.shape[1], w.shape[0], recipe=recipe, name="blocks.0.fc", dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    xr = x.clone().requires_grad_()
    if autocast is None:
        y = layer(xr)
    else:
        with torch.autocast("cpu", dtype=autocast):
            y = layer(xr)
    y.backward(dy.to(y.dtype))
    return y, xr.grad, layer.weight.grad, layer.bias.grad


def data(shape=(3, 7, 96), out=80, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    x.view(-1)[5] = 9.0  # an outlier
    w = (torch.randn(out, shape[-1], generator=g) * 0.05).to(dtype)
    b = torch.randn(out, generator=g).to(dtype)
    dy = torch.randn(*shape[:-1], out, generator=g).to(dtype)
    return x, w, b, dy


# -------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", NAMED)
def test_output_and_all_gradients_equal_the_reference(name):
    recipe = nearest(QuantRecipe.from_name(name, block_size=32 if name in ("paper", "full") else None))
    x, w, b, dy = data()
    got = run_layer(recipe, x, w, b, dy)
    want = reference(x, w, b, dy, recipe, torch.float32)
    for g, r, what in zip(got, want, ("y", "dx", "dw", "db")):
        assert torch.equal(g, r), f"{name}: {what} differs by {(g - r).abs().max().item()}"


@pytest.mark.parametrize("block", [16, 48, "channel", "tensor", "none"])
@pytest.mark.parametrize("fmt", ["e2m1", "e3m2", "e4m3", "e5m2"])
def test_full_recipe_any_block_size_is_exact(fmt, block):
    # 48 does not divide the token count 21 or 96 evenly: padded blocks on both axes
    recipe = QuantRecipe.from_name("full", fmt=fmt, block_size=block)
    x, w, b, dy = data()
    got = run_layer(recipe, x, w, b, dy)
    want = reference(x, w, b, dy, recipe, torch.float32)
    assert all(torch.equal(g, r) for g, r in zip(got, want))


def test_bf16_recipe_is_exactly_nn_linear():
    x, w, b, dy = data()
    got = run_layer(QuantRecipe.from_name("bf16"), x, w, b, dy)
    lin = nn.Linear(96, 80)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    xr = x.clone().requires_grad_()
    y = lin(xr)
    y.backward(dy)
    for g, r in zip(got, (y, xr.grad, lin.weight.grad, lin.bias.grad)):
        assert torch.equal(g, r)


def test_excluded_layer_is_exactly_nn_linear():
    state = QuantState(QuantRecipe.from_name("full", fmt="e2m1"))
    lin = nn.Linear(96, 80)
    ref = nn.Linear(96, 80)
    ref.load_state_dict(lin.state_dict())
    QuantLinear.from_linear(lin, state, "model.lm_head")
    x = torch.randn(4, 96)
    assert lin.spec is None and torch.equal(lin(x), ref(x))


@pytest.mark.parametrize("shape", [(96,), (5, 96), (2, 3, 4, 96)])
def test_any_number_of_leading_dims(shape):
    recipe = QuantRecipe.from_name("full", fmt="e4m3", block_size=16)
    x, w, b, dy = data(shape=shape)
    got = run_layer(recipe, x, w, b, dy)
    want = reference(x, w, b, dy, recipe, torch.float32)
    assert got[0].shape == (*shape[:-1], 80) and got[1].shape == shape
    assert all(torch.equal(g, r) for g, r in zip(got, want))


@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float16])
def test_autocast_compute_dtype(cd):
    """Under autocast, operands are quantized from their own dtype and multiplied in the autocast dtype."""
    recipe = QuantRecipe.from_name("full", fmt="e4m3", block_size=32)
    x, w, b, dy = data()
    got = run_layer(recipe, x, w, b, dy, autocast=cd)
    want = reference(x, w, b, dy, recipe, cd)
    assert got[0].dtype == cd and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for g, r in zip(got, want):
        assert torch.equal(g, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(dtype):
    recipe = QuantRecipe.from_name("paper", fmt="e2m1", block_size=32)
    x, w, b, dy = data(dtype=dtype)
    got = run_layer(recipe, x, w, b, dy)
    want = reference(x, w, b, dy, recipe, dtype)
    assert all(g.dtype == dtype for g in got)
    assert all(torch.equal(g, r) for g, r in zip(got, want))


def test_requantizing_w_in_backward_gives_the_same_gradients():
    recipe = QuantRecipe.from_name("mxfp4")
    x, w, b, dy = data()
    saved = run_layer(recipe, x, w, b, dy)
    layer = QuantLinear(96, 80, state=QuantState(recipe, save_quantized_weight=False))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    xr = x.clone().requires_grad_()
    layer(xr).backward(dy)
    assert torch.equal(xr.grad, saved[1]) and torch.equal(layer.weight.grad, saved[2])


def test_input_without_grad_skips_dgrad():
    recipe = QuantRecipe.from_name("full", fmt="e4m3", block_size=32)
    x, w, b, dy = data()
    layer = QuantLinear(96, 80, recipe=recipe)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    layer(x).backward(dy)
    assert torch.equal(layer.weight.grad, reference(x, w, b, dy, recipe, torch.float32)[2])


# ------------------------------------------------------------------ DGE and OCC
def test_dge_factor_shape_of_the_curve():
    from lightning_fpq.fp4_estimators import dge_factor

    op = OperandSpec("e2m1", None)  # no scaling: the values are the scaled positions
    w = torch.tensor([[0.0, 1.0, 1.25, 1.0 + 1e-3, 3.5, 6.0, 7.0]])
    f = dge_factor(w, op, k=5.0, clamp=3.0)
    assert f[0, 0] == pytest.approx(0.2) and f[0, 1] == pytest.approx(0.2)  # on grid points: 1/k
    assert f[0, 2] == 3.0 and f[0, 4] == 3.0  # interval midpoints: clamped
    assert 0.2 < f[0, 3] < 3.0
    assert f[0, 5] == pytest.approx(0.2) and f[0, 6] == pytest.approx(0.2)  # the max; beyond it saturates


def test_dge_factor_closed_form_inside_intervals():
    """y = 2.25 lies in [2, 3] (delta 1): t = 2 * 0.25 - 1 = -0.5; y = 4.5 in [4, 6] (delta 2): t = -0.5;
    y = 0.375 in the subnormal interval [0, 0.5]: t = 0.5."""
    from lightning_fpq.fp4_estimators import dge_factor

    f = dge_factor(torch.tensor([[2.25, 4.5, -0.375]]), OperandSpec("e2m1", None), k=5.0, clamp=3.0)
    want = 0.2 * 0.5 ** (0.2 - 1.0)
    assert torch.allclose(f, torch.full_like(f, want))


def test_occ_threshold_is_the_nearest_rank_quantile():
    from lightning_fpq.fp4_estimators import occ_threshold

    x = torch.arange(1, 101, dtype=torch.float32).neg()
    assert occ_threshold(x, 0.99).item() == 99.0 and occ_threshold(x, 1.0).item() == 100.0
    g = torch.Generator().manual_seed(0)
    big = [
        torch.randn(300, 700, generator=g),  # the sampled fast path
        torch.randn(300, 700, generator=g).sort(dim=-1).values,  # structured rows
        torch.arange(210_000, dtype=torch.float32).flip(0),  # sorted: the sample bound may fail
        torch.randint(0, 5, (100_000,), generator=g).float(),  # heavy ties
        torch.zeros(70_000),
    ]
    for t in big:
        for q in (0.5, 0.99, 0.999, 1.0):
            a = t.abs().reshape(-1).sort().values
            want = a[math.ceil(q * a.numel()) - 1]
            assert occ_threshold(t, q).item() == want.item(), (t.shape, q)


# ------------------------------------------------------------------- SQNR floors
def sqnr(a, b):
    return (10 * torch.log10(b.float().pow(2).sum() / (a.float() - b.float()).pow(2).sum())).item()


# measured (x ~ N(0,1), w ~ N(0, 0.05), 3x7x96 -> 80; output SQNR in dB), floors ~1-2 dB below:
#   full e5m2/128: 24.1  e4m3/128: 29.2  e3m2/128: 23.1  e2m1/128: 11.9  mxfp4: 12.6  nvfp4: 15.3
FLOORS = [
    ("full", "e5m2", 22.0),
    ("full", "e4m3", 27.5),
    ("full", "e3m2", 21.5),
    ("full", "e2m1", 10.5),
    ("mxfp4", None, 11.0),
    ("nvfp4", None, 14.0),
    ("mxfp8", None, 27.0),
    ("fp8", None, 27.0),
]


@pytest.mark.parametrize("name, fmt, floor", FLOORS)
def test_output_sqnr_floor(name, fmt, floor):
    recipe = nearest(QuantRecipe.from_name(name, fmt=fmt))
    x, w, b, dy = data()
    got = run_layer(recipe, x, w, b, dy)
    exact = F.linear(x, w, b)
    assert sqnr(got[0], exact) > floor


# ---------------------------------------------------------------- stochastic rounding
def _layer_grads(state: QuantState, x, w, b, dy) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dW) of one step of a 96 -> 80 QuantLinear with weight ``w`` and bias ``b`` under ``state``."""
    layer = QuantLinear(96, 80, state=state, name="blocks.0.fc")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    xr = x.clone().requires_grad_()
    layer(xr).backward(dy)
    return xr.grad, layer.weight.grad


def test_stochastic_rounding_is_reproducible_from_the_seed_and_unbiased():
    recipe = QuantRecipe.from_name("nvfp4")
    x, w, b, dy = data()

    def grads(seed):
        return _layer_grads(QuantState(recipe, seed=seed), x, w, b, dy)

    a, b_ = grads(1), grads(1)
    c = grads(2)
    assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])
    assert not torch.equal(a[1], c[1])
    # unbiased: averaging many stochastic dgrads approaches the nearest-free product dY @ q4(W)
    x2d = x.reshape(-1, 96)
    exact = dy.reshape(-1, 80) @ rq(w, recipe.p4, 0)
    mean = torch.stack([grads(s)[0].reshape(-1, 96) for s in range(3, 23)]).mean(0)
    one = grads(3)[0].reshape(-1, 96)
    assert sqnr(mean, exact) > sqnr(one, exact) + 8  # 20 draws: ~13 dB less noise
    del x2d


def test_stochastic_rounding_matches_the_reference_with_the_same_generator():
    recipe = QuantRecipe.from_name("nvfp4")
    spec = recipe.default
    x, w, b, dy = data()
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    y = quant_linear(xr, wr, b, spec, generator=torch.Generator().manual_seed(7))
    y.backward(dy)
    g = torch.Generator().manual_seed(7)  # draws in GEMM order: q3 (dgrad) then q5 (wgrad)
    dy2d = dy.reshape(-1, 80)
    q3 = quantize(
        dy2d,
        "e2m1",
        block_size=16,
        axis=-1,
        scale_format="e4m3",
        rounding="stochastic",
        generator=g,
        backend="reference",
    )
    q5 = quantize(
        dy2d,
        "e2m1",
        block_size=16,
        axis=0,
        scale_format="e4m3",
        rounding="stochastic",
        generator=g,
        backend="reference",
    )
    assert torch.equal(xr.grad.reshape(-1, 96), q3 @ rq(w, recipe.p4, 0))
    assert torch.equal(wr.grad, q5.t() @ rq(x.reshape(-1, 96), recipe.p6, 0))


@pytest.mark.parametrize("backend", ["emulated", "compiled"])
def test_philox_noise_matches_the_reference_on_every_cpu_backend(backend):
    # rng="philox": the layer draws from a PhiloxGenerator; the compiled quantizer computes the
    # draws in its loop, the reference in torch, from the same counters (q3 then q5, in order).
    from lightning_fpq import backends
    from lightning_fpq.philox import PhiloxGenerator

    ok, reason = backends.available(backend, "cpu")
    if not ok:
        pytest.skip(reason)
    recipe = QuantRecipe.from_name("nvfp4")
    x, w, b, dy = data()
    state = QuantState(recipe, seed=11, rng="philox", backend=backend)
    dx, dw = _layer_grads(state, x, w, b, dy)
    gen = state.generator("blocks.0.fc", x.device)
    assert isinstance(gen, PhiloxGenerator) and gen.offset == 2 * dy.numel()  # q3 and q5 drew dY's size each
    ref = PhiloxGenerator(gen.initial_seed())
    dy2d = dy.reshape(-1, 80)
    kw = dict(block_size=16, scale_format="e4m3", rounding="stochastic", generator=ref, backend="reference")
    q3 = quantize(dy2d, "e2m1", axis=-1, **kw)
    q5 = quantize(dy2d, "e2m1", axis=0, **kw)
    assert torch.equal(dx.reshape(-1, 96), q3 @ rq(w, recipe.p4, 0))
    assert torch.equal(dw, q5.t() @ rq(x.reshape(-1, 96), recipe.p6, 0))


def test_rng_must_be_torch_or_philox():
    with pytest.raises(ValueError, match=r"rng='cuda' is not valid: expected one of \('torch', 'philox'\)"):
        QuantState("nvfp4", rng="cuda")


# ------------------------------------------------------------------- conversion
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))
        self.lm_head = nn.Linear(32, 16, bias=False)

    def forward(self, idx):
        h = self.emb(idx)
        for blk in self.blocks:
            h = h + blk(h)
        return self.lm_head(h)


def test_conversion_keeps_parameters_and_state_dict_keys():
    model = Tiny()
    params = dict(model.named_parameters())
    keys = list(model.state_dict().keys())
    state = QuantState("paper")
    converted, skipped = convert_linears(model, state)
    assert converted == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"] and skipped == []
    assert type(model.lm_head) is nn.Linear  # excluded by default
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict().keys()) == keys
    # a plain model loads the converted model's checkpoint and vice versa
    plain = Tiny()
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())
    # idempotent
    assert convert_linears(model, state)[0] == converted


def test_subclasses_are_skipped_not_broken():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(4, 4), nn.Linear(4, 4))
    converted, skipped = convert_linears(model, QuantState("paper"))
    assert converted == ["1"] and skipped == ["0"] and type(model[0]) is MyLinear


def test_recipe_switch_takes_effect_at_the_next_call():
    model = Tiny()
    state = QuantState("bf16")
    convert_linears(model, state, only_included=True)
    idx = torch.randint(0, 16, (2, 8))
    plain = Tiny()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(idx), plain(idx))
    state.set_recipe(QuantRecipe.from_name("full", fmt="e2m1", block_size=16))
    assert not torch.equal(model(idx), plain(idx))
    state.set_recipe("bf16")
    assert torch.equal(model(idx), plain(idx))


def test_per_layer_rules_apply():
    model = Tiny()
    recipe = QuantRecipe.from_name("full", fmt="e2m1", rules=[LayerRule("blocks.0.*", recipe="bf16")])
    state = QuantState(recipe)
    convert_linears(model, state)
    assert model.blocks[0][0].spec.is_identity
    assert model.blocks[1][0].spec.p1.fmt == FPFormat.parse("e2m1")
    assert "quant=P1=e2m1/128" in repr(model.blocks[1][0])


# ------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    recipe = QuantRecipe.from_name("full", fmt="e4m3", block_size=32)
    x, w, b, dy = data()
    eager = run_layer(recipe, x, w, b, dy)
    layer = QuantLinear(96, 80, recipe=recipe, name="blocks.0.fc")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    compiled = torch.compile(layer)
    xr = x.clone().requires_grad_()
    y = compiled(xr)
    y.backward(dy)
    # quantized operands are bit-identical; inductor may fuse the bias add differently
    torch.testing.assert_close(y, eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad, eager[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, eager[2], rtol=1e-5, atol=1e-5)
    # a recipe switch is seen by the compiled module
    layer._fpq_state.set_recipe("bf16")
    torch.testing.assert_close(compiled(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_no_grad_forward_equals_the_training_forward():
    recipe = QuantRecipe.from_name("fp4")
    x, w, b, dy = data()
    train = run_layer(recipe, x, w, b, dy)[0]
    layer = QuantLinear(96, 80, recipe=recipe, name="blocks.0.fc")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        assert torch.equal(layer(x), train)


def test_weight_cache_quantizes_w_once_per_weight_version(monkeypatch):
    import lightning_fpq.linear_function as lin

    recipe = QuantRecipe.from_name("full", fmt="e4m3", block_size=32)
    x, w, b, dy = data()
    layer = QuantLinear(96, 80, state=QuantState(recipe, cache_weights=True), name="blocks.0.fc")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    calls = []
    real = lin.quantize_pair
    monkeypatch.setattr(lin, "quantize_pair", lambda t, *a, **k: calls.append(t) or real(t, *a, **k))
    grads = []
    for _ in range(2):  # two micro-batches, no optimizer step in between
        xr = x.clone().requires_grad_()
        layer(xr).backward(dy)
        grads.append(xr.grad)
    assert sum(t is layer.weight for t in calls) == 1  # W quantized once for both
    want = reference(x, w, b, dy, recipe, torch.float32)
    assert torch.equal(grads[0], want[1]) and torch.equal(grads[1], want[1])
    with torch.no_grad():
        layer.weight.mul_(0.5)  # an in-place update (as an optimizer step) invalidates the cache
    layer.weight.grad = None
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(dy)
    assert sum(t is layer.weight for t in calls) == 2
    want = reference(x, w * 0.5, b, dy, recipe, torch.float32)
    assert torch.equal(y, want[0]) and torch.equal(xr.grad, want[1]) and torch.equal(layer.weight.grad, want[2])


# ------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("recipe", ["paper", "full", "fp8", "fp4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("rows", [(0.005, 4096), (0.03, 4096), (0.03, 40_000)])  # the CPU sampling path too
def test_nan_stays_where_it_was_in_every_recipe(recipe, rows):
    fraction, n = rows
    torch.manual_seed(0)
    layer = QuantLinear(64, 32, recipe=recipe)
    layer.weight.requires_grad_(False)
    x = torch.randn(n, 64)
    bad = torch.rand(n) < fraction
    x[bad] = math.nan  # whole rows of NaN (a poisoned sample)
    with torch.no_grad():
        y = layer(x)
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()


def test_occ_threshold_is_the_quantile_of_the_values_that_are_not_nan():
    from lightning_fpq.fp4_estimators import occ_threshold

    torch.manual_seed(0)
    for n in (1000, 100_000):
        x = torch.randn(n)
        with_nan = torch.cat([x, torch.full((n // 20,), math.nan)])[torch.randperm(n + n // 20)]
        assert occ_threshold(with_nan, 0.99) == occ_threshold(x, 0.99)
        k = math.ceil(0.99 * n)
        assert occ_threshold(x, 0.99) == x.abs().sort().values[k - 1]
    assert torch.isnan(occ_threshold(torch.full((8,), math.nan), 0.99))


# ----------------------------------------------------------- Hugging Face's Conv1D (GPT-2)
class Conv1D(nn.Module):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, as GPT-2 uses it: weight ``(in, out)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


@pytest.mark.parametrize("recipe", ["paper", "full", "mxfp4"])
def test_hf_conv1d_is_converted_like_a_linear_layer(recipe):
    from lightning_fpq.linear import QuantGemm, restore_linears

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(80, 96))
    weight, keys = model[0].weight, list(model.state_dict())
    state = QuantState(recipe)
    assert "\n0      80x96 " in state.recipe.describe(model)  # listed as (out x in), before and after
    converted, skipped = convert_linears(model, state)
    assert "\n0      80x96 " in state.recipe.describe(model)
    assert converted == ["0"] and not skipped and isinstance(model[0], QuantGemm)
    assert model[0].weight is weight and list(model.state_dict()) == keys
    # the same layer as a QuantLinear with W transposed: bit-identical output and gradients
    linear = QuantLinear(96, 80, recipe=recipe, name="0")
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        linear.bias.copy_(model[0].bias)
    x = torch.randn(3, 5, 96)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), linear(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(weight.grad, linear.weight.grad.t()) and torch.equal(model[0].bias.grad, linear.bias.grad)
    assert restore_linears(model) == ["0"] and type(model[0]) is Conv1D


def test_a_packed_operand_saved_for_backward_keeps_no_tensor_on_ctx():
    # NVFP4's E4M3 scale bytes and tensor scale must go through save_for_backward like the
    # codes and scales, or saved-tensor hooks (save_on_cpu, checkpointing) would miss them
    import dataclasses as dc

    import torch

    from lightning_fpq.linear_function import _join_packed, _split_packed
    from lightning_fpq.packing import pack

    packed = pack(torch.randn(8, 64), "e2m1", block_size=16, scale_format="e4m3")
    assert packed.scale_bytes is not None and packed.tensor_scale is not None
    tensors, layout = _split_packed(packed, torch.float32)
    assert not any(isinstance(getattr(layout, f.name), torch.Tensor) for f in dc.fields(layout))
    joined = _join_packed(tensors, layout)
    for f in dc.fields(packed):
        a, b = getattr(packed, f.name), getattr(joined, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    dense, no_layout = _split_packed(torch.ones(2, 3, dtype=torch.float64), torch.float32)
    assert no_layout is None and _join_packed(dense, no_layout).dtype == torch.float32
