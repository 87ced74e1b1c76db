"""Which FP4 GEMM path runs on which GPU, decided from the recipe and the compute capability
alone (no scale value is read, so no host synchronisation), and the rule that keeps the
``triton`` layer backend from taking a path expected to be slower than fake quantization plus
the compute-dtype GEMM. Pure functions: checked here for every capability without a GPU."""

from __future__ import annotations

import pytest

from lightning_fpq.backends import triton as triton_backend
from lightning_fpq.kernels.gemm_fp4 import choose_path
from lightning_fpq.recipe import QuantRecipe

AMPERE, ADA, HOPPER, BLACKWELL, BLACKWELL_12 = (8, 0), (8, 9), (9, 0), (10, 0), (12, 0)

# (block length, scale format) -> path per capability: None (interpreter), sm_80, 89, 90, 100, 120
PATHS = {
    (32, "e8m0"): ("bf16", "bf16", "fp8", "dot_scaled", "dot_scaled", "dot_scaled"),
    (32, "fp32"): ("bf16", "bf16", "fp8", "fp8", "fp8", "fp8"),
    (16, "e4m3"): ("bf16", "bf16", "bf16", "bf16", "dot_scaled", "dot_scaled"),  # NVFP4: native on sm_100+
    (16, "e8m0"): ("bf16",) * 6,
    (128, "fp32"): ("bf16", "bf16", "fp8", "fp8", "fp8", "fp8"),
    (128, "e8m0"): ("bf16", "bf16", "fp8", "fp8", "fp8", "fp8"),
    (4096, "fp32"): ("bf16", "bf16", "fp8", "fp8", "fp8", "fp8"),  # a "channel" block of K = 4096
}
CAPS = (None, AMPERE, ADA, HOPPER, BLACKWELL, BLACKWELL_12)


@pytest.mark.parametrize("operands", list(PATHS), ids=str)
def test_gemm_path_per_capability(operands):
    block, scale_format = operands
    got = tuple(choose_path(block, scale_format, cc)[0] for cc in CAPS)
    assert got == PATHS[operands]


def test_gemm_path_reasons_name_the_device():
    path, reason = choose_path(32, "e8m0", HOPPER)
    assert path == "dot_scaled" and "sm_90" in reason and "wgmma" in reason
    assert "native" in choose_path(32, "e8m0", BLACKWELL)[1]
    path, reason = choose_path(16, "e4m3", BLACKWELL)
    assert path == "dot_scaled" and "E4M3" in reason and "sm_100" in reason


def spec_of(name: str, **kw):
    return QuantRecipe.from_name(name, **kw).layer_spec("fc")


# recipe -> packed FP4 GEMMs (forward, dgrad, wgrad) per capability: interpreter, sm_89, 90, 100
PACKED = {
    "mxfp4": ((True,) * 3, (False,) * 3, (False,) * 3, (True,) * 3),
    "nvfp4": ((True,) * 3, (False,) * 3, (False,) * 3, (True,) * 3),  # e4m3 scales, B=16: dot_scaled on sm_100
    "fp4": ((True, False, False), (False,) * 3, (False,) * 3, (False,) * 3),  # channel blocks, fp32 scales
    "paper": ((False,) * 3,) * 4,  # no GEMM has two E2M1 operands
}


@pytest.mark.parametrize("recipe", list(PACKED))
def test_layer_takes_packed_fp4_gemms_only_where_they_pay(monkeypatch, recipe):
    """sm_100+ runs MXFP4 on the FP4 tensor cores; everywhere else (Hopper included) the layer
    multiplies the fake-quantized operands with the compute-dtype GEMM (cuBLAS), which no FP4
    path there is expected to beat. The interpreter takes every packed GEMM (tests)."""
    spec = spec_of(recipe)
    got = []
    for cc in (None, ADA, HOPPER, BLACKWELL):
        monkeypatch.setattr(triton_backend, "_device_cc", lambda cc=cc: cc)
        got.append(triton_backend.fp4_plan(spec, (8192, 4096, 4096)))
    assert tuple(got) == PACKED[recipe]


def test_the_rule_says_why():
    mx = spec_of("mxfp4").input
    ok, reason = triton_backend.packed_gemm_pays(mx, mx, HOPPER)
    assert not ok and "sm_90" in reason and "'dot_scaled'" in reason and "fake-quantized operands" in reason
    ok, reason = triton_backend.packed_gemm_pays(mx, mx, BLACKWELL)
    assert ok and "native" in reason
    nv = spec_of("nvfp4").input
    ok, reason = triton_backend.packed_gemm_pays(nv, nv, BLACKWELL)
    assert ok and "E4M3" in reason
    ok, reason = triton_backend.packed_gemm_pays(nv, nv, HOPPER)
    assert not ok and "'bf16'" in reason


@pytest.mark.parametrize("other", [{"scale_format": "fp32"}, {"scale_format": "e8m0"}], ids=str)
def test_nvfp4_on_blackwell_packs_only_a_gemm_that_runs_on_dot_scaled(other):
    """B=16 operands whose scale formats differ (or are not e4m3 on both sides) run the
    GEMM's bf16 path, which is not expected to pay: the layer keeps them fake-quantized."""
    import dataclasses

    nv = spec_of("nvfp4").input
    mixed = dataclasses.replace(nv, **other)
    for a, b in ((nv, mixed), (mixed, nv), (mixed, mixed)):
        ok, reason = triton_backend.packed_gemm_pays(a, b, BLACKWELL)
        assert not ok and "'bf16'" in reason, (a.scale_format, b.scale_format)


def test_supports_names_the_rule_for_a_call(monkeypatch):
    monkeypatch.setattr(triton_backend, "_device_cc", lambda: HOPPER)
    assert triton_backend.supports(spec_of("mxfp4"), (64, 64, 64)) == (
        True,
        "fused quantizer; GEMMs in the compute dtype",
    )
    monkeypatch.setattr(triton_backend, "_device_cc", lambda: BLACKWELL)
    ok, reason = triton_backend.supports(spec_of("mxfp4"), (64, 64, 64))
    assert ok and "packed FP4 GEMM for forward/dgrad/wgrad" in reason
