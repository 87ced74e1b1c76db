"""Backends: capability checks, the automatic choice per stage, forced backends, and the
Transformer Engine glue (against a stand-in module: TE itself needs an NVIDIA GPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from lightning_fpq import backends
from lightning_fpq.backends.transformer_engine import TE_RECIPE_MAPPING, te_format
from lightning_fpq.recipe import LayerSpec, OperandSpec, QuantRecipe


def spec_of(name: str, **kw) -> LayerSpec:
    return QuantRecipe.from_name(name, **kw).layer_spec("blocks.0.fc")


def test_every_check_returns_a_flag_and_a_reason():
    for check in (backends.REGISTRY[name].machine_available for name in backends.LAYER_BACKENDS):
        ok, reason = check()
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert backends.machine_available("emulated")[0]


@pytest.mark.parametrize("interpret", [False, True])
def test_a_triton_older_than_the_kernels_need_is_refused_with_the_floor(monkeypatch, interpret):
    # torch 2.6 brings triton 3.2, which cannot compile the kernels (they need 3.6): say so, on
    # a GPU and under the interpreter, instead of failing inside Triton at the first launch.
    triton = pytest.importorskip("triton")
    from lightning_fpq.kernels import capability

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setattr(capability.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(capability.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(capability.torch.cuda, "get_device_name", lambda *a: "stand-in H100")
    capability._triton_available.cache_clear()
    try:
        ok, reason = capability._triton_available(interpret)
    finally:
        capability._triton_available.cache_clear()
    assert not ok and "triton 3.2.0" in reason and ">= 3.6" in reason


def test_transformer_engine_without_a_gpu_says_how_to_get_it():
    ok, reason = backends.machine_available("transformer_engine")
    if not torch.cuda.is_available():
        assert not ok and ("lightning-fpq[te]" in reason or "NVIDIA" in reason)


def test_every_backend_resolves_to_a_quantizer_and_a_gemm():
    lines = backends.describe_composition().splitlines()
    assert [line.split()[0] for line in lines] == list(backends.LAYER_BACKENDS)
    assert all("quantizer: " in line and "; GEMM: " in line for line in lines)
    assert "packed FP4" in lines[backends.LAYER_BACKENDS.index("triton")]


def test_report_has_one_line_per_backend():
    report = backends.describe_backends(torch.device("cpu")).splitlines()
    assert [line.split("  ")[0].strip() for line in report] == [
        "emulated",
        "compiled",
        "triton",
        "torchao_float8",
        "FP8 GEMM on cpu",
        "transformer_engine",
    ]
    assert all(" yes " in line or " no " in line for line in report)


def test_names_and_aliases():
    assert backends.check_backend("torchao") == "torchao_float8"
    assert backends.check_backend(" TE ") == "transformer_engine"
    assert set(backends.BACKENDS) == {"auto", "emulated", "compiled", "triton", "torchao_float8", "transformer_engine"}
    with pytest.raises(ValueError, match=r"backend='cuda' is not valid.*'triton'"):
        backends.check_backend("cuda")


def test_auto_on_cpu_takes_the_compiled_quantizer_for_every_recipe():
    expected = "compiled" if backends.available("compiled", "cpu")[0] else "emulated"
    for name in ("paper", "full", "fp8", "fp4", "nvfp4", "mxfp4", "mxfp8"):
        backend, reason = backends.choose("auto", spec_of(name), torch.device("cpu"))
        assert backend == expected and reason, name


@pytest.fixture
def gpu_machine(monkeypatch):
    """A CUDA machine on which every backend is installed (``off`` lists those that are not)."""
    off: set[str] = set()

    def available(backend):
        if backend in off:
            return False, f"{backend} is off in this test"
        return True, f"{backend} here"

    for name, module in backends.REGISTRY.items():
        monkeypatch.setattr(module, "device_available", lambda device_type, name=name: available(name))
        monkeypatch.setattr(module, "machine_available", lambda name=name: available(name))
        monkeypatch.setattr(module, "worth_auto", lambda device: (True, ""))
    return off


def test_auto_order_on_a_gpu(gpu_machine):
    cuda = torch.device("cuda")

    def pick(spec):
        return backends.choose("auto", spec, cuda)[0]

    assert pick(spec_of("fp8")) == "torchao_float8"  # tensorwise fp8: real FP8 GEMMs
    assert pick(spec_of("fp8", block_size="channel")) == "torchao_float8"  # rowwise
    assert pick(spec_of("mxfp4")) == "triton"  # packed FP4 GEMMs
    assert pick(spec_of("mxfp8")) == "triton"  # neither torchao nor TE computes it exactly
    assert pick(spec_of("paper", fmt="e2m1")) == "triton"
    gpu_machine.add("torchao_float8")
    assert pick(spec_of("fp8")) == "transformer_engine"
    assert pick(spec_of("fp8", block_size="channel")) == "triton"  # TE maps tensorwise only
    gpu_machine.update({"transformer_engine", "triton"})
    assert pick(spec_of("fp8")) == "emulated"


def test_a_forced_backend_that_cannot_compute_a_stage_leaves_it_to_auto(gpu_machine):
    backend, reason = backends.choose("torchao", spec_of("mxfp4"), torch.device("cuda"))
    assert backend == "triton"
    assert "torchao_float8 cannot compute this spec exactly" in reason and "e2m1" in reason
    assert backends.choose("torchao", spec_of("fp8"), torch.device("cuda"))[0] == "torchao_float8"
    gpu_machine.add("triton")
    with pytest.raises(backends.BackendUnavailableError, match="backend='triton' cannot run on device type 'cuda'"):
        backends.choose("triton", spec_of("mxfp4"), torch.device("cuda"))


def test_which_gemms_run_on_the_fp4_kernel():
    assert backends.triton.fp4_gemms(spec_of("mxfp4")) == (True, True, True)
    assert backends.triton.fp4_gemms(spec_of("nvfp4")) == (True, True, True)  # stochastic dY is fine
    assert backends.triton.fp4_gemms(spec_of("fp4")) == (True, False, False)  # only X and W quantized
    assert backends.triton.fp4_gemms(spec_of("paper", fmt="e2m1")) == (False, False, False)  # one operand a GEMM
    assert backends.triton.fp4_gemms(spec_of("mxfp4", block_size=24)) == (False, False, False)  # not a power of two
    assert backends.triton.fp4_gemms(spec_of("mxfp8")) == (False, False, False)
    mixed = LayerSpec(OperandSpec("e2m1", 32), OperandSpec("e2m1", 64))
    assert backends.triton.fp4_gemms(mixed) == (False, False, False)  # the two operands' blocks differ


def test_transformer_engine_mapping():
    assert te_format(spec_of("fp8"))[0] == "HYBRID"
    e4m3 = OperandSpec("e4m3", "tensor")
    assert te_format(LayerSpec(*(e4m3,) * 6))[0] == "E4M3"
    assert te_format(spec_of("fp8", block_size="channel"))[0] is None
    assert te_format(spec_of("mxfp8"))[0] is None
    assert "forward format" in te_format(spec_of("fp8", fmt="e5m2"))[1]
    for te_recipe, (ours, why) in TE_RECIPE_MAPPING.items():
        assert why
        if ours is not None:
            assert ours.split()[0] in ("fp8", "custom:"), te_recipe


# ------------------------------------------------------- Transformer Engine glue, stand-in TE
class _StandInLinear(nn.Module):
    """What lightning-fpq relies on in ``te.Linear`` (TE 2.20, module/linear.py): forward reads
    ``self.weight``, and inside ``te.autocast`` quantizes with the active recipe's formats."""

    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__()
        assert device == "meta" and bias is False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))

    def forward(self, x):
        from lightning_fpq.linear_function import quant_linear

        fmt = _STATE["recipe"].fp8_format
        dy = "e5m2" if fmt == "HYBRID" else "e4m3"
        ops = [OperandSpec("e4m3", "tensor")] * 6
        ops[2] = ops[4] = OperandSpec(dy, "tensor")
        _STATE["calls"] += 1
        return quant_linear(x, self.weight, None, LayerSpec(*ops), backend="emulated")


_STATE: dict = {}


@pytest.fixture
def stand_in_te(monkeypatch):
    import contextlib

    from lightning_fpq.backends import transformer_engine as te_linear

    te = types.ModuleType("transformer_engine")
    te_pt = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = types.SimpleNamespace(HYBRID="HYBRID", E4M3="E4M3")
    recipe.MMParams = lambda use_split_accumulator: ("split", use_split_accumulator)
    exact = types.SimpleNamespace(power_2_scale=False, amax_epsilon=0.0)  # TE's QParams without the env variable
    recipe.Float8CurrentScaling = lambda **kw: types.SimpleNamespace(
        fp8_quant_fwd_inp=exact, fp8_quant_fwd_weight=exact, fp8_quant_bwd_grad=exact, **kw
    )

    @contextlib.contextmanager
    def autocast(enabled, recipe):
        _STATE["recipe"] = recipe
        yield

    te_pt.Linear, te_pt.autocast = _StandInLinear, autocast
    te.pytorch, te.common, common.recipe = te_pt, common, recipe
    for name, mod in (
        ("transformer_engine", te),
        ("transformer_engine.pytorch", te_pt),
        ("transformer_engine.common", common),
        ("transformer_engine.common.recipe", recipe),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(te_linear, "TE_DEVICE_TYPES", ("cuda", "cpu"))
    te_linear._recipe.cache_clear()
    _STATE.clear()
    _STATE["calls"] = 0
    yield
    te_linear._recipe.cache_clear()


def test_te_backend_shares_the_layers_parameters(stand_in_te):
    from lightning_fpq.linear import QuantLinear
    from lightning_fpq.linear_function import quant_linear

    torch.manual_seed(0)
    layer = QuantLinear(32, 16, recipe="fp8")
    keys = list(layer.state_dict())
    x = torch.randn(4, 8, 32, requires_grad=True)
    y = quant_linear(x, layer.weight, layer.bias, layer.spec, backend="transformer_engine")
    y.sum().backward()
    assert _STATE["calls"] == 1
    rec = _STATE["recipe"]
    assert rec.fp8_format == "HYBRID" and rec.use_power_2_scales is False
    assert rec.fp8_gemm_fprop == ("split", True)
    assert layer.weight.grad is not None and layer.bias.grad is not None  # our Parameters, through TE
    assert list(layer.state_dict()) == keys
    # the same maths as the emulated backend, bias added outside TE
    x2 = x.detach().clone().requires_grad_()
    layer2 = QuantLinear(32, 16, recipe="fp8")
    layer2.load_state_dict(layer.state_dict())
    y2 = quant_linear(x2, layer2.weight, layer2.bias, layer2.spec, backend="emulated")
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(layer.weight.grad, layer2.weight.grad)


def test_te_backend_keeps_one_hidden_module_per_layer(stand_in_te, monkeypatch):
    from lightning_fpq.linear import QuantLinear

    layer = QuantLinear(32, 16, recipe="fp8")
    # as if chosen on a GPU
    monkeypatch.setattr(layer._fpq_state, "layer_backend", lambda name, device: "transformer_engine")
    for _ in range(3):  # a second call must find the first call's module
        layer(torch.randn(8, 32)).sum().backward()
    assert _STATE["calls"] == 3
    hidden = layer._fpq_backend_state["te_linear"]
    assert hidden.weight is layer.weight and "te_linear" not in str(list(layer.state_dict()))
    assert not any(m is hidden for m in layer.modules())


def test_te_settings_that_change_the_maths_are_refused(monkeypatch):
    from lightning_fpq.backends import transformer_engine as te_linear

    monkeypatch.delenv("NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES", raising=False)
    monkeypatch.delenv("NVTE_BACKWARD_OVERRIDE", raising=False)
    assert te_linear.te_settings_problem() is None
    monkeypatch.setenv("NVTE_BACKWARD_OVERRIDE", "high_precision")
    assert "unquantized" in te_linear.te_settings_problem()
    monkeypatch.setenv("NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES", "1")
    assert "powers of two" in te_linear.te_settings_problem()


def test_te_backend_hands_shapes_it_cannot_take_to_the_fused_path(stand_in_te):
    from lightning_fpq.linear import QuantLinear
    from lightning_fpq.linear_function import quant_linear

    layer = QuantLinear(24, 16, recipe="fp8")  # in_features % 16 != 0
    x = torch.randn(8, 24)
    y = quant_linear(x, layer.weight, layer.bias, layer.spec, backend="transformer_engine")
    assert _STATE["calls"] == 0
    assert torch.equal(y, quant_linear(x, layer.weight, layer.bias, layer.spec, backend="emulated"))


# ------------------------------------------------------------------- GPU only (skip here)
def _step_on(backend: str, recipe: str, *, shape=(4, 256, 512), out_features=384):
    """Forward + backward of one QuantLinear on CUDA under bf16 autocast: (y, dX, dW, db)."""
    from lightning_fpq.linear import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear(shape[-1], out_features, recipe=recipe).cuda()
    layer._fpq_state.set_backend(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).cuda().requires_grad_()
    dy = torch.randn(*shape[:-1], out_features, generator=g).cuda()  # fixed: both backends requantize the same dY
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    assert layer._fpq_state.layer_backend(layer._fpq_name, x.device) == backend
    return [t.float() for t in (y, x.grad, layer.weight.grad, layer.bias.grad)]


def _close_to_emulated(backend: str, recipe: str, rel: float) -> None:
    """Same quantized operands, different GEMM rounding: every result within ``rel`` of the
    emulated backend's, relative to its largest magnitude (bf16 outputs: rel >= 2**-8)."""
    for name, a, b in zip(("y", "dX", "dW", "db"), _step_on("emulated", recipe), _step_on(backend, recipe)):
        err = float((a - b).abs().max() / a.abs().max())
        assert err <= rel, f"{backend} {recipe} {name}: max relative difference {err:.2e} > {rel}"


@pytest.mark.gpu
@pytest.mark.skipif(not backends.fp8_gemm_available("cuda")[0], reason=backends.fp8_gemm_available("cuda")[1])
@pytest.mark.parametrize("recipe", ["fp8", "mxfp4", "nvfp4"])
def test_gpu_auto_takes_the_fast_path_and_matches_emulated(recipe):
    backend = backends.choose("auto", QuantRecipe.from_name(recipe).layer_spec("fc"), torch.device("cuda"))[0]
    assert backend == ("torchao_float8" if recipe == "fp8" else "triton")
    _close_to_emulated(backend, recipe, rel=2**-7)


@pytest.mark.gpu
@pytest.mark.skipif(
    not backends.available("transformer_engine", "cuda")[0], reason=backends.available("transformer_engine", "cuda")[1]
)
def test_gpu_transformer_engine_backend_matches_emulated():
    _close_to_emulated("transformer_engine", "fp8", rel=2**-7)
