"""The reference quantizer against independent references.

- ml_dtypes casts (bit-exact) for the formats it knows; torch's float8/bf16/fp16 casts;
- brute force against the enumerated grid for formats no library has;
- explicit per-block loops for block scaling; statistics for stochastic rounding.
All calls force ``backend="reference"``: the fast paths are checked against it elsewhere.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BRUTE_FORCE_FORMATS, ML_DTYPES_FORMATS
from lightning_fpq import FPFormat
from lightning_fpq.packing import pack, unpack
from lightning_fpq.quantize import quantize


def qref(x, fmt, **kwargs):
    return quantize(x, fmt, backend="reference", **kwargs)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, equal NaN positions, equal signs of zero."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = torch.isnan(got)
    assert torch.equal(nan, torch.isnan(expected)), "NaN positions differ"
    g, e = got[~nan], expected[~nan]
    bad = g != e
    assert not bad.any(), (
        f"{int(bad.sum())} values differ, e.g. got {g[bad][:4].tolist()} expected {e[bad][:4].tolist()}"
    )
    assert torch.equal(torch.signbit(g), torch.signbit(e)), "signs of zero differ"


def probe_values(fmt: FPFormat, n_random: int = 20000) -> torch.Tensor:
    """Every grid value, every midpoint (ties), values just off the midpoints, random values
    over the whole range (log-uniform magnitudes, so subnormals are hit) and overflow."""
    grid = fmt.values()
    mids = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(1)
    log_lo, log_hi = math.log2(fmt.min_subnormal) - 2, math.log2(fmt.max) + 2
    mags = torch.exp2(torch.rand(n_random, generator=gen, dtype=torch.float64) * (log_hi - log_lo) + log_lo)
    signs = torch.where(torch.rand(n_random, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    x = torch.cat(
        [
            grid,
            mids,
            torch.nextafter(mids.float(), torch.tensor(math.inf)).double(),
            torch.nextafter(mids.float(), torch.tensor(-math.inf)).double(),
            mags * signs,
            torch.tensor([fmt.max * 1.5, -fmt.max * 4, 0.0, -0.0], dtype=torch.float64),
        ]
    )
    x = x.float()
    assert torch.equal(x.double()[: grid.numel()], grid), "probe must hold the grid exactly in fp32"
    return x


# ------------------------------------------------------------------ element rounding
@pytest.mark.parametrize("name,np_name", sorted(ML_DTYPES_FORMATS.items()))
def test_bit_exact_against_ml_dtypes_without_saturation(name, np_name):
    # ml_dtypes does not saturate: overflow is inf (ieee), NaN (fn) or max (finite).
    fmt = FPFormat.parse(name)
    x = torch.cat([probe_values(fmt), torch.tensor([math.inf, -math.inf, math.nan])])
    expected = torch.from_numpy(x.numpy().astype(getattr(ml_dtypes, np_name)).astype(np.float32))
    if fmt.special == "finite":  # ml_dtypes maps NaN to -0.0 for sub-byte types; we keep NaN
        expected = torch.where(torch.isnan(x), math.nan, expected)
    assert_same_bits(qref(x, fmt, saturate=False), expected)


@pytest.mark.parametrize("name,np_name", sorted(ML_DTYPES_FORMATS.items()))
def test_saturation_clamps_overflow_and_agrees_in_range(name, np_name):
    fmt = FPFormat.parse(name)
    x = probe_values(fmt)
    expected = torch.from_numpy(x.numpy().astype(getattr(ml_dtypes, np_name)).astype(np.float32))
    expected = torch.where(torch.isfinite(expected), expected, torch.copysign(torch.tensor(fmt.max), x))
    got = qref(x, fmt)
    assert_same_bits(got, expected)
    assert got.abs().max().item() == fmt.max
    inf = qref(torch.tensor([math.inf, -math.inf, math.nan]), fmt)
    assert inf[:2].tolist() == [fmt.max, -fmt.max] and math.isnan(inf[2])


def test_bit_exact_against_torch_float8_casts():
    # float8_e5m2 overflows to inf. float8_e4m3fn saturates (inf too) from torch 2.13 on; up to
    # torch 2.11 (the lent GPU machine's) its overflow and inf became NaN, our saturate=False.
    e4m3_saturates = bool(torch.isfinite(torch.tensor(1e4).to(torch.float8_e4m3fn).float()))
    for name, dtype, saturate in [("e4m3", torch.float8_e4m3fn, e4m3_saturates), ("e5m2", torch.float8_e5m2, False)]:
        fmt = FPFormat.parse(name)
        x = torch.cat([probe_values(fmt), torch.tensor([math.inf, -math.inf, math.nan])])
        assert_same_bits(qref(x, fmt, saturate=saturate), x.to(dtype).float())


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_bit_exact_against_torch_16_bit_casts(name, dtype):
    fmt = FPFormat.parse(name)
    gen = torch.Generator().manual_seed(3)
    lo, hi = math.log2(fmt.min_subnormal) - 2, min(math.log2(fmt.max) + 1, 127.9)
    x = torch.exp2(torch.rand(200000, generator=gen, dtype=torch.float64) * (hi - lo) + lo).float()
    x = torch.cat([x, -x, torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0])])
    assert_same_bits(qref(x, fmt, saturate=False), x.to(dtype).float())


def brute_force_nearest(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Nearest grid value by enumeration; ties go to the even code (even mantissa LSB)."""
    grid = fmt.values(include_negative=False)  # ascending = code order for the magnitudes
    a = x.double().abs().clamp(max=fmt.max)
    hi = torch.searchsorted(grid, a).clamp(max=grid.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    q = torch.where(pick_hi, grid[hi], grid[lo])
    return torch.copysign(q, x.double()).float()


@pytest.mark.parametrize("name", BRUTE_FORCE_FORMATS)
def test_brute_force_against_enumerated_grid(name):
    fmt = FPFormat.parse(name)
    x = probe_values(fmt, n_random=5000)
    assert_same_bits(qref(x, fmt), brute_force_nearest(x, fmt))


@pytest.mark.parametrize(
    "name,cases",
    [
        ("e2m1", [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (5.5, 6.0)]),
        ("e3m2", [(0.03125, 0.0), (0.09375, 0.125), (0.15625, 0.125), (26.0, 24.0), (27.0, 28.0), (30.0, 28.0)]),
        ("e4m3", [(0.0009765625, 0.0), (0.0029296875, 0.00390625), (464.0, 448.0), (17.0, 16.0), (19.0, 20.0)]),
        ("e2m0", [(1.5, 2.0), (0.5, 0.0), (0.75, 1.0), (3.0, 4.0)]),  # M=0: a tie carries into the exponent
    ],
)
def test_rounding_edge_cases(name, cases):
    """Ties to even at subnormal/normal boundaries, underflow to zero and the top binade."""
    fmt = FPFormat.parse(name)
    x = torch.tensor([c[0] for c in cases] + [-c[0] for c in cases])
    expected = torch.tensor([c[1] for c in cases] + [-c[1] for c in cases])
    assert_same_bits(qref(x, fmt), expected)


def test_e2m0_ties_agree_with_ml_dtypes_e8m0_convention():
    # ml_dtypes' only M=0 type (E8M0) also rounds 1.5 -> 2 and 3 -> 4.
    e8 = np.array([1.5, 3.0, 6.0], dtype=np.float32).astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert qref(torch.tensor([1.5, 3.0, 6.0]), "e8m0").tolist() == e8.tolist()


# ------------------------------------------------------------------ stochastic rounding
def test_stochastic_rounding_is_unbiased_and_picks_only_neighbours():
    fmt = FPFormat.parse("e2m1")
    x = torch.tensor([0.3, 1.2, 2.6, -3.3, 4.9, 5.9])
    draws = 20000
    gen = torch.Generator().manual_seed(0)
    q = qref(x.repeat(draws, 1), fmt, rounding="stochastic", generator=gen)
    grid = fmt.values()
    lo = grid[torch.searchsorted(grid, x.double(), right=True) - 1].float()
    hi = grid[torch.searchsorted(grid, x.double())].float()
    assert torch.all((q == lo) | (q == hi)), "only the two neighbouring grid points may appear"
    # Bernoulli mean: standard error <= step / (2 sqrt(draws)); allow 5 standard errors.
    tolerance = 5 * (hi - lo) / (2 * math.sqrt(draws))
    assert torch.all((q.mean(0) - x).abs() <= tolerance), (q.mean(0), x)


def test_stochastic_rounding_is_reproducible_from_a_generator():
    x = torch.randn(1000)
    a = qref(x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(7), block_size=32)
    b = qref(x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(7), block_size=32)
    c = qref(x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(8), block_size=32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_rounding_keeps_grid_values_and_specials():
    fmt = FPFormat.parse("e3m2")
    grid = fmt.values().float()
    assert torch.equal(qref(grid, fmt, rounding="stochastic"), grid)
    specials = qref(torch.tensor([math.nan, math.inf, -math.inf, 1e9]), fmt, rounding="stochastic")
    assert math.isnan(specials[0]) and specials[1:].tolist() == [28.0, -28.0, 28.0]


# ---------------------------------------------------------------------- block scaling
@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e3m2", "e5m2"])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_fp32_scales_put_each_block_absmax_exactly_on_the_format_max(name, block_size):
    fmt = FPFormat.parse(name)
    x = torch.randn(8, 256) * torch.logspace(-3, 3, 8).unsqueeze(1)
    packed = pack(x, fmt, block_size=block_size)
    codes_values = unpack_grid_values(packed)  # (rows, blocks, B) values on the grid
    assert torch.all(codes_values.abs().amax(-1) == fmt.max)


def unpack_grid_values(packed) -> torch.Tensor:
    """Grid values (the decoded codes, before dividing by the scales), per block."""
    codes = packed.codes.to(torch.int64)
    if packed.fmt.bits <= 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(-1)
    return packed.fmt.decode(codes).reshape(packed.scales.shape[:-1] + (-1,))


def test_e8m0_scales_are_powers_of_two_and_follow_the_ocp_rule():
    fmt = FPFormat.parse("e2m1")
    x = torch.randn(4, 128) * 37.0
    packed = pack(x, fmt, block_size=32, scale_format="e8m0")
    mant, exp = torch.frexp(packed.scales)
    assert torch.all(mant == 0.5), "an E8M0 scale is a power of two"
    # OCP MX: shared exponent = floor(log2(amax)) - emax(E2M1) = floor(log2(amax)) - 2
    amax = x.reshape(4, 4, 32).abs().amax(-1, keepdim=True)
    expected = torch.exp2(-(torch.floor(torch.log2(amax)) - 2))
    assert torch.equal(packed.scales, expected)


def test_e4m3_scales_are_e4m3_values_under_one_fp32_tensor_scale():
    fmt = FPFormat.parse("e2m1")
    x = torch.randn(4, 64) * torch.logspace(-2, 2, 4).unsqueeze(1)
    packed = pack(x, fmt, block_size=16, scale_format="e4m3")
    tensor_scale = x.abs().max().double() / (6.0 * 448.0)
    block_decode = (1.0 / packed.scales.double()) / tensor_scale  # an E4M3 value, up to fp32 rounding
    e4m3_grid = FPFormat.parse("e4m3").values()
    nearest = e4m3_grid[(block_decode.reshape(-1, 1) - e4m3_grid).abs().argmin(-1)].reshape(block_decode.shape)
    assert torch.allclose(block_decode, nearest, rtol=1e-6, atol=0)
    assert (block_decode.amax() - 448.0).abs() < 1e-3  # the largest block uses the top of E4M3


def ml_dtypes_block_loop(x: torch.Tensor, np_dtype, fmt_max: float, block: int) -> torch.Tensor:
    """Independent per-block fake quantization with numpy + ml_dtypes, one block at a time."""
    rows = []
    for row in x.numpy().astype(np.float32):
        out = []
        for start in range(0, row.size, block):
            b = row[start : start + block]
            amax = np.float32(np.abs(b).max())
            s = np.float32(fmt_max) / amax if amax > 0 else np.float32(1.0)
            q = (b * s).astype(np_dtype).astype(np.float32)
            out.append(q / s)
        rows.append(np.concatenate(out))
    return torch.from_numpy(np.stack(rows))


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e3m2"])
def test_block_size_int_channel_and_tensor_agree_with_explicit_loops(name):
    fmt, np_dtype = FPFormat.parse(name), getattr(ml_dtypes, ML_DTYPES_FORMATS[name])
    x = torch.randn(6, 96) * torch.logspace(-2, 2, 6).unsqueeze(1)
    x[2] = 0.0  # an all-zero row stays zero
    assert_same_bits(qref(x, fmt, block_size=32), ml_dtypes_block_loop(x, np_dtype, fmt.max, 32))
    assert_same_bits(qref(x, fmt, block_size="channel"), ml_dtypes_block_loop(x, np_dtype, fmt.max, 96))
    flat = x.reshape(1, -1)
    assert_same_bits(
        qref(x, fmt, block_size="tensor"), ml_dtypes_block_loop(flat, np_dtype, fmt.max, flat.numel()).reshape(6, 96)
    )
    assert torch.equal(qref(x, fmt, block_size=32)[2], torch.zeros(96))


@pytest.mark.parametrize("scale_format", ["fp32", "e8m0", "e4m3"])
def test_formats_wider_than_fp32_scale_to_fp32_max(scale_format):
    # E8M0 "finite" reaches 2**128 > fp32's max: the block absmax maps onto fp32's max instead.
    x = torch.randn(4, 32)
    for name in ("e8m0:finite", "e8m3:fn", "e8m7:finite"):
        out = qref(x, name, block_size=16, scale_format=scale_format)
        assert torch.isfinite(out).all(), name
        assert (out - x).abs().max() <= x.abs().max() * 0.5, name  # at least 1 significant bit kept
    q = qref(torch.tensor([3e38, -1e39, float("inf")]), "e8m0:finite")
    assert q.tolist() == [2.0**127, -(2.0**127), 2.0**127]  # saturates at the largest value fp32 holds


def test_blocks_are_independent():
    x = torch.randn(4, 128)
    base = qref(x, "e2m1", block_size=32)
    y = x.clone()
    y[:, 32:64] *= 1000.0  # only the second block of each row changes
    changed = qref(y, "e2m1", block_size=32)
    assert torch.equal(base[:, :32], changed[:, :32]) and torch.equal(base[:, 64:], changed[:, 64:])


def test_axis_is_the_blocking_dimension():
    x = torch.randn(64, 48)
    for bs in (16, "channel"):
        assert_same_bits(qref(x, "e2m1", block_size=bs, axis=0), qref(x.t().contiguous(), "e2m1", block_size=bs).t())
    x3 = torch.randn(4, 32, 6)
    assert_same_bits(
        qref(x3, "e4m3", block_size=8, axis=1), qref(x3.transpose(1, 2), "e4m3", block_size=8).transpose(1, 2)
    )


def test_block_size_that_does_not_divide_the_axis_pads_with_zeros():
    x = torch.randn(3, 40)
    padded = torch.nn.functional.pad(x, (0, 24))
    assert_same_bits(qref(x, "e2m1", block_size=32), qref(padded, "e2m1", block_size=32)[:, :40])


# ---------------------------------------------------------------- dtypes and contracts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [None, 32, "channel", "tensor"])
def test_dtype_and_shape_preserved_input_untouched(dtype, block_size):
    x = torch.randn(2, 3, 64).to(dtype)
    before = x.clone()
    out = qref(x, "e2m1", block_size=block_size)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(x, before)
    assert torch.equal(out, qref(x.float(), "e2m1", block_size=block_size).to(dtype))


def test_zero_dim_and_empty_tensors():
    assert qref(torch.tensor(2.7), "e2m1").item() == 3.0
    assert qref(torch.tensor(2.7), "e2m1", block_size="tensor").item() == pytest.approx(2.7)
    assert qref(torch.empty(0, 8), "e4m3", block_size=8).shape == (0, 8)


def test_nan_and_inf_in_a_block_do_not_poison_finite_neighbours():
    x = torch.tensor([[1.0, 2.0, math.nan, 3.0], [1.0, math.inf, -2.0, 0.5]])
    out = qref(x, "e2m1", block_size=4)
    assert torch.isnan(out[0, 2]) and torch.isfinite(out[0, [0, 1, 3]]).all()
    assert out[0, 3] == 3.0 and out[1, 2] == -2.0  # absmax of the finite values maps to 6
    assert out[1, 1] == 2.0  # inf saturates to the block's finite absmax


# -------------------------------------------------------------------- packing
@pytest.mark.parametrize("name", ["e2m1", "e1m1", "e2m3", "e3m2", "e4m3", "e5m2", "e3m4", "bf16", "e5m10", "fp32"])
@pytest.mark.parametrize(
    "block_size,scale_format",
    [(None, "fp32"), (32, "fp32"), (32, "e8m0"), (16, "e4m3"), ("channel", "fp32"), ("tensor", "fp32"), (24, "fp32")],
)
def test_pack_round_trip_is_exact(name, block_size, scale_format):
    x = torch.randn(5, 64) * 3
    x[0, :3] = torch.tensor([math.nan, 0.0, -0.0])
    packed = pack(x, name, block_size=block_size, scale_format=scale_format)
    expected = qref(x, name, block_size=block_size, scale_format=scale_format)
    if FPFormat.parse(name).special == "finite":  # no NaN code: stored as -0, as ml_dtypes does
        expected[0, 0] = -0.0
    assert_same_bits(unpack(packed), expected)


def test_pack_stores_two_fp4_codes_per_byte():
    x = torch.randn(128, 256)
    packed = pack(x, "e2m1", block_size=32)
    assert packed.codes.dtype == torch.uint8 and packed.codes.numel() == x.numel() // 2
    assert packed.nbytes == x.numel() // 2 + (x.numel() // 32) * 4
    assert pack(x, "e4m3").codes.numel() == x.numel()


def test_pack_codes_match_ml_dtypes_bit_patterns():
    x = probe_values(FPFormat.parse("e4m3"))
    x = x[x.abs() <= 448]
    ours = pack(x, "e4m3").codes
    theirs = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy())
    assert torch.equal(ours, theirs)


# -------------------------------------------------------------------- properties
special_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]),
)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(special_floats, min_size=1, max_size=64),
    name=st.sampled_from(["e2m1", "e4m3", "e5m2", "e3m2", "e1m1", "e0m3", "bf16"]),
    block_size=st.sampled_from([None, 4, 16, "channel", "tensor"]),
    scale_format=st.sampled_from(["fp32", "e8m0", "e4m3"]),
)
def test_never_crashes_and_never_turns_finite_into_nan(values, name, block_size, scale_format):
    x = torch.tensor(values, dtype=torch.float32)
    out = qref(x, name, block_size=block_size, scale_format=scale_format)
    assert out.shape == x.shape
    assert not torch.isnan(out[torch.isfinite(x)]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(x))
    assert torch.isfinite(out[~torch.isnan(x)]).all()  # saturating: no inf either


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64),
    name=st.sampled_from(["e2m1", "e4m3", "e5m2", "e3m2", "e2m5", "bf16"]),
)
def test_nearest_rounding_without_scaling_is_idempotent(values, name):
    x = torch.tensor(values, dtype=torch.float32)
    once = qref(x, name)
    assert_same_bits(qref(once, name), once)


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(fmt="e9m1"), "out of range"),
        (dict(fmt="fp5"), "unknown format 'fp5'"),
        (dict(block_size=0), "block_size=0 is not valid"),
        (dict(block_size="row"), "block_size='row' is not valid: expected None, a positive int, 'channel' or 'tensor'"),
        (dict(block_size=True), "block_size=True"),
        (dict(rounding="up"), "rounding='up' is not valid: expected one of \\('nearest', 'stochastic'\\)"),
        (dict(scale_format="fp16"), "scale_format='fp16' is not valid"),
        (dict(backend="cuda"), "backend='cuda' is not valid"),
        (dict(axis=2), "axis=2 is out of range"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = dict(fmt="e2m1")
    args.update(kwargs)
    fmt = args.pop("fmt")
    with pytest.raises(ValueError, match=message):
        quantize(torch.randn(4, 8), fmt, **args)


def test_forced_triton_backend_without_a_gpu_says_why():
    from lightning_fpq.kernels.capability import triton_available

    if triton_available()[0]:
        pytest.skip("Triton can launch in this process")
    with pytest.raises(ValueError, match="backend='triton' cannot run here: .*(triton|GPU|CUDA)"):
        quantize(torch.randn(4, 32), "e2m1", block_size=32, backend="triton")


def test_auto_backend_on_cpu_equals_the_reference():
    x = torch.randn(64, 256)
    for kwargs in (dict(block_size=32), dict(block_size=32, scale_format="e8m0"), dict(block_size="channel", axis=0)):
        assert_same_bits(quantize(x, "e2m1", **kwargs), qref(x, "e2m1", **kwargs))


def test_bad_tensor_types_raise_clear_errors():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 tensor, got torch.int64"):
        quantize(torch.arange(4), "e2m1")
    with pytest.raises(ValueError, match="got list"):
        quantize([1.0, 2.0], "e2m1")  # type: ignore[arg-type]
