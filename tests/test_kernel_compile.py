"""Every Triton kernel launch the wrappers make for the named recipes compiles for real NVIDIA
targets (sm_90 Hopper, sm_100 Blackwell; the GEMM also for sm_80 and sm_89), without a GPU.

The interpreter tests (``tests/test_kernels.py``) check the kernels' numbers but not what only a
GPU compile sees: types, layouts, the tensor-core lowering of each GEMM path, the tile sizes of
real LLM shapes. Here ``benchmarks/kernel_resources.py`` captures the launches the host wrappers
make for one training step of each named recipe at an 8192 x 4096 -> 14336 layer (nothing runs),
specialises them as Triton's JIT would and compiles them with ``triton.compile`` for a
``GPUTarget`` and Triton's bundled ptxas; any compile error fails. It needs Triton's NVIDIA
backend and ptxas, and skips with the reason where they are missing.

Cost: a representative set. Every GEMM path on every target, once per (output kind, BLOCK_K)
(on sm_80/sm_89 with bf16 output only); of the quantize kernels, whose other constants only
resize tiles within a code path, one launch per (scale mode, rounding, input kind, output kind,
code bits, special values, tensor block, chunked or not). The benchmark script compiles every
distinct launch (about 75 a target).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("kernel_resources", ROOT / "benchmarks" / "kernel_resources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kr = _load()
PROBLEM = kr.cuda_backend_problem()
pytestmark = [
    pytest.mark.skipif(PROBLEM is not None, reason=f"no ahead-of-time CUDA compile here: {PROBLEM}"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"),
]

# code-path constants of the quantize kernel (the others only size its tiles)
_PATH_CONSTANTS = ("SCALE_MODE", "ROUND_MODE", "IN_KIND", "OUT_KIND", "CODE_BITS", "TENSOR_BLOCK", "SPECIAL")


def _one_per_code_path(out_kinds=(0, 1)):
    """Select one launch per code path: GEMMs per (path, output kind, BLOCK_K); quantize kernels
    per code-path constants and whether the block is split into chunks."""
    seen = set()

    def select(name, constants, used_by):
        if name == "_gemm_fp4_kernel":
            if constants["OUT_KIND"] not in out_kinds:
                return False
            key = (name, constants["DOT_MODE"], constants["OUT_KIND"], constants["BLOCK_K"], constants["BIAS_KIND"])
        else:
            key = (name, constants.get("N_CHUNKS", 1) > 1) + tuple(constants.get(c) for c in _PATH_CONSTANTS)
        if key in seen:
            return False
        seen.add(key)
        return True

    return select


def _compile(arch: int, only: str = "", out_kinds=(0, 1)):
    results = kr.compile_all([arch], only, select=_one_per_code_path(out_kinds))
    errors = [f"{r.name} {r.constants} for {r.used_by}:\n{r.error}" for r in results if r.error]
    assert not errors, f"{len(errors)} of {len(results)} kernels fail to compile for sm_{arch}:\n" + "\n\n".join(
        errors[:3]
    )
    return results


def _gemm(results, path: str):
    mode = {"bf16": 1, "fp8": 2, "dot_scaled": 3, "dot_scaled nvfp4": 4}[path]
    return [r for r in results if r.name == "_gemm_fp4_kernel" and r.constants["DOT_MODE"] == mode]


@pytest.mark.parametrize("arch", [90, 100])
def test_every_launch_compiles(arch):
    results = _compile(arch)
    quantize = [r for r in results if r.name == "_block_quantize_kernel"]
    assert len(quantize) >= 10 and any(r.name == "_finite_absmax_kernel" for r in results)
    # rng="philox": NVFP4's stochastically rounded gradients with in-kernel draws, packed
    philox = [r for r in quantize if r.constants["ROUND_MODE"] == 2 and r.constants["SCALE_MODE"] == 3]
    assert any("nvfp4" in u and u.endswith("packed philox") for r in philox for u in r.used_by)
    # and at LLM shapes it evaluates Philox once per four elements (along rows or slices)
    assert all(r.constants["PHILOX_GROUP"] in (1, 2) for r in philox)
    for r in quantize:
        # exactness needs IEEE arithmetic on subnormals: no flush-to-zero arithmetic (floor's
        # cvt.rmi.ftz is harmless: the floor of a non-negative subnormal is 0 either way)
        assert not re.search(r"\b(?:add|sub|mul|fma|div)(?:\.rn)?\.ftz\.f32", r.kernel.asm["ptx"]), r.used_by
    # the E8M0 32-block GEMM has every path here; dot_scaled is what auto takes for MXFP4
    dot_scaled = _gemm(results, "dot_scaled")
    assert len(dot_scaled) == 3 and all("(auto)" in u for r in dot_scaled for u in r.used_by)  # fp32, bf16, + bias
    mma = "wgmma.mma_async" if arch == 90 else "tcgen05.mma"
    assert all(mma in r.kernel.asm["ptx"] for r in dot_scaled)
    # NVFP4 (B=16, e4m3 scales) takes dot_scaled on sm_100 only: the native block16 MMA
    nvfp4 = _gemm(results, "dot_scaled nvfp4")
    if arch >= 100:
        assert len(nvfp4) == 3 and all("B=16 e4m3 path=dot_scaled (auto)" in u for r in nvfp4 for u in r.used_by)
        assert all(re.search(r"tcgen05\.mma\S*" + kr.NVF4_BLOCK16, r.kernel.asm["ptx"]) for r in nvfp4)
    else:
        assert not nvfp4
    for r in _gemm(results, "bf16") + _gemm(results, "fp8") + dot_scaled + nvfp4:
        ptx = r.kernel.asm["ptx"]
        if r.constants["OUT_KIND"] == 1:  # bf16 output: the hardware's nearest-even cast, no software rounding
            assert re.search(r"cvt\.rn\.bf16(?:x2)?\.f32", ptx), r.used_by
    # the layer's forward adds its bf16 bias in the epilogue, on auto's path
    with_bias = [r for r in _gemm(results, "dot_scaled") + nvfp4 if r.constants["BIAS_KIND"] == 1]
    assert len(with_bias) == (2 if arch >= 100 else 1)
    assert all(u.endswith("(auto) out=bf16 + bias") for r in with_bias for u in r.used_by)


@pytest.mark.parametrize("arch", [80, 89])
def test_gemm_compiles_for_ampere_and_ada(arch):
    results = _compile(arch, only="gemm", out_kinds=(1,))  # bf16 output: what training asks for
    assert _gemm(results, "bf16") and not _gemm(results, "dot_scaled") and not _gemm(results, "dot_scaled nvfp4")
    assert bool(_gemm(results, "fp8")) == (arch >= 89)
    assert all("mma.sync" in r.kernel.asm["ptx"] for r in results if r.name == "_gemm_fp4_kernel")


def test_a_new_seed_or_offset_compiles_no_new_kernel():
    # rng="philox" passes each call's seed and offset: Triton would otherwise specialise a kernel
    # per i32/i64 width, per value 1 and per divisibility by 16 of each; one kernel serves all.
    import importlib

    import torch

    from lightning_fpq.philox import PhiloxGenerator

    kernels = importlib.import_module("lightning_fpq.kernels")
    x = torch.randn(256, 4096).to(torch.bfloat16)
    kw = dict(block_size=16, scale_format="e4m3", rounding="stochastic")
    with kr.pretend_gpu((9, 0)) as (launches, context):
        for seed, offset in ((16, 0), (17, 4), (1, 2**31), (2**31 + 3, 2**31 + 8), (2**40, 2**33 + 4)):
            context["used_by"] = f"seed={seed} offset={offset}"
            kernels.quantize_triton(x, "e2m1", generator=PhiloxGenerator(seed, offset), **kw)
    quantize = [g for g in kr.distinct(launches, 90) if g[0].kernel.fn.__name__ == "_block_quantize_kernel"]
    assert len(quantize) == 1, [g[1] for g in quantize]
