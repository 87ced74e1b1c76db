"""The torchao_float8 backend on shapes ``torch._scaled_mm`` refuses (K or N not a multiple of 16).

On a CPU torchao emulates its FP8 GEMMs and takes any shape, so the refusal only shows where
real FP8 GEMMs run. These tests make torchao take its real path on CPU tensors: the FP8 GEMM
capability is patched to "yes" and ``torch._scaled_mm`` is replaced by a stand-in that refuses
what the real one refuses (K % 16 or N % 16 of its operands) and otherwise multiplies the FP8
operands exactly (integer arithmetic, so no order of summation can change a result) before
applying the scales and rounding once to the requested dtype.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_fpq import backends
from lightning_fpq.backends import torchao_float8
from lightning_fpq.linear import QuantLinear
from lightning_fpq.recipe import QuantRecipe

pytestmark = pytest.mark.skipif(
    not backends.machine_available("torchao")[0], reason=backends.machine_available("torchao")[1]
)

# the smallest FP8 step, 2**-9 (e4m3) and 2**-16 (e5m2): FP8 values times 2**shift are integers
_SHIFT = {torch.float8_e4m3fn: 9, torch.float8_e5m2: 16}


def _exact_fp8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two FP8 matrices in float64, from an exact int64 product."""
    sa, sb = _SHIFT[a.dtype], _SHIFT[b.dtype]
    ai = (a.double() * 2.0**sa).long()
    bi = (b.double() * 2.0**sb).long()
    return (ai @ bi).double() * 2.0 ** -(sa + sb)


def _fake_scaled_mm(calls: list, strict: bool):
    def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        calls.append((tuple(a.shape), tuple(b.shape)))
        if strict and (a.shape[1] % 16 or b.shape[1] % 16):
            # torch._scaled_mm's own check (K = a.shape[1], N = b.shape[1])
            raise RuntimeError(f"mat1 {tuple(a.shape)} @ mat2 {tuple(b.shape)}: K and N must be divisible by 16")
        assert bias is None and scale_result is None
        out = _exact_fp8_mm(a, b) * scale_a.double() * scale_b.double()
        return out.to(out_dtype)

    return scaled_mm


@pytest.fixture
def fp8_gemms(monkeypatch):
    """Real-FP8-GEMM mode on CPU; returns a function that installs a strict or lenient
    ``torch._scaled_mm`` and gives the list of its calls."""
    monkeypatch.setattr(torchao_float8, "fp8_gemm_available", lambda *a, **k: (True, "patched: FP8 GEMMs"))
    monkeypatch.setattr(torchao_float8, "_LOGGED", set(), raising=False)

    def install(strict: bool) -> list:
        calls: list = []
        monkeypatch.setattr(torch, "_scaled_mm", _fake_scaled_mm(calls, strict))
        return calls

    return install


def _step(shape, block, *, autocast=False):
    """One forward/backward of a torchao-backed layer: (y, dX, dW, db)."""
    tokens, d_in, d_out = shape
    torch.manual_seed(0)
    layer = QuantLinear(d_in, d_out, recipe=QuantRecipe.from_name("fp8", block_size=block))
    layer._fpq_state.set_backend("torchao")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_in, generator=g)
    if tokens % 3 == 0:  # a 3-D input where the token count allows it: (3, tokens / 3, in)
        x = x.reshape(3, tokens // 3, d_in)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    assert layer._fpq_state.layer_backend(layer._fpq_name, x.device) == "torchao_float8"
    return y, x.grad, layer.weight.grad, layer.bias.grad


UNALIGNED = [(30, 64, 48), (32, 24, 48), (32, 64, 40), (45, 24, 40)]  # tokens, in, out


@pytest.mark.parametrize("block", ["tensor", "channel"])
@pytest.mark.parametrize("shape", UNALIGNED, ids=str)
def test_unaligned_shapes_run_padded_and_equal_the_unpadded_product(fp8_gemms, monkeypatch, shape, block):
    strict_calls = fp8_gemms(strict=True)
    padded = _step(shape, block)
    assert len(strict_calls) == 3 and all(a[1] % 16 == 0 and b[1] % 16 == 0 for a, b in strict_calls)
    # the same call without padding, on a _scaled_mm that takes any shape: the zeros added must
    # change no FP8 value, no scale and no sum
    lenient_calls = fp8_gemms(strict=False)
    monkeypatch.setattr(torchao_float8, "padding_plan", lambda *s: torchao_float8.Padding(0, 0, (False,) * 3))
    unpadded = _step(shape, block)
    assert any(a[1] % 16 or b[1] % 16 for a, b in lenient_calls)
    for name, p, u in zip(("y", "dX", "dW", "db"), padded, unpadded):
        assert p.shape == u.shape and torch.equal(p, u), name


def test_unaligned_shapes_under_bf16_autocast(fp8_gemms):
    fp8_gemms(strict=True)
    y, dx, dw, db = _step((45, 24, 40), "channel", autocast=True)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 15, 40) and dx.shape == (3, 15, 24) and dw.shape == (40, 24)


def test_aligned_shapes_are_not_padded(fp8_gemms):
    calls = fp8_gemms(strict=True)
    _step((48, 64, 32), "tensor")
    assert calls == [((48, 64), (64, 32)), ((48, 32), (32, 64)), ((32, 48), (48, 64))]


def test_padding_is_logged_once_per_layer_shape(fp8_gemms, caplog):
    fp8_gemms(strict=True)
    with caplog.at_level(logging.WARNING, logger=torchao_float8.__name__):
        _step((32, 24, 48), "tensor")
        _step((32, 24, 48), "tensor")
        _step((30, 64, 48), "tensor")
        _step((29, 64, 48), "tensor")
    messages = [r.getMessage() for r in caplog.records if r.name == torchao_float8.__name__]
    assert len(messages) == 2, messages
    assert "in_features +8" in messages[0] and "tokens of the wgrad GEMM" in messages[1]


def test_padding_plan_covers_all_three_gemms():
    plan = torchao_float8.padding_plan
    assert not plan(32, 64, 48).needed
    assert plan(30, 64, 48) == (0, 0, (False, False, True))  # wgrad: K = tokens
    assert plan(32, 24, 48) == (8, 0, (False, False, False))  # forward K, dgrad/wgrad N = in
    assert plan(32, 64, 40) == (0, 8, (False, False, False))  # forward N, dgrad K = out
    assert plan(1, 1, 1) == (15, 15, (False, False, True))


def test_supports_names_the_padding_for_a_call_shape():
    spec = QuantRecipe.from_name("fp8").layer_spec("fc")
    ok, reason = backends.supports("torchao", spec, (32, 64, 48))
    assert ok and "padded" not in reason
    ok, reason = backends.supports("torchao", spec, (1000, 24, 40))
    assert ok and "in_features +8" in reason and "out_features +8" in reason and "tokens" in reason
    ok, reason = backends.supports("torchao", QuantRecipe.from_name("mxfp4").layer_spec("fc"), (1000, 24, 40))
    assert not ok and "padded" not in reason


def test_emulated_fp8_takes_any_shape_unpadded():
    # no FP8 GEMMs here: torchao's fp32 emulation, no padding, no log
    if torchao_float8.fp8_gemm_available("cpu")[0]:
        pytest.skip("this device has FP8 GEMMs")
    y, dx, dw, db = _step((45, 24, 40), "tensor")
    assert y.shape == (3, 15, 40) and dw.shape == (40, 24)
