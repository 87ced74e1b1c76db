"""FPFormat: derived properties and grids against ml_dtypes, torch dtypes, and the formulas."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import ML_DTYPES_FORMATS
from lightning_fpq import FPFormat
from lightning_fpq.formats import named_formats


@pytest.mark.parametrize("name,np_name", sorted(ML_DTYPES_FORMATS.items()))
def test_properties_match_ml_dtypes(name, np_name):
    fmt, dtype = FPFormat.parse(name), getattr(ml_dtypes, np_name)
    info = ml_dtypes.finfo(dtype)
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.bits == info.bits


@pytest.mark.parametrize("name,np_name", sorted(ML_DTYPES_FORMATS.items()))
def test_decode_every_code_matches_ml_dtypes(name, np_name):
    fmt, dtype = FPFormat.parse(name), getattr(ml_dtypes, np_name)
    codes = np.arange(2**fmt.bits, dtype=np.uint8)
    expected = torch.from_numpy(codes.view(dtype).astype(np.float64))
    got = fmt.decode(torch.from_numpy(codes.astype(np.int64)))
    both_nan = torch.isnan(got) & torch.isnan(expected)
    assert torch.equal(torch.where(both_nan, 0.0, got), torch.where(both_nan, 0.0, expected))
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    finite = np.unique(expected[torch.isfinite(expected)].numpy())
    assert fmt.num_values == len(finite)
    assert torch.equal(fmt.values(), torch.from_numpy(finite))


@pytest.mark.parametrize(
    "name,dtype,int_dtype",
    [
        ("e4m3", torch.float8_e4m3fn, torch.uint8),
        ("e5m2", torch.float8_e5m2, torch.uint8),
        ("bf16", torch.bfloat16, torch.int16),
        ("fp16", torch.float16, torch.int16),
    ],
)
def test_decode_every_code_matches_torch(name, dtype, int_dtype):
    fmt = FPFormat.parse(name)
    codes = torch.arange(2**fmt.bits, dtype=torch.int64)
    expected = codes.to(int_dtype).view(dtype).to(torch.float64)  # int16 wraps: same bits
    got = fmt.decode(codes)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    mask = ~torch.isnan(got)
    assert torch.equal(got[mask], expected[mask])
    assert torch.equal(torch.signbit(got[mask]), torch.signbit(expected[mask]))


def test_fp32_properties_match_torch_finfo():
    fmt, info = FPFormat.parse("fp32"), torch.finfo(torch.float32)
    assert (fmt.max, fmt.min_normal, fmt.min_subnormal) == (info.max, info.tiny, info.smallest_normal * 2.0**-23)
    assert FPFormat.parse("bf16").max == torch.finfo(torch.bfloat16).max
    assert FPFormat.parse("fp16").max == torch.finfo(torch.float16).max


@pytest.mark.parametrize("ebits", range(0, 9))
@pytest.mark.parametrize("mbits", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("special", ["finite", "fn", "ieee"])
def test_derived_properties_agree_with_enumeration(ebits, mbits, special):
    if ebits == 0 and special != "finite":
        with pytest.raises(ValueError, match="special must be 'finite'"):
            FPFormat(ebits=ebits, mbits=mbits, special=special)
        return
    if mbits == 0 and (ebits == 0 or (ebits == 1 and special != "finite")):
        with pytest.raises(ValueError, match="no finite non-zero value"):
            FPFormat(ebits=ebits, mbits=mbits, special=special)
        return
    fmt = FPFormat(ebits=ebits, mbits=mbits, special=special)
    grid = fmt.values()
    positive = grid[grid > 0]
    assert fmt.max == positive.max().item()
    assert fmt.min_subnormal == positive.min().item()
    assert fmt.num_values == grid.numel()
    assert math.frexp(fmt.max)[1] - 1 == fmt.emax  # emax is the largest value's exponent
    assert torch.equal(grid, -grid.flip(0))  # symmetric
    if ebits > 0:
        assert fmt.bias == 2 ** (ebits - 1) - 1
    else:  # E0My: the integer grid 0..2**M - 1
        assert torch.equal(positive, torch.arange(1, 2**mbits, dtype=torch.float64))


def test_special_modes_change_max_as_in_the_science_table():
    assert FPFormat.parse("e4m3").max == 448
    assert FPFormat.parse("e4m3:finite").max == 480
    assert FPFormat.parse("e4m3:ieee").max == 240
    assert FPFormat.parse("e2m1").max == 6
    assert FPFormat.parse("e2m3").max == 7.5
    assert FPFormat.parse("e3m2").max == 28
    assert FPFormat.parse("e5m2").max == 57344


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("fp4", (2, 1, "finite")),
        ("E2M1", (2, 1, "finite")),
        ("fp6", (3, 2, "finite")),
        ("e2m3", (2, 3, "finite")),
        ("FP8", (4, 3, "fn")),
        ("e4m3", (4, 3, "fn")),
        ("e5m2", (5, 2, "ieee")),
        ("e3m4", (3, 4, "ieee")),
        ("bf16", (8, 7, "ieee")),
        ("e8m7", (8, 7, "ieee")),
        ("fp16", (5, 10, "ieee")),
        ("e5m10", (5, 10, "ieee")),
        ("fp32", (8, 23, "ieee")),
        ("e8m23", (8, 23, "ieee")),
        ("e1m1", (1, 1, "finite")),
        ("e6m1", (6, 1, "finite")),
        ("e4m3:ieee", (4, 3, "ieee")),
        ("E5M2:finite", (5, 2, "finite")),
        (" e0m3 ", (0, 3, "finite")),
    ],
)
def test_parse(spec, expected):
    fmt = FPFormat.parse(spec)
    assert (fmt.ebits, fmt.mbits, fmt.special) == expected
    assert FPFormat.parse(fmt.name) == fmt  # names round-trip
    assert FPFormat.parse(fmt) is fmt


def test_every_named_format_round_trips_by_name():
    for name, fmt in named_formats().items():
        assert FPFormat.parse(fmt.name) == fmt, name


@pytest.mark.parametrize(
    "spec,message",
    [
        ("fp5", "unknown format 'fp5'"),
        ("e9m1", "out of range"),
        ("e2m24", "out of range"),
        ("e4m3:saturating", "special-value mode 'saturating'"),
        ("", "unknown format ''"),
        (3, "is not a format"),
    ],
)
def test_parse_errors_name_the_value_and_the_accepted_forms(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        FPFormat.parse(spec)
    assert "eXmY" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ebits=-1, mbits=2), "ebits=-1"),
        (dict(ebits=9, mbits=2), "ebits=9"),
        (dict(ebits=2, mbits=24), "mbits=24"),
        (dict(ebits=2.0, mbits=1), "ebits=2.0"),
        (dict(ebits=4, mbits=3, special="nan"), "special='nan'"),
        (dict(ebits=0, mbits=3, special="ieee"), "special must be 'finite'"),
    ],
)
def test_construction_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FPFormat(**kwargs)


def test_values_refuses_huge_formats():
    with pytest.raises(ValueError, match="at most 17 bits"):
        FPFormat.parse("fp32").values()


def test_format_is_frozen_and_hashable():
    fmt = FPFormat.parse("e4m3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.ebits = 5  # type: ignore[misc]
    assert {fmt: 1}[FPFormat(ebits=4, mbits=3, special="fn")] == 1
    assert math.isclose(FPFormat.parse("bf16").max, 3.3895313892515355e38)
