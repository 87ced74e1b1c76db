"""The Triton kernels against the reference quantizer, bit for bit (atol=0, rtol=0).

How this runs without a GPU: Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels
on CPU tensors, but only if the variable is set before triton is first imported in the
process (triton builds its own library functions for the interpreter or the GPU at import;
see ``kernels/capability.py``). Under ``make test`` other test modules import lightning,
which imports triton, so setting the variable here would come too late. This module
therefore runs itself once in a fresh ``python -m pytest`` process with the variable set
(``test_kernel_suite_in_fresh_interpreter_process``) and skips its tests in the parent;
nothing in the parent process is changed. To see the tests one by one on a CPU:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_kernels.py

On a CUDA machine the tests run the compiled kernels on the GPU, and the GPU-only tests
(real FP8 / ``tl.dot_scaled`` tensor cores, ``torch.compile``) run where the capability
checks allow; elsewhere they skip with the checks' reasons.

Every expected value comes from ``lightning_fpq.quantize`` (``backend="reference"``,
``pack``, ``unpack``, ``round_to_format``) or from hand-computed grids, never from a kernel.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_fpq.formats import FPFormat
from lightning_fpq.kernels import (
    dot_scaled_available,
    fp8_tensor_cores_available,
    gemm_fp4,
    interpreting,
    kernel_device,
    native_fp4_available,
    pack_triton,
    quantize_triton,
    triton_available,
)
from lightning_fpq.packing import PackedTensor, pack, unpack
from lightning_fpq.quantize import block_scales, finite_absmax, quantize, round_to_format

ROOT = Path(__file__).resolve().parents[1]
_CHILD_ENV = "LIGHTNING_FPQ_KERNEL_TESTS_CHILD"
IN_CHILD = os.environ.get(_CHILD_ENV) == "1"
OK, REASON = triton_available()
INTERPRETING = interpreting()
# On a CPU with triton installed but not importable as the interpreter in this process:
# run this file again in a fresh process where TRITON_INTERPRET=1 precedes triton's import.


def _interpreter_version_problem() -> str | None:
    """Why triton's interpreter cannot run the kernels in any process here (missing, or a triton
    too old), or None."""
    try:
        import triton
    except Exception as exc:
        return f"triton cannot be imported: {exc!r}"
    from lightning_fpq.kernels.capability import interpreter_supported, version_supported

    for check in (version_supported, interpreter_supported):
        ok, reason = check(triton.__version__)
        if not ok:
            return reason
    return None


VERSION_PROBLEM = _interpreter_version_problem()
RERUN_IN_FRESH_PROCESS = not OK and not IN_CHILD and not torch.cuda.is_available() and VERSION_PROBLEM is None
_RERUN_REASON = "runs in a fresh TRITON_INTERPRET=1 process (test_kernel_suite_in_fresh_interpreter_process)"

pytestmark = pytest.mark.filterwarnings(
    # The interpreter runs kernels with numpy: an fp32 division that overflows to inf on
    # purpose (fmt.max / a subnormal absmax, then clamped) warns there.
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
    # Triton 3.9 announces a default change of FP fusion (FMA contraction); the kernels'
    # exactness does not depend on it (kernels/_common.py).
    "ignore:TRITON_DEFAULT_FP_FUSION:UserWarning",
)


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on here; skips (or fails, in the fresh process) without one."""
    if not OK:
        if IN_CHILD and VERSION_PROBLEM is None:
            pytest.fail(f"the fresh interpreter process cannot run the kernels: {REASON}")
        pytest.skip(_RERUN_REASON if RERUN_IN_FRESH_PROCESS else REASON)
    return kernel_device()


@pytest.mark.skipif(not RERUN_IN_FRESH_PROCESS, reason="the kernel tests run in this process")
def test_kernel_suite_in_fresh_interpreter_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"TRITON_INTERPRET": "1", _CHILD_ENV: "1"})
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"  # share the cores with the other worker
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rfEs", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"kernel tests failed in the fresh interpreter process:\n{output}"
    assert " passed" in proc.stdout, output


# ============================================================================ helpers
def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-level equality of two float tensors: dtype, shape, NaN positions, values, signs."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ at {torch.nonzero(nan_a != nan_e)[:5].tolist()}"
    a, e = actual[~nan_a], expected[~nan_e]
    bad = a != e
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.numel()} values differ, e.g. kernel {a[bad][:4].tolist()} "
        f"vs reference {e[bad][:4].tolist()}"
    )
    assert torch.equal(torch.signbit(a), torch.signbit(e)), "signs of zeros differ"


def edge_tensor(shape: tuple[int, ...], *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values over 40 binades plus every special case: NaN, +-inf, +-0, fp32 subnormals,
    an all-zero row and column (all-zero blocks along either axis), a row of NaN/inf only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    flat = x.view(-1)
    flat[::17] = 0.0
    flat[3::37] = -0.0
    flat[1::29] = float("nan")
    flat[2::31] = float("-inf")
    flat[4::43] = float("inf")
    flat[5::41] = 1e-42  # fp32 subnormal
    flat[6::47] = -3e-39
    if x.dim() == 2 and x.shape[0] > 3 and x.shape[1] > 2:
        x[1] = 0.0
        x[:, 2] = 0.0
        x[3] = float("nan")
        x[3, ::2] = float("inf")
    return x.to(dtype)


def reference(x: torch.Tensor, fmt, **kw) -> torch.Tensor:
    return quantize(x.cpu(), fmt, backend="reference", **kw)


def path_available(path: str) -> tuple[bool, str]:
    """Under the interpreter every GEMM path can be forced; on a GPU only what it has."""
    if INTERPRETING or path in ("bf16", "fp32"):
        return True, ""
    return fp8_tensor_cores_available() if path == "fp8" else dot_scaled_available()


# ===================================================================== quantize: nearest
QUANT_FORMATS = ["e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "e4m3:ieee", "e3m4", "e0m3", "e1m2", "bf16"]
QUANT_BLOCKS = [None, 16, 32, 128, 12, "channel", "tensor"]
SHAPE = (40, 144)  # neither axis a multiple of 32 or 128: padded last blocks along both


@pytest.mark.parametrize("block_size", QUANT_BLOCKS, ids=str)
@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_quantize_nearest_matches_reference(device, fmt, block_size):
    # Scale format and axis rotate over the grid so that every pair meets each of them.
    i = QUANT_FORMATS.index(fmt) + QUANT_BLOCKS.index(block_size)
    scale_format = ("fp32", "e8m0", "e4m3")[i % 3]
    axis = (-1, 0)[i % 2]
    x = edge_tensor(SHAPE, seed=i)
    kw = dict(block_size=block_size, axis=axis, scale_format=scale_format)
    assert_same(quantize_triton(x.to(device), fmt, **kw), reference(x, fmt, **kw))


def test_interpreted_kernels_run_where_torch_wrap_triton_refuses_them(device, monkeypatch):
    # torch.library.wrap_triton takes the interpreter's kernels from torch 2.13 on; torch 2.11's
    # raised "wrap_triton only works on functions annotated with triton.jit" at every launch.
    if not INTERPRETING:
        pytest.skip("compiled kernels are JIT functions, which every wrap_triton takes")
    from triton.runtime.jit import JITFunction

    real = torch.library.wrap_triton

    def wrap_triton_2_11(kernel):
        if not isinstance(kernel, JITFunction):
            raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")
        return real(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", wrap_triton_2_11)
    x = edge_tensor((24, 80), seed=3)
    kw = dict(block_size="tensor", scale_format="e4m3")  # the tensor-absmax kernel, then the quantize kernel
    assert_same(quantize_triton(x.to(device), "e2m1", **kw), reference(x, "e2m1", **kw))
    a = random_e2m1_operand(GEMM_M, GEMM_K, 32, seed=1)
    b = random_e2m1_operand(GEMM_N, GEMM_K, 32, seed=2)
    assert_same(gemm_fp4(_to(a, device), _to(b, device)), (_rows(a) @ _rows(b).T).float())


@pytest.mark.parametrize("scale_format", ["fp32", "e8m0", "e4m3"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("fmt", ["e2m1", "e4m3"])
def test_quantize_every_scale_format_and_axis(device, fmt, axis, scale_format):
    x = edge_tensor((24, 80), seed=7)
    kw = dict(block_size=16, axis=axis, scale_format=scale_format)
    assert_same(quantize_triton(x.to(device), fmt, **kw), reference(x, fmt, **kw))


@pytest.mark.parametrize(
    "dtype,fmt,block_size",
    [
        (torch.bfloat16, "e2m1", 32),
        (torch.bfloat16, "e4m3", "channel"),
        (torch.bfloat16, "bf16", None),
        (torch.bfloat16, "e5m2", 16),
        (torch.float16, "e2m1", 16),
        (torch.float16, "e5m2", "tensor"),
        (torch.float16, "fp16", None),
        (torch.float16, "e3m2", 128),
    ],
    ids=str,
)
def test_quantize_half_precision_inputs(device, dtype, fmt, block_size):
    # bf16/fp16 in and out: the output rounding to x's dtype (and the clamp to its range) must match too.
    x = edge_tensor(SHAPE, seed=3, dtype=dtype)
    assert_same(quantize_triton(x.to(device), fmt, block_size=block_size), reference(x, fmt, block_size=block_size))


@pytest.mark.parametrize("fmt", ["e5m2", "e4m3", "e2m1", "e3m4"])
@pytest.mark.parametrize("block_size,scale_format", [(None, "fp32"), (32, "e8m0")], ids=str)
def test_quantize_without_saturation(device, fmt, block_size, scale_format):
    # Overflow: inf (ieee), NaN (fn), max (finite). E8M0 scales leave the block absmax in
    # [2**emax, 2**(emax+1)), above max for most formats, so blocks overflow too.
    x = edge_tensor(SHAPE, seed=11)
    kw = dict(block_size=block_size, scale_format=scale_format, saturate=False)
    assert_same(quantize_triton(x.to(device), fmt, **kw), reference(x, fmt, **kw))


def test_quantize_ties_round_to_even(device):
    # E2M1 grid 0, .5, 1, 1.5, 2, 3, 4, 6: midpoints go to the even neighbour; beyond 6 saturates.
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.25, -0.75, -5.0, 0.2500001, 4.999])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -1.0, -4.0, 0.5, 4.0])
    out = quantize_triton(x.to(device), "e2m1")
    assert_same(out, expected)
    assert_same(out, reference(x, "e2m1"))
    # The same ties behind a power-of-two (E8M0) block scale: the block's absmax 0.875 gives
    # S = 2**-(floor(log2 0.875) - emax) = 2**3, which maps x / 8 back onto the ties above.
    xs = torch.cat([x[:8] / 8, torch.full((8,), 0.875)])
    assert_same(
        quantize_triton(xs.to(device), "e2m1", block_size=16, scale_format="e8m0"),
        reference(xs, "e2m1", block_size=16, scale_format="e8m0"),
    )


def test_quantize_subnormals_and_underflow(device):
    # Every E4M3 subnormal, the midpoints between them, and values that underflow to +-0.
    fmt = FPFormat.parse("e4m3")
    step = fmt.min_subnormal
    x = torch.arange(-20, 21, dtype=torch.float32) * (step / 2)
    x = torch.cat([x, torch.tensor([step / 4, -step / 4, step * 0.5000001, 1e-45, -1e-45])])
    assert_same(quantize_triton(x.to(device), fmt), reference(x, fmt))


def test_quantize_transposed_operand_reads_strides(device):
    # W.t() is quantized along its rows without a copy: the result equals quantizing the copy.
    w = edge_tensor((48, 80), seed=5).to(device)
    wt = w.t()
    assert not wt.is_contiguous()
    for axis in (0, 1):
        kw = dict(block_size=16, axis=axis)
        assert_same(quantize_triton(wt, "e2m1", **kw), reference(wt.contiguous(), "e2m1", **kw))


def test_quantize_three_dims_middle_axis_and_long_channel(device):
    x3 = edge_tensor((3, 40, 5), seed=2)
    assert_same(
        quantize_triton(x3.to(device), "e3m2", block_size=16, axis=1), reference(x3, "e3m2", block_size=16, axis=1)
    )
    # A channel longer than one tile (4096 interpreted, 1024 compiled): the two-pass path.
    xl = edge_tensor((2, 9000), seed=4)
    assert_same(
        quantize_triton(xl.to(device), "e2m1", block_size="channel"), reference(xl, "e2m1", block_size="channel")
    )


@pytest.mark.parametrize("block_size,scale_format", [("channel", "fp32"), ("tensor", "fp32"), ("channel", "e8m0")])
def test_quantize_long_blocks_along_axis0_with_the_compiled_tiles(device, monkeypatch, block_size, scale_format):
    """The GPU's tiles for blocks longer than one tile along axis 0 (64 slices x 64 elements a
    chunk, 128-bit loads): the interpreter normally takes its own, larger tiles, so they are
    forced here; the values must not depend on the tiling."""
    import importlib

    kq = importlib.import_module("lightning_fpq.kernels.quantize")
    real = kq._tiles
    seen = []

    def compiled_tiles(*args):
        seen.append(real(*args, interp=False))
        return seen[-1]

    monkeypatch.setattr(kq, "_tiles", compiled_tiles)
    x = edge_tensor((1100, 72), seed=21, dtype=torch.bfloat16)  # 1100 > 1024: two or more chunks
    kw = dict(block_size=block_size, axis=0, scale_format=scale_format)
    assert_same(quantize_triton(x.to(device), "e4m3", **kw), reference(x, "e4m3", **kw))
    assert seen[-1] == (64, 1, 64, 18)  # BLOCK_V, NB, BLOCK_K, N_CHUNKS
    packed = pack_triton(x.to(device), "e2m1", **kw)
    expected = pack(x, "e2m1", **kw)
    assert torch.equal(packed.codes.cpu(), expected.codes) and torch.equal(packed.scales.cpu(), expected.scales)


def test_quantize_scalar_and_empty(device):
    x = torch.tensor(3.3)
    assert_same(quantize_triton(x.to(device), "e2m1"), reference(x, "e2m1"))
    assert_same(quantize_triton(x.to(device), "e2m1", block_size="tensor"), reference(x, "e2m1", block_size="tensor"))
    e = torch.empty(0, 4)
    assert quantize_triton(e.to(device), "e2m1", block_size=4).shape == (0, 4)


# ================================================================== quantize: stochastic
@pytest.mark.parametrize(
    "fmt,block_size,axis",
    [("e2m1", None, -1), ("e2m1", 16, -1), ("e4m3", 32, 0), ("e3m2", "channel", 0), ("e5m2", "tensor", -1)],
    ids=str,
)
def test_stochastic_with_shared_generator_is_bit_exact(device, fmt, block_size, axis):
    # The wrapper draws torch.rand(x.shape, generator) exactly as the reference does.
    x = edge_tensor(SHAPE, seed=9).to(device)
    kw = dict(block_size=block_size, axis=axis, rounding="stochastic")
    g_kernel = torch.Generator(device=device).manual_seed(1234)
    g_ref = torch.Generator(device=device).manual_seed(1234)
    expected = quantize(x, fmt, backend="reference", generator=g_ref, **kw)
    assert_same(quantize_triton(x, fmt, generator=g_kernel, **kw), expected)


def test_stochastic_with_noise_tensor_is_bit_exact(device):
    x = edge_tensor(SHAPE, seed=10)
    noise = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3))
    expected = quantize(
        x, "e2m1", backend="reference", block_size=32, rounding="stochastic", generator=torch.Generator().manual_seed(3)
    )
    out = quantize_triton(x.to(device), "e2m1", block_size=32, rounding="stochastic", noise=noise.to(device))
    assert_same(out, expected)


def test_stochastic_floor_decision_is_exact_at_boundaries(device):
    # E2M1 below 1: step 0.5, t = 2|y|. Pairs (y, u) whose exact t + u sits at or just below 1:
    # u = 1 - t exactly rounds up; one ulp less does not; t = 2**-24 - 2**-30 with the largest
    # torch.rand value 1 - 2**-24 sums to 1 - 2**-30, which fp32 would round to 1.0.
    t = torch.tensor([0.375, 0.375, 2.0**-20, 2.0**-20, 2.0**-24 - 2.0**-30, 0.75, 0.75], dtype=torch.float32)
    u = torch.tensor([0.625, 0.625 - 2.0**-24, 1 - 2.0**-20, 1 - 2.0**-20 - 2.0**-24, 1 - 2.0**-24, 0.25, 0.0])
    y = t / 2
    expected = round_to_format(y, FPFormat.parse("e2m1"), rounding="stochastic", noise=u)  # float64 inside
    assert expected.tolist() == [0.5, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0]
    out = quantize_triton(y.to(device), "e2m1", rounding="stochastic", noise=u.to(device))
    assert_same(out, expected)
    # Same in the normal range (t = 2 + f, step 0.5 above 1... E4M3 here: step 2**-3 at [1, 2)).
    y2 = torch.tensor([1.0 + 3 * 2.0**-6, 1.0 + 3 * 2.0**-6, 1.5 + 2.0**-20])
    u2 = torch.tensor([0.625, 0.625 - 2.0**-24, 1 - 2.0**-17])
    expected2 = round_to_format(y2, FPFormat.parse("e4m3"), rounding="stochastic", noise=u2)
    assert_same(quantize_triton(y2.to(device), "e4m3", rounding="stochastic", noise=u2.to(device)), expected2)


def _tl_rand4x_kernel():
    """A kernel that stores ``tl.rand4x(seed, counters)``: Triton's own Philox, the stream that
    ``lightning_fpq.philox`` reproduces (four draws per counter, word after word)."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_rand4x(out_ptr, counter_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        counters = tl.load(counter_ptr + idx, mask=mask, other=0)
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        tl.store(out_ptr + idx * 4, u0, mask=mask)
        tl.store(out_ptr + idx * 4 + 1, u1, mask=mask)
        tl.store(out_ptr + idx * 4 + 2, u2, mask=mask)
        tl.store(out_ptr + idx * 4 + 3, u3, mask=mask)

    return store_rand4x


@pytest.mark.parametrize("seed", [0, 17, 2**31 - 1, 2**31 + 5, 2**40 + 3, 2**63 - 1])
def test_philox_reference_is_tl_rand4x_bit_for_bit(device, seed):
    from lightning_fpq.philox import philox_uniform4

    # counters around every 32-bit boundary of the counter's low word, and a few far ones
    edges = [0, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**33 + 2**31, 2**62]
    counters = torch.cat([torch.arange(e, e + 200, dtype=torch.int64) for e in edges])
    counters = torch.cat(
        [counters, torch.randint(0, 2**62, (3000,), generator=torch.Generator().manual_seed(seed % 97))]
    )
    out = torch.empty(counters.numel() * 4, dtype=torch.float32, device=device)
    n = counters.numel()
    _tl_rand4x_kernel()[(triton_cdiv(n, 1024),)](out, counters.to(device), seed, n, BLOCK=1024)
    assert_same(out.view(n, 4), philox_uniform4(seed, counters))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize(
    "fmt,block_size,axis,scale_format",
    [
        ("e2m1", None, -1, "fp32"),
        ("e2m1", 16, -1, "e4m3"),  # NVFP4
        ("e2m1", 32, 0, "e8m0"),  # MXFP4 along tokens
        ("e4m3", 32, 0, "fp32"),
        ("e3m2", "channel", 0, "fp32"),
        ("e5m2", "tensor", -1, "fp32"),
    ],
    ids=str,
)
def test_stochastic_with_philox_generator_is_bit_exact(device, fmt, block_size, axis, scale_format):
    # The kernel computes the draws in registers; the reference computes the same ones in torch.
    from lightning_fpq.philox import PhiloxGenerator

    x = edge_tensor(SHAPE, seed=19).to(device)
    kw = dict(block_size=block_size, axis=axis, scale_format=scale_format, rounding="stochastic")
    g_kernel, g_ref = PhiloxGenerator(seed=2**40 + 11), PhiloxGenerator(seed=2**40 + 11)
    for _ in range(2):  # the second call starts where the first stopped, in both
        expected = quantize(x, fmt, backend="reference", generator=g_ref, **kw)
        assert_same(quantize_triton(x, fmt, generator=g_kernel, **kw), expected)
    assert g_kernel.offset == g_ref.offset == 2 * x.numel()


@pytest.mark.parametrize(
    "shape,axis,block_size,group",
    [
        ((24, 80), -1, 16, 1),  # rows: four consecutive elements of a row share a Philox counter
        ((24, 80), 0, 16, 2),  # columns: four consecutive slices share one
        ((24, 81), -1, "channel", 0),  # a row of 81: groups would straddle rows
        ((3, 40, 5), 1, 16, 0),  # 5 slices: groups would straddle the outer index
        ((2, 40, 12), 1, "tensor", 2),
        ((30, 2), -1, None, 0),  # no blocks, rows of 2: a group spans two rows
    ],
    ids=str,
)
def test_philox_draws_shared_four_to_a_counter_are_the_references(device, monkeypatch, shape, axis, block_size, group):
    # Each Philox evaluation serves four elements where the tile allows (groups 1 and 2), else
    # one (group 0): the same draws either way, those of the reference.
    import importlib

    from lightning_fpq.philox import PhiloxGenerator

    kq = importlib.import_module("lightning_fpq.kernels.quantize")
    real, chosen = kq._philox_group, []
    monkeypatch.setattr(kq, "_philox_group", lambda *args: chosen.append(real(*args)) or chosen[-1])
    x = edge_tensor(shape, seed=27)
    kw = dict(block_size=block_size, axis=axis, rounding="stochastic")
    g_ref, g_kernel = PhiloxGenerator(2**35 + 3), PhiloxGenerator(2**35 + 3)
    for _ in range(2):  # the second call starts where the first stopped
        expected = quantize(x, "e2m1", backend="reference", generator=g_ref, **kw)
        assert_same(quantize_triton(x.to(device), "e2m1", generator=g_kernel, **kw), expected)
    assert chosen[-1] == group


def test_stochastic_with_philox_follows_the_row_major_index_on_any_view(device):
    # A transposed operand and a middle axis: counter = row-major position in the logical shape.
    from lightning_fpq.philox import PhiloxGenerator

    w = edge_tensor((48, 80), seed=23).to(device).t()  # (80, 48), strides (1, 80)
    x3 = edge_tensor((3, 40, 5), seed=24).to(device)
    for t, axis in ((w, 0), (x3, 1)):
        kw = dict(block_size=16, axis=axis, rounding="stochastic")
        expected = quantize(t, "e2m1", backend="reference", generator=PhiloxGenerator(5), **kw)
        assert_same(quantize_triton(t, "e2m1", generator=PhiloxGenerator(5), **kw), expected)
        assert_same(quantize_triton(t, "e2m1", seed=5, **kw), expected)  # seed=s: the stream from counter 0


def test_philox_with_the_compiled_tiles_along_both_axes(device, monkeypatch):
    # The GPU's smaller Philox tiles (2048 elements a program), forced under the interpreter:
    # the draws follow the element, not the tile.
    import importlib

    from lightning_fpq.philox import PhiloxGenerator

    kq = importlib.import_module("lightning_fpq.kernels.quantize")
    real, seen = kq._tiles, []
    monkeypatch.setattr(kq, "_tiles", lambda *args: seen.append(real(*args, interp=False)) or seen[-1])
    x = edge_tensor((96, 80), seed=26, dtype=torch.bfloat16)
    for axis, tiles in ((-1, (16, 8, 16, 1)), (0, (64, 2, 16, 1))):  # BLOCK_V, NB, BLOCK_K, N_CHUNKS
        kw = dict(block_size=16, axis=axis, scale_format="e4m3", rounding="stochastic")
        expected = quantize(x, "e2m1", backend="reference", generator=PhiloxGenerator(4), **kw)
        assert_same(quantize_triton(x.to(device), "e2m1", generator=PhiloxGenerator(4), **kw), expected)
        assert seen[-1] == tiles


def test_pack_stochastic_with_philox_unpacks_to_the_reference(device):
    from lightning_fpq.philox import PhiloxGenerator

    x = edge_tensor((24, 80), seed=25).to(device)
    kw = dict(block_size=16, scale_format="e4m3", rounding="stochastic")
    got = pack_triton(x, "e2m1", generator=PhiloxGenerator(9), **kw)
    expected = quantize(x, "e2m1", backend="reference", generator=PhiloxGenerator(9), **kw)
    keep = ~torch.isnan(x.cpu())  # e2m1 stores NaN as -0
    assert_same(unpack(_to_cpu(got))[keep], expected.cpu()[keep])


def test_stochastic_with_seed_is_unbiased_and_reproducible(device):
    # In-kernel Philox, checked statistically against the two grid neighbours.
    fmt = FPFormat.parse("e2m1")
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    kw = dict(block_size=32, rounding="stochastic")
    out = quantize_triton(x.to(device), fmt, seed=17, **kw).cpu()
    assert torch.equal(out, quantize_triton(x.to(device), fmt, seed=17, **kw).cpu())
    assert not torch.equal(out, quantize_triton(x.to(device), fmt, seed=18, **kw).cpu())
    # The two grid neighbours of each element, from the reference's own pieces with u = 0
    # and u = 1 - 2**-24 (the largest torch.rand value).
    blocks = x.view(64, 8, 32)
    scale = block_scales(finite_absmax(blocks), fmt, "fp32")

    def neighbour(u: float) -> torch.Tensor:
        noise = torch.full_like(blocks, u)
        return (round_to_format(blocks * scale, fmt, rounding="stochastic", noise=noise) / scale).view(64, 256)

    down, up = neighbour(0.0), neighbour(1 - 2.0**-24)
    assert ((out == down) | (out == up)).all(), "stochastic rounding left the two neighbouring grid points"
    between = up != down
    p_up = ((x - down) / (up - down))[between].double()  # P(round up) of each element
    went_up = (out == up)[between].double()
    # A sum of independent Bernoulli(p): mean sum(p), variance sum(p (1 - p)); allow 5 sigma.
    sigma = math.sqrt(float((p_up * (1 - p_up)).sum()))
    assert int(between.sum()) > 10000
    assert abs(float(went_up.sum() - p_up.sum())) < 5 * sigma, (float(went_up.sum()), float(p_up.sum()), sigma)


# ========================================================================= pack (codes)
PACK_CASES = [
    ("e2m1", 16, -1, "fp32"),
    ("e2m1", 32, 0, "e8m0"),
    ("e2m1", "channel", -1, "e4m3"),
    ("e2m1", "tensor", 0, "fp32"),
    ("e2m1", None, -1, "fp32"),
    ("e2m1", 12, 1, "fp32"),
    ("e4m3", 32, -1, "e8m0"),
    ("e4m3", None, 0, "fp32"),
    ("e3m2", 16, 0, "fp32"),
    ("e2m3", 128, -1, "e4m3"),
    ("e5m2", "channel", 0, "fp32"),
    ("bf16", 16, -1, "fp32"),  # 16-bit codes (int16)
]


@pytest.mark.parametrize("fmt,block_size,axis,scale_format", PACK_CASES, ids=str)
def test_pack_matches_reference_codes_and_scales(device, fmt, block_size, axis, scale_format):
    x = edge_tensor((24, 80), seed=13)
    kw = dict(block_size=block_size, axis=axis, scale_format=scale_format)
    expected = pack(x, fmt, **kw)
    got = pack_triton(x.to(device), fmt, **kw)
    assert got.codes.dtype == expected.codes.dtype and got.codes.shape == expected.codes.shape
    assert torch.equal(got.codes.cpu(), expected.codes), (
        f"{int((got.codes.cpu() != expected.codes).sum())} codes differ"
    )
    if expected.scales is None:
        assert got.scales is None
    else:
        assert got.scales.shape == expected.scales.shape
        assert torch.equal(got.scales.cpu(), expected.scales)
    meta = lambda p: (tuple(p.shape), p.dtype, p.fmt, p.block_size, p.axis, p.pad, p.scale_format)  # noqa: E731
    assert meta(got) == meta(expected)
    for part in ("scale_bytes", "tensor_scale"):  # NVFP4's two levels, recorded alike
        if getattr(expected, part) is None:
            assert getattr(got, part) is None, part
        else:
            assert torch.equal(getattr(got, part).cpu(), getattr(expected, part)), part
    # Codes round-trip to the fake-quantized values (a finite format stores NaN as -0).
    keep = ~torch.isnan(x)
    assert_same(unpack(_to_cpu(got))[keep], reference(x, fmt, **kw)[keep])


def _to_cpu(p: PackedTensor) -> PackedTensor:
    return _to(p, "cpu")


def test_pack_records_its_scale_format_and_the_nvfp4_scale_parts():
    """Every PackedTensor says what its scales are; NVFP4 (e4m3) operands also carry the E4M3
    byte of each block's decode scale s and the fp32 tensor scale t, with S = 1 / (s * t)."""
    x = edge_tensor((24, 80), seed=15)
    x[5] = 0.0  # all-zero blocks
    p = pack(x, "e2m1", block_size=16, scale_format="e4m3")
    assert p.scale_format == "e4m3"
    assert p.scale_bytes.dtype == torch.uint8 and p.scale_bytes.shape == p.scales.shape
    assert p.tensor_scale.dtype == torch.float32 and p.tensor_scale.numel() == 1
    # independently: s = the block absmax over fmt.max in units of t, rounded to E4M3
    blocks = x.reshape(24, 5, 16)
    amax = torch.where(torch.isfinite(blocks), blocks.abs(), 0.0).amax(-1, keepdim=True)
    t = amax.amax() / (6.0 * 448.0)
    assert torch.equal(p.tensor_scale, t.reshape(1))
    s = round_to_format((amax / 6.0) / t, FPFormat.parse("e4m3"))
    decoded = FPFormat.parse("e4m3").decode(p.scale_bytes.long()).float()
    nonzero = amax > 0
    assert torch.equal(decoded[nonzero], s[nonzero])
    assert torch.equal(p.scales[nonzero], (1.0 / (s * t))[nonzero])  # what unpack divides by
    keep = ~torch.isnan(x)  # e2m1 stores NaN as -0
    assert_same(unpack(p)[keep], reference(x, "e2m1", block_size=16, scale_format="e4m3")[keep])
    for sfmt in ("fp32", "e8m0"):
        q = pack(x, "e2m1", block_size=16, scale_format=sfmt)
        assert q.scale_format == sfmt and q.scale_bytes is None and q.tensor_scale is None
    assert pack(x, "e4m3").scale_format == "fp32"  # no block scales: nothing promised
    with pytest.raises(ValueError, match="scale_format='e5m2' is not valid"):
        dataclasses.replace(p, scale_format="e5m2")


def test_pack_stochastic_unpacks_to_the_reference(device):
    x = edge_tensor((24, 80), seed=14).to(device)
    kw = dict(block_size=16, rounding="stochastic")
    got = pack_triton(x, "e2m1", generator=torch.Generator(device=device).manual_seed(8), **kw)
    expected = quantize(x, "e2m1", backend="reference", generator=torch.Generator(device=device).manual_seed(8), **kw)
    keep = ~torch.isnan(x.cpu())  # e2m1 stores NaN as -0
    assert_same(unpack(_to_cpu(got))[keep], expected.cpu()[keep])


# ============================================================================ FP4 GEMM
E2M1 = FPFormat.parse("e2m1")
GEMM_M, GEMM_N, GEMM_K = 40, 24, 128  # M, N not multiples of the tiles: masked edges


def random_e2m1_operand(rows: int, k: int, block_size, *, seed: int, axis: int = 1) -> PackedTensor:
    """Random E2M1 codes (all 16, -0 and -6 included) and power-of-two scales S in 2**[-2, 2].

    Why the GEMM comparison is exact: every dequantized value is a multiple of 2**-3 of
    magnitude at most 6 * 2**2, so every product is a multiple of 2**-6 below 576 and every
    partial sum over K = 128 a multiple of 2**-6 below 2**17: 23 significant bits, which
    fp32 holds exactly. No order of accumulation, no blocking of the sum and no scaling by
    a power of two can then round, so the kernel must equal the float64 product exactly.
    """
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows * k,), generator=g)  # (rows, k) order: the reduction is last
    packed = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)
    n_blocks = 1 if block_size in ("channel", "tensor") else k // block_size
    exps = torch.randint(-2, 3, (1, 1) if block_size == "tensor" else (rows, n_blocks, 1), generator=g)
    shape = torch.Size((rows, k) if axis == 1 else (k, rows))
    return PackedTensor(packed, torch.exp2(exps.float()), shape, torch.float32, E2M1, block_size, axis, 0)


def random_nvfp4_operand(rows: int, k: int, *, seed: int, tensor_exp: int, axis: int = 1) -> PackedTensor:
    """Random E2M1 codes with NVFP4 scales: 16-element blocks, E4M3 decode scales s in
    {1, 1.125, 1.25, 1.375, 1.5} and a power-of-two tensor scale t = 2**tensor_exp.

    Why exact: for these s, ``q / S`` with ``S = fl(1 / (s * t))`` (what unpack computes) is
    exactly ``q * s * t`` (checked by the test; not so for s = 1.625, 1.75, 1.875); every
    product is a multiple of 2**-8 times t_a * t_b below 127, a sum over K = 128 holds 22
    significant bits, so fp32 adds it exactly in any order.
    """
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows * k,), generator=g)
    packed = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)
    sbytes = torch.randint(0x38, 0x3D, (rows, k // 16, 1), generator=g).to(torch.uint8)
    s = FPFormat.parse("e4m3").decode(sbytes.long()).float()
    t = torch.tensor([2.0**tensor_exp])
    scales = torch.ones_like(s) / (s * t)
    shape = torch.Size((rows, k) if axis == 1 else (k, rows))
    return PackedTensor(packed, scales, shape, torch.float32, E2M1, 16, axis, 0, "e4m3", sbytes, t)


def _to(p: PackedTensor, device) -> PackedTensor:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dataclasses.replace(
        p, codes=p.codes.to(device), scales=move(p.scales), scale_bytes=move(p.scale_bytes),
        tensor_scale=move(p.tensor_scale),
    )  # fmt: skip


def _rows(p: PackedTensor) -> torch.Tensor:
    """The dequantized operand with the reduction dimension last, in float64 (exact)."""
    dense = unpack(_to_cpu(p)).double()
    return dense if p.axis == 1 else dense.T


GEMM_CASES = [
    (16, "bf16"),
    (16, "fp32"),
    (32, "bf16"),
    (32, "fp8"),
    (32, "dot_scaled"),
    (64, "fp8"),
    (128, "bf16"),
    (128, "fp8"),
    ("channel", "bf16"),
    ("channel", "fp8"),
    ("tensor", "fp8"),
]


@pytest.mark.parametrize("block_size,path", GEMM_CASES, ids=str)
def test_gemm_fp4_exact_against_dequantize_then_matmul(device, block_size, path):
    ok, reason = path_available(path)
    if not ok:
        pytest.skip(reason)
    a = random_e2m1_operand(GEMM_M, GEMM_K, block_size, seed=1)
    b = random_e2m1_operand(GEMM_N, GEMM_K, block_size, seed=2)
    expected = (_rows(a) @ _rows(b).T).float()
    # the operands' scales are powers of two: e8m0 may be promised (dot_scaled needs it)
    out = gemm_fp4(_to(a, device), _to(b, device), path=path, scale_format="e8m0" if path == "dot_scaled" else None)
    assert_same(out, expected)


@pytest.mark.parametrize("path", ["bf16", "fp8"])
def test_gemm_fp4_channel_blocks_that_end_inside_a_tile(device, path):
    # K = 96 with "channel" blocks: tiles of 64, the second one half past the block's end (the
    # masked loads along K; whole tiles take unmasked ones)
    a = random_e2m1_operand(GEMM_M, 96, "channel", seed=12)
    b = random_e2m1_operand(GEMM_N, 96, "channel", seed=13)
    assert_same(gemm_fp4(_to(a, device), _to(b, device), path=path), (_rows(a) @ _rows(b).T).float())


@pytest.mark.parametrize("cc,expected", [((9, 0), "dot_scaled"), ((10, 0), "dot_scaled"), ((8, 9), "fp8")], ids=str)
def test_gemm_fp4_auto_path_follows_the_packed_scale_format(device, monkeypatch, cc, expected):
    """path="auto" takes the path from what the operands were packed as (pack_triton records the
    scale format), never from the scale values; here on a simulated GPU of capability ``cc``,
    the chosen path runs in the interpreter and stays exact."""
    import importlib

    from lightning_fpq.kernels import capability

    gemm_module = importlib.import_module("lightning_fpq.kernels.gemm_fp4")  # the package's name is the function
    paths = []
    real_tiles = gemm_module._tiles
    monkeypatch.setattr(capability, "device_capability", lambda: cc)
    monkeypatch.setattr(gemm_module, "_tiles", lambda path, block: paths.append(path) or real_tiles(path, block))
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(GEMM_M, GEMM_K, generator=g), torch.randn(GEMM_N, GEMM_K, generator=g)
    a = pack_triton(x.to(device), "e2m1", block_size=32, scale_format="e8m0")
    b = pack_triton(w.to(device), "e2m1", block_size=32, scale_format="e8m0")
    assert a.scale_format == b.scale_format == "e8m0"
    expected_out = (_rows(a) @ _rows(b).T).float()
    assert_same(gemm_fp4(a, b), expected_out)
    a32 = pack_triton(x.to(device), "e2m1", block_size=32)  # fp32 scales: never dot_scaled
    gemm_fp4(a32, pack_triton(w.to(device), "e2m1", block_size=32))
    assert paths == [expected, "fp8" if cc >= (8, 9) else "bf16"]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_fp4_nvfp4_dot_scaled_exact_against_dequantize_then_matmul(device, out_dtype):
    """NVFP4 (16-element blocks, E4M3 scales under an fp32 tensor scale) on the dot_scaled
    path: the E4M3 bytes per block, the tensor scales in the epilogue. Under the interpreter
    the block products are the software-decoded q * s (its dot_scaled reads scale bytes as
    E8M0); compiled, tl.dot_scaled (not run here: docs/gpu.md)."""
    ok, reason = path_available("dot_scaled") if INTERPRETING else native_fp4_available()
    if not ok:
        pytest.skip(reason)
    a = random_nvfp4_operand(GEMM_M, GEMM_K, seed=20, tensor_exp=-3)
    b = random_nvfp4_operand(GEMM_N, GEMM_K, seed=21, tensor_exp=2)
    for p in (a, b):  # the premise of exactness: unpack's q / S is NVFP4's q * s * t here
        q = unpack(dataclasses.replace(p, scales=torch.ones_like(p.scales))).double()
        s = FPFormat.parse("e4m3").decode(p.scale_bytes.long()).double().repeat_interleave(16, 1).squeeze(-1)
        assert torch.equal(_rows(p), q * s.reshape(q.shape) * p.tensor_scale.double())
    expected = (_rows(a) @ _rows(b).T).float().to(out_dtype)
    assert_same(gemm_fp4(_to(a, device), _to(b, device), path="dot_scaled", out_dtype=out_dtype), expected)
    # auto takes the same path on sm_100+ (below); bf16 is the portable path, also exact here
    assert_same(gemm_fp4(_to(a, device), _to(b, device), path="bf16", out_dtype=out_dtype), expected)


@pytest.mark.parametrize("cc,expected", [((10, 0), "dot_scaled"), ((9, 0), "bf16")], ids=str)
def test_gemm_fp4_auto_path_takes_nvfp4_to_dot_scaled_on_blackwell(device, monkeypatch, cc, expected):
    """pack_triton's NVFP4 operands record their scale parts; on sm_100 (simulated) auto
    sends them through dot_scaled, on sm_90 through bf16, and both stay within a few fp32
    ulps of the dequantized product (NVFP4's q * s * t against unpack's q / S: one rounding)."""
    import importlib

    from lightning_fpq.kernels import capability

    gemm_module = importlib.import_module("lightning_fpq.kernels.gemm_fp4")
    paths = []
    real_tiles = gemm_module._tiles
    monkeypatch.setattr(capability, "device_capability", lambda: cc)
    monkeypatch.setattr(gemm_module, "_tiles", lambda path, block: paths.append(path) or real_tiles(path, block))
    g = torch.Generator().manual_seed(22)
    x, w = torch.randn(GEMM_M, 96, generator=g), torch.randn(GEMM_N, 96, generator=g)
    kw = dict(block_size=16, scale_format="e4m3")
    a, b = pack_triton(x.to(device), "e2m1", **kw), pack_triton(w.to(device), "e2m1", **kw)
    assert a.scale_format == b.scale_format == "e4m3" and a.scale_bytes is not None
    da, db = unpack(pack(x, "e2m1", **kw)).double(), unpack(pack(w, "e2m1", **kw)).double()
    bound = 1e-6 * (da.abs() @ db.abs().T)
    err = (gemm_fp4(a, b).cpu().double() - da @ db.T).abs()
    assert (err <= bound).all(), float((err / bound).max())
    assert paths == [expected]


def test_gemm_fp4_auto_path_and_operand_packed_along_axis0(device):
    # dgrad: dX = dY @ W with W (N_out, K_in) blocked along N_out (axis 0) -> codes in (K_in, N_out) order.
    dy = random_e2m1_operand(GEMM_M, GEMM_K, 32, seed=3)
    w = random_e2m1_operand(GEMM_N, GEMM_K, 32, seed=4, axis=0)  # shape (K, N) packed along axis 0
    expected = (_rows(dy) @ _rows(w).T).float()
    assert_same(gemm_fp4(_to(dy, device), _to(w, device)), expected)
    assert torch.equal(_rows(w).T, unpack(_to_cpu(w)).double())  # the operand stands for its transpose


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gemm_fp4_half_precision_output_rounds_once(device, out_dtype):
    a = random_e2m1_operand(GEMM_M, GEMM_K, 32, seed=5)
    b = random_e2m1_operand(GEMM_N, GEMM_K, 32, seed=6)
    expected = (_rows(a) @ _rows(b).T).float().to(out_dtype)  # exact in fp32, then one rounding
    assert_same(gemm_fp4(_to(a, device), _to(b, device), out_dtype=out_dtype), expected)


def test_gemm_fp4_after_pack_triton_with_fp32_scales(device):
    # The real pipeline: fp32 block scales are not powers of two, so the kernel's per-block
    # scaling rounds differently from per-element dequantization: equal to a few fp32 ulps.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(GEMM_M, 96, generator=g), torch.randn(GEMM_N, 96, generator=g)
    a, b = pack_triton(x.to(device), "e2m1", block_size=32), pack_triton(w.to(device), "e2m1", block_size=32)
    da, db = unpack(pack(x, "e2m1", block_size=32)).double(), unpack(pack(w, "e2m1", block_size=32)).double()
    expected = da @ db.T
    bound = 1e-6 * (da.abs() @ db.abs().T)  # |error| <= a few ulps of the sum of |products|
    err = (gemm_fp4(a, b).cpu().double() - expected).abs()
    assert (err <= bound).all(), float((err / bound).max())


BIAS_CASES = [(32, "bf16"), (32, "fp8"), (32, "dot_scaled"), (16, "fp32"), ("nvfp4", "dot_scaled")]


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("block_size,path", BIAS_CASES, ids=str)
def test_gemm_fp4_bias_joins_the_fp32_sums_before_the_one_rounding(device, block_size, path, out_dtype, bias_dtype):
    """``bias=`` is added in the kernel's epilogue, to the fp32 sums, before the one rounding to
    ``out_dtype`` (F.linear's and cuBLAS's order): bit for bit the fp32 product plus the bias
    in fp32, rounded once, with no (M, N) fp32 temporary."""
    if block_size == "nvfp4":
        ok, reason = path_available("dot_scaled") if INTERPRETING else native_fp4_available()
        a = random_nvfp4_operand(GEMM_M, GEMM_K, seed=30, tensor_exp=-1)
        b = random_nvfp4_operand(GEMM_N, GEMM_K, seed=31, tensor_exp=3)
    else:
        ok, reason = path_available(path)
        a = random_e2m1_operand(GEMM_M, GEMM_K, block_size, seed=32)
        b = random_e2m1_operand(GEMM_N, GEMM_K, block_size, seed=33)
    if not ok:
        pytest.skip(reason)
    bias = (torch.randn(GEMM_N, generator=torch.Generator().manual_seed(34)) * 100).to(bias_dtype)
    product = (_rows(a) @ _rows(b).T).float()  # exact (random_*_operand)
    expected = (product + bias.float()).to(out_dtype)
    sfmt = "e8m0" if path == "dot_scaled" and block_size != "nvfp4" else None
    got = gemm_fp4(
        _to(a, device), _to(b, device), path=path, out_dtype=out_dtype, scale_format=sfmt, bias=bias.to(device)
    )
    assert_same(got, expected)
    assert not torch.equal(expected, product.to(out_dtype))  # the bias counts


def test_gemm_fp4_rejects_a_bias_it_cannot_add(device):
    a = _to(random_e2m1_operand(8, 64, 32, seed=1), device)
    b = _to(random_e2m1_operand(6, 64, 32, seed=2), device)
    with pytest.raises(ValueError, match=r"bias must be a 1-D float tensor of length 6 .*got torch.float32 \(7,\)"):
        gemm_fp4(a, b, bias=torch.zeros(7, device=device))
    with pytest.raises(ValueError, match=r"got torch.float32 \(1, 6\)"):
        gemm_fp4(a, b, bias=torch.zeros(1, 6, device=device))
    with pytest.raises(ValueError, match="got torch.int64"):
        gemm_fp4(a, b, bias=torch.zeros(6, dtype=torch.long, device=device))
    if device.type != "cpu":
        with pytest.raises(ValueError, match="on cpu"):
            gemm_fp4(a, b, bias=torch.zeros(6))


def test_gemm_fp4_rejects_what_it_cannot_multiply(device):
    a = random_e2m1_operand(8, 64, 32, seed=1)
    with pytest.raises(ValueError, match="reduction lengths differ"):
        gemm_fp4(_to(a, device), _to(random_e2m1_operand(8, 96, 32, seed=2), device))
    with pytest.raises(ValueError, match="share the block size"):
        gemm_fp4(_to(a, device), _to(random_e2m1_operand(8, 64, 16, seed=2), device))
    with pytest.raises(ValueError, match="power of two"):
        odd = pack(torch.randn(8, 48), "e2m1", block_size=24)
        gemm_fp4(_to(odd, device), _to(odd, device))
    with pytest.raises(ValueError, match="e2m1 operands"):
        e4 = pack(torch.randn(8, 64), "e4m3", block_size=32)
        gemm_fp4(_to(e4, device), _to(e4, device))
    with pytest.raises(ValueError, match="at least 32"):
        s = random_e2m1_operand(8, 64, 16, seed=3)
        gemm_fp4(_to(s, device), _to(s, device), path="fp8")
    with pytest.raises(ValueError, match="power-of-two"):
        f = pack(torch.randn(8, 64), "e2m1", block_size=32)  # fp32 scales
        gemm_fp4(_to(f, device), _to(f, device), path="dot_scaled")
    with pytest.raises(ValueError, match="scale_format='e4m4' is not valid"):
        gemm_fp4(_to(a, device), _to(a, device), scale_format="e4m4")
    with pytest.raises(ValueError, match="16-element blocks with e4m3 scales"):
        s = random_e2m1_operand(8, 64, 16, seed=3)  # B=16 with power-of-two scales: not NVFP4
        gemm_fp4(_to(s, device), _to(s, device), path="dot_scaled", scale_format="e8m0")
    with pytest.raises(ValueError, match="needs a's E4M3 scale bytes and tensor scale"):
        s = random_e2m1_operand(8, 64, 16, seed=3)  # e4m3 promised, but the bytes are not recorded
        gemm_fp4(_to(s, device), _to(s, device), path="dot_scaled", scale_format="e4m3")


# ================================================== the "triton" layer backend in a training step
def _layer_step(recipe, backend, device, *, dtype=torch.float32, autocast=False, rng="torch"):
    """One forward/backward of a QuantLinear on ``backend``: (y, dX, dW, db)."""
    from lightning_fpq.linear import QuantLinear
    from lightning_fpq.recipe import QuantRecipe
    from lightning_fpq.state import QuantState

    torch.manual_seed(0)
    # the same seed: the same stochastic-rounding stream on both backends
    state = QuantState(QuantRecipe.coerce(recipe), backend=backend, seed=7, rng=rng)
    layer = QuantLinear(64, 48, state=state).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 64, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(2, 16, 48, generator=g).to(device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
    with ctx:
        y = layer(x)
    y.backward(dy.to(y.dtype))
    assert layer._fpq_state.layer_backend(layer._fpq_name, device) == backend
    return y, x.grad, layer.weight.grad, layer.bias.grad


def _count_fp4_gemms(monkeypatch) -> list:
    from lightning_fpq.backends import triton as triton_backend

    calls, real = [], triton_backend.gemm_packed

    def spy(a, b, cd, bias=None):
        calls.append(cd if bias is None else (cd, "bias"))
        return real(a, b, cd, bias=bias)

    monkeypatch.setattr(triton_backend, "gemm_packed", spy)
    return calls


@pytest.mark.parametrize("recipe,fp4_gemms", [("mxfp4", 3), ("nvfp4", 3), ("fp4", 1), ("paper", 0)])
def test_triton_layer_backend_matches_emulated(device, monkeypatch, recipe, fp4_gemms):
    """The triton backend quantizes the six operands exactly as the reference does and runs
    each GEMM whose operands are both E2M1 on the packed FP4 kernel: with power-of-two scales
    (mxfp4) that is bit-identical to fake quantization + an fp32 GEMM; with e4m3 or fp32 block
    scales (nvfp4, fp4) the kernel applies 1/S to each block product instead of to each
    element, a difference of an fp32 ulp or two (bounded here by 1e-6 relative)."""
    calls = _count_fp4_gemms(monkeypatch)
    emulated = _layer_step(recipe, "emulated", device)
    assert not calls
    triton = _layer_step(recipe, "triton", device)
    assert len(calls) == fp4_gemms
    for name, a, b in zip(("y", "dX", "dW", "db"), emulated, triton):
        if recipe in ("mxfp4", "paper"):
            assert_same(b, a)
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.detach().abs().max()), msg=name)


@pytest.mark.parametrize("name", ["mxfp4+sr", "nvfp4"])
def test_triton_layer_backend_with_philox_noise_writes_no_noise_tensor(device, monkeypatch, name):
    """rng="philox": the kernels compute the stochastic-rounding draws in registers (no
    torch.rand, no noise tensor) and the emulated backend's reference computes the same ones,
    so the two agree as they do with torch's generator (bit for bit with power-of-two scales:
    MXFP4 with its gradients rounded stochastically)."""
    from lightning_fpq.recipe import QuantRecipe
    from lightning_fpq.spec import OperandSpec

    sr = OperandSpec(E2M1, 32, "e8m0", "stochastic")
    recipe = QuantRecipe.from_name("mxfp4").with_spec(p3=sr, p5=sr) if name == "mxfp4+sr" else name
    calls = _count_fp4_gemms(monkeypatch)
    emulated = _layer_step(recipe, "emulated", device, rng="philox")
    real_rand = torch.rand

    def no_rand(*args, **kwargs):
        raise AssertionError("the triton backend drew a noise tensor with torch.rand")

    monkeypatch.setattr(torch, "rand", no_rand)
    triton = _layer_step(recipe, "triton", device, rng="philox")
    monkeypatch.setattr(torch, "rand", real_rand)
    assert len(calls) == 3
    with_torch_rng = _layer_step(recipe, "emulated", device)
    assert not torch.equal(with_torch_rng[2], emulated[2])  # another stream: another dW
    for what, a, b in zip(("y", "dX", "dW", "db"), emulated, triton):
        if name == "mxfp4+sr":
            assert_same(b, a)
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.detach().abs().max()), msg=what)


def test_triton_layer_backend_nvfp4_on_blackwell_runs_dot_scaled(device, monkeypatch):
    """On sm_100 (simulated; the interpreter runs the kernel) the layer packs NVFP4's three
    GEMMs and gemm_fp4 takes them through the dot_scaled path with the E4M3 bytes and tensor
    scales that pack_triton records: within 1e-6 relative of fake quantization + fp32 GEMM
    (NVFP4's q * s * t against the reference's q / S: one rounding apart)."""
    import importlib

    from lightning_fpq.backends import triton as triton_backend
    from lightning_fpq.kernels import capability

    gemm_module = importlib.import_module("lightning_fpq.kernels.gemm_fp4")
    paths, real_tiles = [], gemm_module._tiles
    monkeypatch.setattr(capability, "device_capability", lambda: (10, 0))
    monkeypatch.setattr(triton_backend, "_device_cc", lambda: (10, 0))
    monkeypatch.setattr(gemm_module, "_tiles", lambda path, block: paths.append(path) or real_tiles(path, block))
    emulated = _layer_step("nvfp4", "emulated", device)
    triton = _layer_step("nvfp4", "triton", device)
    assert paths == ["dot_scaled"] * 3
    for name, a, b in zip(("y", "dX", "dW", "db"), emulated, triton):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.detach().abs().max()), msg=name)


def test_triton_layer_backend_runs_attention_packed(device, monkeypatch):
    """An nn.MultiheadAttention converted to QuantMultiheadAttention on the triton backend: its
    in-projection (one packed GEMM with the bias in the epilogue) and its out_proj run on the
    FP4 kernel, bit-identical to emulated with MXFP4's power-of-two scales."""
    from torch import nn

    from lightning_fpq.linear import convert_linears
    from lightning_fpq.recipe import QuantRecipe
    from lightning_fpq.state import QuantState

    calls = _count_fp4_gemms(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(16, 2, 64, generator=g), torch.randn(16, 2, 64, generator=g)
    outs = []
    for backend in ("emulated", "triton"):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("attn", nn.MultiheadAttention(64, 4))
        converted, _ = convert_linears(model, QuantState(QuantRecipe.coerce("mxfp4"), backend=backend))
        assert converted == ["attn", "attn.out_proj"]
        model.to(device)
        xd = x.to(device).requires_grad_()
        y = model.attn(xd, xd, xd, need_weights=False)[0]
        y.backward(dy.to(device))
        attn = model.attn
        outs.append((y, xd.grad, attn.in_proj_weight.grad, attn.in_proj_bias.grad, attn.out_proj.weight.grad))
    assert calls.count((torch.float32, "bias")) == 2 and len(calls) == 6  # two layers: forward, dgrad, wgrad
    for a, b in zip(*outs):
        assert_same(b, a)


def test_triton_layer_backend_under_bf16_autocast(device, monkeypatch):
    # E2M1 values times power-of-two scales are exact in bf16, so the emulated path's bf16
    # operands lose nothing and both round the fp32 sums to bf16 once.
    calls = _count_fp4_gemms(monkeypatch)
    emulated = _layer_step("mxfp4", "emulated", device, autocast=True)
    triton = _layer_step("mxfp4", "triton", device, autocast=True)
    # the forward's bias joins the fp32 sums in the kernel: no fp32 (N, out) output to round after
    assert calls == [(torch.bfloat16, "bias"), torch.bfloat16, torch.bfloat16]
    for a, b in zip(emulated, triton):
        assert_same(b, a)


def test_triton_layer_backend_odd_token_count_uses_dense_gemm_for_wgrad(device, monkeypatch):
    # channel blocks along 15 tokens: two codes a byte need an even length, so the wgrad GEMM
    # takes the fused quantizer's fake-quantized operands instead (same values, no error).
    from lightning_fpq.linear import QuantLinear
    from lightning_fpq.recipe import QuantRecipe

    calls = _count_fp4_gemms(monkeypatch)
    recipe = QuantRecipe.from_name("mxfp4", block_size="channel")
    outs = []
    for backend in ("emulated", "triton"):
        torch.manual_seed(0)
        layer = QuantLinear(64, 32, recipe=recipe).to(device)
        layer._fpq_state.set_backend(backend)
        x = torch.randn(15, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        outs.append((x.grad, layer.weight.grad))
    assert len(calls) == 2  # forward and dgrad
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))


def test_triton_layer_backend_saves_packed_operands_for_backward(device, monkeypatch):
    # codes and scales go through save_for_backward: a second backward (retain_graph) works
    # and saved-tensor hooks see them (what activation checkpointing and save_on_cpu rely on)
    from lightning_fpq.linear import QuantLinear

    calls = _count_fp4_gemms(monkeypatch)
    layer = QuantLinear(64, 32, recipe="mxfp4").to(device)
    layer._fpq_state.set_backend("triton")
    x = torch.randn(16, 64, device=device, requires_grad=True)
    packed = []

    def pack_hook(t):
        packed.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        y = layer(x)
    assert packed.count(torch.uint8) == 2  # the codes of q6(X) and q4(W)
    y.sum().backward(retain_graph=True)
    first = (x.grad.clone(), layer.weight.grad.clone())
    y.sum().backward()
    assert_same(x.grad, 2 * first[0])
    assert_same(layer.weight.grad, 2 * first[1])
    assert len(calls) == 5  # forward, then dgrad + wgrad twice


def test_triton_backend_through_the_plugin_in_a_lightning_run(device, monkeypatch):
    """FPQuantPrecision(backend="triton") in a real Trainer: the FP4 stage's three GEMMs run on
    the packed kernel, a switch to FP8 keeps the triton backend (fused quantizer, dense GEMMs),
    and the plugin records each stage's backend."""
    import lightning as L

    from lightning_fpq import FPQuantPrecision

    calls = _count_fp4_gemms(monkeypatch)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc2(torch.relu(self.fc1(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SwitchToFP8(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                trainer.precision_plugin.set_recipe("fp8")

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 64, generator=g), torch.randint(0, 8, (64,), generator=g))
    plugin = FPQuantPrecision("mxfp4", backend="triton")
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[plugin],
        callbacks=[SwitchToFP8()],
    )
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
    assert [h["backends"] for h in plugin.backend_history] == [{"triton": 2}, {"triton": 2}]
    # two mxfp4 steps: fc2 forward, dgrad and wgrad; fc1 forward and wgrad (its input needs no
    # gradient); none in the fp8 steps
    assert len(calls) == 2 * (3 + 2)


# ========================================================== arguments and capabilities
def test_wrappers_validate_arguments_before_launching():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="stochastic"):
        quantize_triton(x, "e2m1", seed=1)
    with pytest.raises(ValueError, match="at most one"):
        quantize_triton(x, "e2m1", rounding="stochastic", seed=1, noise=torch.rand(4, 32))
    with pytest.raises(ValueError, match="noise must be"):
        quantize_triton(x, "e2m1", rounding="stochastic", noise=torch.rand(4, 31))
    with pytest.raises(ValueError, match="seed"):
        quantize_triton(x, "e2m1", rounding="stochastic", seed=-1)
    with pytest.raises(ValueError, match="block_size"):
        quantize_triton(x, "e2m1", block_size=0)
    with pytest.raises(ValueError, match="axis"):
        quantize_triton(x, "e2m1", block_size=16, axis=2)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantize_triton(x.double(), "e2m1")
    with pytest.raises(ValueError, match="at most 16 bits"):
        pack_triton(x, "fp32")
    with pytest.raises(ValueError, match="odd"):
        pack_triton(torch.randn(4, 7), "e2m1", block_size="channel")
    with pytest.raises(ValueError, match="path"):
        gemm_fp4(pack(x, "e2m1", block_size=32), pack(x, "e2m1", block_size=32), path="tf32")


def test_capability_checks_are_cached_pairs():
    for check in (triton_available, fp8_tensor_cores_available, dot_scaled_available, native_fp4_available):
        ok, reason = check()
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
        assert check() is check()  # cached: the same tuple object
    if INTERPRETING:
        assert not fp8_tensor_cores_available()[0] and "sm_89" in fp8_tensor_cores_available()[1]
        assert not dot_scaled_available()[0] and "sm_90" in dot_scaled_available()[1]
        assert not native_fp4_available()[0] and "sm_100" in native_fp4_available()[1]


@pytest.mark.skipif(OK, reason="the kernels can run here")
def test_wrappers_raise_the_capability_reason():
    with pytest.raises(RuntimeError, match="cannot run"):
        quantize_triton(torch.randn(4, 32), "e2m1", block_size=16)
    with pytest.raises(RuntimeError, match="cannot run"):
        gemm_fp4(pack(torch.randn(4, 32), "e2m1", block_size=32), pack(torch.randn(4, 32), "e2m1", block_size=32))


@pytest.mark.skipif(IN_CHILD, reason="checked once, in the parent process")
def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, lightning_fpq.kernels as k\n"
        "ok, reason = k.triton_available(); assert not ok and 'not installed' in reason, reason\n"
        "try:\n    k.quantize_triton(torch.randn(2, 16), 'e2m1')\n"
        "except RuntimeError as e:\n    assert 'not installed' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# Compiled for real GPU targets (sm_80 to sm_100) without a GPU: tests/test_kernel_compile.py.


# ============================================================================ GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not fp8_tensor_cores_available()[0], reason=fp8_tensor_cores_available()[1])
def test_gpu_fp8_tensor_cores_exact_at_llm_block_sizes():
    for block_size in (32, 128):
        a = random_e2m1_operand(256, 1024 if block_size == 128 else 128, block_size, seed=7)
        b = random_e2m1_operand(192, 1024 if block_size == 128 else 128, block_size, seed=8)
        out = gemm_fp4(_to(a, "cuda"), _to(b, "cuda"), path="fp8")
        # K = 1024: sums across scale blocks may round in fp32 (26 bits), so the float64
        # product is not the reference here; the BF16 path adds the same exact block sums in
        # the same order, so FP8 must equal it bit for bit (it would not if the FP8 MMA's
        # reduced-precision accumulation went unpromoted).
        assert_same(out, gemm_fp4(_to(a, "cuda"), _to(b, "cuda"), path="bf16"))


@pytest.mark.gpu
@pytest.mark.skipif(not dot_scaled_available()[0], reason=dot_scaled_available()[1])
def test_gpu_dot_scaled_exact():
    a = random_e2m1_operand(GEMM_M, GEMM_K, 32, seed=9)
    b = random_e2m1_operand(GEMM_N, GEMM_K, 32, seed=10)
    out = gemm_fp4(_to(a, "cuda"), _to(b, "cuda"), path="dot_scaled", scale_format="e8m0")
    assert_same(out, (_rows(a) @ _rows(b).T).float())


@pytest.mark.gpu
@pytest.mark.skipif(not native_fp4_available()[0], reason=native_fp4_available()[1])
def test_gpu_nvfp4_dot_scaled_exact():
    a = random_nvfp4_operand(GEMM_M, GEMM_K, seed=23, tensor_exp=-3)
    b = random_nvfp4_operand(GEMM_N, GEMM_K, seed=24, tensor_exp=2)
    out = gemm_fp4(_to(a, "cuda"), _to(b, "cuda"), path="dot_scaled")
    assert_same(out, (_rows(a) @ _rows(b).T).float())


@pytest.mark.gpu
@pytest.mark.skipif(
    not (OK and torch.cuda.is_available() and not INTERPRETING),
    reason="torch.compile traces user Triton kernels only when they are compiled for a CUDA device "
    "(not under TRITON_INTERPRET=1); " + (REASON if not OK else "interpreting"),
)
def test_gpu_torch_compile_traces_the_ops():
    x = edge_tensor((64, 128), seed=1).cuda()

    def fn(t):
        q = quantize_triton(t, "e2m1", block_size=32)
        p = pack_triton(t.nan_to_num(0.0, 0.0, 0.0), "e2m1", block_size=32, scale_format="e8m0")
        return q, gemm_fp4(p, p)

    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True)(x)
    assert_same(compiled[0], eager[0])
    assert_same(compiled[1], eager[1])
