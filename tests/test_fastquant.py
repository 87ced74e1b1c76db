"""The compiled quantizer (``fastquant.py``) against the reference, bit for bit.

Every case compares ``quantize(..., backend="compiled")`` with ``quantize_reference`` on the
same input: equal values, equal NaN positions, equal sign bits (zeros and NaNs included),
same dtype and shape. Plain casts are also checked against ml_dtypes, which knows nothing of
this project. Each kernel key (format, layout, scale format, rounding, saturation, dtype)
costs one compile, so the cases below are a covering design rather than a full product:
every format, layout, axis kind, scale format, dtype, rounding and saturation mode appears,
in a few combinations each, and the property test reuses keys already compiled.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_fpq import fastquant
from lightning_fpq.formats import FPFormat
from lightning_fpq.philox import PhiloxGenerator
from lightning_fpq.quantize import quantize, quantize_reference

COMPILED_OK, COMPILED_REASON = fastquant.compiled_available()
needs_compile = pytest.mark.skipif(not COMPILED_OK, reason=COMPILED_REASON)
WIDTH = 256  # every block size used here divides it


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype and shape, same NaN positions, equal values, equal sign bits (NaN too)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = torch.isnan(got)
    assert torch.equal(nan, torch.isnan(expected)), (
        f"NaN positions differ at {(nan != torch.isnan(expected)).nonzero()[:4].tolist()}"
    )
    bad = got[~nan] != expected[~nan]
    assert not bad.any(), (
        f"{int(bad.sum())} values differ, e.g. got {got[~nan][bad][:4].tolist()} "
        f"expected {expected[~nan][bad][:4].tolist()}"
    )
    sign = torch.signbit(got) != torch.signbit(expected)
    assert not sign.any(), f"{int(sign.sum())} sign bits differ (zeros or NaNs) at {sign.nonzero()[:4].tolist()}"


def probe(fmt: FPFormat, rows: int = 48, seed: int = 0) -> torch.Tensor:
    """(rows, 256) fp32: every edge the quantizer has, in rows that are whole blocks.

    Log-uniform magnitudes spanning far more than the format (so scaled blocks reach the
    format's subnormals and its max), the grid itself and its midpoints (ties) with their fp32
    neighbours at power-of-two row scales (which e8m0 scales leave ties), fp32 subnormals and
    values near fp32's max, NaN/inf/-0 sprinkled in, an all-zero row, a row of only NaN/inf,
    a row whose absmax is an fp32 subnormal and a row whose absmax is near fp32's max.
    """
    gen = torch.Generator().manual_seed(seed)
    n = rows * WIDTH
    mags = torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 60 - 30)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (mags * signs).float().view(rows, WIDTH)
    grid = fmt.values() if fmt.bits <= 12 else torch.linspace(-fmt.max, fmt.max, 257, dtype=torch.float64)
    mids = (grid[1:] + grid[:-1]) / 2
    edges = torch.cat([grid, mids]).float()
    edges = torch.cat(
        [edges, torch.nextafter(edges, torch.tensor(math.inf)), torch.nextafter(edges, torch.tensor(-math.inf))]
    )
    for r in range(8, 16):  # the grid, ties and their neighbours, at row scales 2**-8 .. 2**6
        take = edges[torch.randint(0, edges.numel(), (WIDTH,), generator=gen)]
        x[r] = take * 2.0 ** (2 * (r - 12))
    x[16] = 0.0
    x[16, ::3] = -0.0
    x[17] = torch.tensor([math.nan, -math.nan, math.inf, -math.inf]).repeat(WIDTH // 4)
    x[18] = torch.randn(WIDTH, generator=gen) * 1e-39  # absmax an fp32 subnormal
    x[19] = torch.randn(WIDTH, generator=gen).clamp(-1, 1) * 3.4e38  # absmax near fp32 max
    x[19, 0] = torch.finfo(torch.float32).max
    specials = torch.tensor(
        [
            math.nan,
            -math.nan,
            math.inf,
            -math.inf,
            0.0,
            -0.0,
            1e-45,
            -1e-40,
            3.0e38,
            -3.4e38,
            fmt.max,
            -fmt.max,
            fmt.max * 1.01,
            fmt.min_subnormal / 2,
        ]
    )
    where = torch.randint(0, n, (specials.numel(),), generator=gen)
    rows_hit = where // WIDTH
    keep = (rows_hit < 8) | (rows_hit >= 20)  # leave the structured rows as built
    x.view(-1)[where[keep]] = specials[keep]
    return x


def compiled(x, fmt, **kwargs):
    return quantize(x, fmt, backend="compiled", **kwargs)


def reference(x, fmt, **kwargs):
    return quantize_reference(x, FPFormat.parse(fmt), **kwargs)


# One kernel key each: (format, block_size, axis, scale_format, rounding, saturate, dtype, x shape).
# Layouts: block None -> plain; an int B on the last axis -> rows; on another axis -> cols;
# "channel" -> rows/cols with the row length dynamic; "tensor" -> one block.
CASES = [
    ("e2m1", 32, -1, "e8m0", "nearest", True, torch.float32, None),  # MXFP4
    ("e2m1", 32, -1, "fp32", "nearest", True, torch.float32, None),
    ("e2m1", 16, -1, "e4m3", "stochastic", True, torch.bfloat16, None),  # NVFP4, gradients
    ("e4m3", 128, -1, "fp32", "nearest", True, torch.float32, None),  # DeepSeek-style 1x128
    ("e4m3", None, -1, "fp32", "nearest", False, torch.float32, None),  # fn overflow: NaN
    ("e5m2", "channel", -1, "fp32", "nearest", False, torch.float16, None),  # ieee overflow: inf
    ("e4m3:ieee", "tensor", -1, "e8m0", "nearest", True, torch.bfloat16, None),
    ("e3m2", 32, 0, "fp32", "nearest", True, torch.float32, (128, 256)),  # blocks down the columns
    ("e2m3", None, -1, "fp32", "nearest", True, torch.bfloat16, None),
    ("e3m4", None, -1, "fp32", "stochastic", False, torch.float32, None),
    ("e1m1", 32, -1, "fp32", "nearest", True, torch.float16, None),
    ("e0m3", 32, 1, "e8m0", "nearest", True, torch.float32, (12, 256, 4)),  # middle axis of 3
    ("e6m1", "channel", 0, "e4m3", "nearest", True, torch.float32, None),
    ("e1m2:ieee", 32, -1, "e8m0", "nearest", True, torch.float32, None),  # emax 0: 2**-127 scales
]


def _case_id(case) -> str:
    fmt, bs, axis, sf, rnd, sat, dtype, shape = case
    return f"{fmt}-B{bs}-ax{axis}-{sf}-{rnd}-{'sat' if sat else 'nosat'}-{str(dtype)[6:]}"


@needs_compile
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bit_identical_to_reference(case):
    fmt, bs, axis, sf, rnd, sat, dtype, shape = case
    shape = shape or (48, WIDTH)
    x32 = probe(FPFormat.parse(fmt), rows=math.prod(shape) // WIDTH).reshape(shape)
    x = x32.to(dtype)
    kwargs = dict(block_size=bs, axis=axis, scale_format=sf, rounding=rnd, saturate=sat)
    before = x.clone()
    gen_fast, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    got = compiled(x, fmt, generator=gen_fast, **kwargs)
    expected = reference(x, fmt, generator=gen_ref, **kwargs)
    assert_same_bits(got, expected)
    assert torch.equal(
        x.view(torch.int16 if dtype != torch.float32 else torch.int32),
        before.view(torch.int16 if dtype != torch.float32 else torch.int32),
    ), "x was modified"
    if rnd == "stochastic":  # the same draws consumed: both generators are at the same state
        assert torch.equal(torch.rand(4, generator=gen_fast), torch.rand(4, generator=gen_ref))
    # A second shape through the same key: no recompile, still exact.
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    y = x[: x.shape[0] // 2]  # halves the blocks, or the channel length for axis 0
    assert_same_bits(
        compiled(y, fmt, generator=torch.Generator().manual_seed(1), **kwargs),
        reference(y, fmt, generator=torch.Generator().manual_seed(1), **kwargs),
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "a new shape recompiled the kernel"


@needs_compile
@pytest.mark.parametrize(
    "case", [c[:4] + ("stochastic",) + c[5:] for c in (CASES[2], CASES[7], CASES[9], CASES[11])], ids=_case_id
)
def test_philox_draws_in_the_loop_are_the_references(case):
    # The counter-based stream: the compiled loop computes the draws the reference computes
    # (lightning_fpq.philox), from the same counters, and a new seed or offset reuses the kernel.
    fmt, bs, axis, sf, rnd, sat, dtype, shape = case
    shape = shape or (48, WIDTH)
    x = probe(FPFormat.parse(fmt), rows=math.prod(shape) // WIDTH).reshape(shape).to(dtype)
    kwargs = dict(block_size=bs, axis=axis, scale_format=sf, rounding=rnd, saturate=sat)
    gen_fast, gen_ref = PhiloxGenerator(2**33 + 1), PhiloxGenerator(2**33 + 1)
    assert_same_bits(compiled(x, fmt, generator=gen_fast, **kwargs), reference(x, fmt, generator=gen_ref, **kwargs))
    assert gen_fast.offset == gen_ref.offset == x.numel()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for fast, ref in ((gen_fast, gen_ref), (PhiloxGenerator(3), PhiloxGenerator(3))):
        assert_same_bits(compiled(x, fmt, generator=fast, **kwargs), reference(x, fmt, generator=ref, **kwargs))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "a new seed or offset recompiled"


@needs_compile
@pytest.mark.parametrize(
    "name,np_name,saturate,dtype",
    [("e4m3", "float8_e4m3fn", False, torch.float32), ("e2m3", "float6_e2m3fn", True, torch.bfloat16)],
)
def test_plain_cast_matches_ml_dtypes(name, np_name, saturate, dtype):
    # Independent of the reference: ml_dtypes' casts (the keys of CASES[4] and CASES[8]).
    # ml_dtypes does not saturate (E4M3FN overflow is NaN, as saturate=False); its FP6 types
    # have no NaN or inf and saturate (as saturate=True). Finite inputs: both are defined there.
    x = probe(FPFormat.parse(name))
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    got = compiled(x.to(dtype), name, saturate=saturate).float()
    expected = torch.from_numpy(x.to(dtype).float().numpy().astype(getattr(ml_dtypes, np_name)).astype(np.float32))
    assert_same_bits(got, expected)


@needs_compile
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(2, 40),
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64),
    log_scale=st.integers(-40, 40),
    case=st.sampled_from([CASES[0], CASES[1], CASES[3], CASES[8]]),  # keys the cases above compile
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_values(rows, values, log_scale, case, seed):
    fmt, bs, axis, sf, rnd, sat, dtype, _ = case
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(values, dtype=torch.float32) * 2.0**log_scale
    x = pool[torch.randint(0, pool.numel(), (rows, WIDTH), generator=gen)]
    x = x * torch.exp2(torch.randint(-3, 4, x.shape, generator=gen).float())  # spread within blocks
    x = x.to(dtype)
    kwargs = dict(block_size=bs, axis=axis, scale_format=sf, rounding=rnd, saturate=sat)
    assert_same_bits(compiled(x, fmt, **kwargs), reference(x, fmt, **kwargs))


@needs_compile
def test_non_contiguous_input_and_auto_threshold():
    x = probe(FPFormat.parse("e2m1")).t().bfloat16()  # (256, 48): blocks along the strided axis
    before = x.clone()
    kwargs = dict(block_size=16, axis=-1, scale_format="e4m3", rounding="stochastic")
    assert_same_bits(
        compiled(x, "e2m1", generator=torch.Generator().manual_seed(5), **kwargs),
        reference(x, "e2m1", generator=torch.Generator().manual_seed(5), **kwargs),
    )
    assert torch.equal(x.view(torch.int16), before.view(torch.int16))
    # "auto" leaves tiny tensors to the reference (no compile); large ones take the fast path.
    small = torch.randn(4, 64)
    assert (
        fastquant.quantize_fast(
            small,
            FPFormat.parse("e2m1"),
            block_size=32,
            axis=-1,
            scale_format="fp32",
            rounding="nearest",
            generator=None,
            saturate=True,
            backend="auto",
        )
        is None
    )
    big = torch.randn(fastquant.AUTO_MIN_NUMEL // WIDTH + 1, WIDTH)
    out = fastquant.quantize_fast(
        big,
        FPFormat.parse("e2m1"),
        block_size=32,
        axis=-1,
        scale_format="fp32",
        rounding="nearest",
        generator=None,
        saturate=True,
        backend="auto",
    )
    assert out is not None
    assert_same_bits(out, reference(big, "e2m1", block_size=32))


@needs_compile
@pytest.mark.parametrize(
    "fmt,kwargs,x,match",
    [
        ("bf16", dict(block_size=32), torch.randn(4, 64), "exponent bits"),
        ("e2m1", dict(block_size=48), torch.randn(4, 64), "does not divide"),
        ("e2m1", dict(block_size=32), torch.randn(4, 64, requires_grad=True), "requires grad"),
        ("e2m1", dict(block_size=32), torch.empty(0, 64), "empty"),
    ],
    ids=["e8-format", "padded-block", "requires-grad", "empty"],
)
def test_forced_compiled_explains_what_it_cannot_do(fmt, kwargs, x, match):
    with pytest.raises(ValueError, match=match):
        compiled(x, fmt, **kwargs)
    # "auto" quietly uses the reference for the same call.
    assert (
        fastquant.quantize_fast(
            x,
            FPFormat.parse(fmt),
            axis=-1,
            scale_format="fp32",
            rounding="nearest",
            generator=None,
            saturate=True,
            backend="auto",
            **kwargs,
        )
        is None
    )


def test_compile_failure_falls_back_and_is_reported(monkeypatch):
    # A tool chain that fails (no compiler, Windows ...): "auto" returns the reference's result
    # (the stochastic draws included: the generator is rewound), "compiled" raises with the
    # reason, and compiled_available() reports it from then on.
    def broken_compile(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(fastquant.torch, "compile", broken_compile)
    monkeypatch.setattr(fastquant, "_kernels", {})
    monkeypatch.setattr(fastquant, "_failed_keys", {})
    monkeypatch.setattr(fastquant, "_any_compiled", False)
    monkeypatch.setattr(fastquant, "_compile_failure", None)
    monkeypatch.setattr(fastquant, "_static_availability", lambda: (True, "pretend"))
    x = torch.randn(fastquant.AUTO_MIN_NUMEL // WIDTH + 1, WIDTH)
    kwargs = dict(block_size=32, rounding="stochastic")
    got = quantize(x, "e2m1", generator=torch.Generator().manual_seed(3), **kwargs)
    assert_same_bits(got, reference(x, "e2m1", generator=torch.Generator().manual_seed(3), **kwargs))
    ok, reason = fastquant.compiled_available()
    assert not ok and "no working C++ compiler" in reason
    with pytest.raises(ValueError, match="no working C.. compiler"):
        compiled(x, "e2m1", block_size=32)


@needs_compile
def test_compiles_with_the_torch_compile_of_torch_2_11(monkeypatch):
    # torch.compile takes recompile_limit= from torch 2.13 on; torch 2.11 (the lent GPU
    # machine's) raised TypeError on it, so every key failed and "auto" fell back to the
    # reference. With the older signature the compiled quantizer must still run, bit-exact.
    real = torch.compile

    def compile_2_11(
        model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None, disable=False
    ):
        return real(
            model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode, options=options, disable=disable
        )

    monkeypatch.setattr(fastquant.torch, "compile", compile_2_11)
    monkeypatch.setattr(fastquant, "_kernels", {})
    monkeypatch.setattr(fastquant, "_failed_keys", {})
    x = probe(FPFormat.parse("e2m1"))
    assert_same_bits(compiled(x, "e2m1", block_size=32), reference(x, "e2m1", block_size=32))


def test_compiled_available_is_a_reasoned_pair():
    ok, reason = fastquant.compiled_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason


@needs_compile
def test_stochastic_floor_decision_is_exact_at_boundaries():
    # The compiled loop's floor(|t| + u): pairs (y, u) whose exact t + u sits at or just below
    # an integer, where an fp32 sum would round (as in the kernel test), and u far below
    # ulp(t); against round_to_format, inf, NaN and -0 included.
    from lightning_fpq.quantize import round_to_format

    fmt = FPFormat.parse("e2m1")
    t = torch.tensor([0.375, 0.375, 2.0**-20, 2.0**-20, 2.0**-24 - 2.0**-30, 0.75, 0.75, 2.5, 2.5, 3.0, 1.5])
    u = torch.tensor(
        [
            0.625,
            0.625 - 2.0**-24,
            1 - 2.0**-20,
            1 - 2.0**-20 - 2.0**-24,
            1 - 2.0**-24,
            0.25,
            0.0,
            0.5,
            2.0**-31,
            0.999,
            0.5,
        ]
    )
    y = torch.cat([t / 2, -t / 2, torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])])
    noise = torch.cat([u, u, torch.tensor([0.5, 0.5, 0.5, 0.5])])
    expected = round_to_format(y, fmt, rounding="stochastic", noise=noise)
    step = torch.compile(lambda y, u: fastquant._round_fp32(y, fmt.mbits, fmt.emin, fmt.max, fmt.max, -fmt.max, u))
    assert_same_bits(step(y, noise), expected)
