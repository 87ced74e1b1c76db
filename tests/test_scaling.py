"""The scaling laws against published numbers, hand-derived formulas and scipy minimisations.

Every check computes its expectation independently of the laws in lightning_fpq.scaling: constants
copied from the papers (docs/science.md sections 4 and 5), closed forms derived by hand in
the test, or a numeric minimisation with scipy.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar

from lightning_fpq.formats import FPFormat
from lightning_fpq.scaling.capybara import CapybaraLaw
from lightning_fpq.scaling.chinchilla import ChinchillaLaw
from lightning_fpq.scaling.kumar import KumarLaw
from lightning_fpq.scaling.law import COMPUTE_FACTOR, LawFileError, Provenance, load_law, log2_block_size
from lightning_fpq.scaling.params import count_params

# docs/science.md section 4 (arXiv 2501.02423), copied by hand
PAPER = dict(n=69.2343, a=0.2368, d=68973.0621, b=0.5162, eps=1.9061, g=11334.5197, dl=3.1926, nu=2.9543)
K = 6 / 16


@pytest.fixture(scope="module")
def law() -> CapybaraLaw:
    return CapybaraLaw.paper()


def hand_loss(N, D, E, M, log2b, c=PAPER):
    """The law as written in docs/science.md section 4."""
    return (
        c["n"] / N ** c["a"]
        + c["d"] / D ** c["b"]
        + c["eps"]
        + (D ** c["b"] / N ** c["a"]) * log2b / (c["g"] * (E + 0.5) ** c["dl"] * (M + 0.5) ** c["nu"])
    )


def relaxed_q(P, c=PAPER):
    """(E_opt + 0.5)^dl (M_opt + 0.5)^nu with the real-valued split of docs/science.md section 4."""
    s = c["dl"] + c["nu"]
    return (c["dl"] * P / s) ** c["dl"] * (c["nu"] * P / s) ** c["nu"]


# ----------------------------------------------------------------- constants and formulas


def test_paper_constants_are_the_published_ones(law):
    assert law.constants() == {**PAPER, "channel_log2_block": 13.1567}
    assert COMPUTE_FACTOR == 6 / 16  # C = (6/16) P N D: 6 N D at 16 bits
    assert law.provenance.source == "paper"
    assert "2501.02423" in law.provenance.citation
    assert "2501.02423" in CapybaraLaw.__doc__


def test_loss_matches_the_formula_by_hand(law):
    # N = 1e9, D = 2e12, E4M3, 128-element blocks
    assert law.loss(1e9, 2e12, "e4m3", 128) == pytest.approx(hand_loss(1e9, 2e12, 4, 3, 7.0), rel=1e-12)
    assert law.loss(3e8, 5e10, "e2m1", "channel") == pytest.approx(hand_loss(3e8, 5e10, 2, 1, 13.1567), rel=1e-12)
    # tensor-wise: the documented approximation log2 B = 2 x the channel value
    assert law.loss(3e8, 5e10, "e2m1", "tensor") == pytest.approx(hand_loss(3e8, 5e10, 2, 1, 2 * 13.1567), rel=1e-12)
    # no quantization: the penalty term vanishes
    assert law.loss(1e9, 2e12, None) == pytest.approx(hand_loss(1e9, 2e12, 4, 3, 0.0), rel=1e-12)


def test_only_the_bit_split_matters_not_the_special_mode(law):
    assert law.loss(1e9, 1e11, "e4m3") == law.loss(1e9, 1e11, "e4m3:ieee") == law.loss(1e9, 1e11, FPFormat(4, 3))


def test_vectorised_over_numpy_arrays(law):
    N = np.array([1e8, 1e9, 1e10])
    out = law.loss(N, 1e10, "e4m3", 128)
    assert isinstance(out, np.ndarray) and out.shape == (3,)
    np.testing.assert_allclose(out, [hand_loss(n, 1e10, 4, 3, 7.0) for n in N], rtol=1e-12)
    grid = law.loss(N[:, None], np.array([1e10, 1e11, 1e12, 1e13]), "e2m1", 32)
    assert grid.shape == (3, 4)
    assert law.critical_data_size(N, "e4m3").shape == (3,)
    assert isinstance(law.loss(1e9, 1e10, "e4m3"), float)


def test_critical_data_size_by_hand(law):
    # D_crit = [d g N^a (E+.5)^dl (M+.5)^nu / log2 B]^(1/(2b)), docs/science.md section 4
    c = PAPER
    expected = (c["d"] * c["g"] * 1e9 ** c["a"] * 2.5 ** c["dl"] * 1.5 ** c["nu"] / 7.0) ** (1 / (2 * c["b"]))
    assert law.critical_data_size(1e9, "e2m1", 128) == pytest.approx(expected, rel=1e-12)
    assert law.critical_data_size(1e9, "e2m1", 128) == pytest.approx(3.93e11, rel=1e-2)


@pytest.mark.parametrize(
    "N, fmt, block", [(1e8, "e2m1", 128), (1e9, "e4m3", 32), (7e9, "e3m2", "channel"), (7e10, "bf16", 16)]
)
def test_critical_data_size_is_where_the_loss_is_lowest(law, N, fmt, block):
    f = FPFormat.parse(fmt)
    log2b = log2_block_size(block)
    res = minimize_scalar(
        lambda x: hand_loss(N, math.exp(x), f.ebits, f.mbits, log2b),
        bounds=(math.log(1e6), math.log(1e20)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert law.critical_data_size(N, fmt, block) == pytest.approx(math.exp(res.x), rel=1e-4)
    assert law.min_loss(N, fmt, block) == pytest.approx(res.fun, rel=1e-10)
    # and the loss really rises on both sides
    d_crit = law.critical_data_size(N, fmt, block)
    assert law.loss(N, 0.5 * d_crit, fmt, block) > law.min_loss(N, fmt, block) < law.loss(N, 2 * d_crit, fmt, block)


def test_critical_data_size_grows_with_params_bits_and_smaller_blocks(law):
    N = np.array([1e8, 1e9, 1e10, 1e11])
    assert np.all(np.diff(law.critical_data_size(N, "e4m3", 128)) > 0)
    by_bits = [law.critical_data_size(1e9, law.optimal_format(p, any_split=True), 128) for p in range(2, 17)]
    assert all(lo < hi for lo, hi in zip(by_bits, by_bits[1:]))
    by_block = [law.critical_data_size(1e9, "e2m1", b) for b in (16, 32, 64, 128, 256, 1024, "channel", "tensor")]
    assert all(small > large for small, large in zip(by_block, by_block[1:]))
    assert law.critical_data_size(1e9, "e2m1", 1) == math.inf  # one scale per element: no penalty
    assert law.critical_data_size(1e9, None) == math.inf


def test_shared_elements_replace_the_papers_channel_and_tensor_constants(law):
    N, D = 1e9, 1e11
    # nothing given: the paper's constants, 13.1567 for a channel and our 2 x 13.1567 for a tensor
    assert law.loss(N, D, "e2m1", "channel") == pytest.approx(hand_loss(N, D, 2, 1, 13.1567), rel=1e-12)
    assert law.loss(N, D, "e2m1", "tensor") == pytest.approx(hand_loss(N, D, 2, 1, 2 * 13.1567), rel=1e-12)
    # a 4096-long channel (log2 = 12), a 1024 x 4096 tensor (log2 = 22)
    assert law.loss(N, D, "e2m1", "channel", shared_elements=4096) == pytest.approx(
        hand_loss(N, D, 2, 1, 12.0), rel=1e-12
    )
    assert law.critical_data_size(N, "e4m3", "tensor", shared_elements=1024 * 4096) == pytest.approx(
        (PAPER["d"] * PAPER["g"] * N ** PAPER["a"] * 4.5 ** PAPER["dl"] * 3.5 ** PAPER["nu"] / 22.0)
        ** (1 / (2 * PAPER["b"])),
        rel=1e-12,
    )
    assert log2_block_size("channel", shared_elements=2**20) == 20.0
    assert law.plan_format(1e23, "e2m1", block_size="channel", shared_elements=128) == pytest.approx(
        law.plan_format(1e23, "e2m1", block_size=128), rel=1e-12
    )
    plan = law.optimal_precision(1e23, block_size="tensor", shared_elements=128)
    assert plan.bits == pytest.approx(law.optimal_precision(1e23, block_size=128).bits, rel=1e-9)
    for bad in (0, -5, float("nan"), "many", True):
        with pytest.raises(ValueError, match="shared_elements=.* is not valid: expected a number >= 1"):
            law.loss(N, D, "e2m1", "channel", shared_elements=bad)
    with pytest.raises(ValueError, match="shared_elements=64 contradicts block_size=128"):
        law.loss(N, D, "e2m1", 128, shared_elements=64)


def test_token_value_is_one_minus_the_ratio_to_the_power_2b(law):
    d_crit = law.critical_data_size(1e9, "e4m3", 128)
    assert law.token_value(1e9, d_crit, "e4m3", 128) == pytest.approx(0.0, abs=1e-9)
    # numerically: d loss / d log D, quantized over unquantized
    h = 1e-4
    for D in (0.3 * d_crit, 3 * d_crit):
        dq = (law.loss(1e9, D * math.exp(h), "e4m3") - law.loss(1e9, D * math.exp(-h), "e4m3")) / (2 * h)
        du = (law.loss(1e9, D * math.exp(h), None) - law.loss(1e9, D * math.exp(-h), None)) / (2 * h)
        assert law.token_value(1e9, D, "e4m3") == pytest.approx(dq / du, rel=1e-5)


# ------------------------------------------------------------------- best formats


# integer splits of the law, width by width; 4, 6, 8 and 16 bits are the paper's statements
BEST = {
    2: (1, 0),
    3: (1, 1),
    4: (2, 1),
    5: (2, 2),
    6: (3, 2),
    7: (3, 3),
    8: (4, 3),
    9: (4, 4),
    10: (5, 4),
    11: (5, 5),
    12: (6, 5),
    13: (6, 6),
    14: (7, 6),
    15: (7, 7),
    16: (8, 7),
}


@pytest.mark.parametrize("bits", range(2, 17))
def test_optimal_format_for_every_width(law, bits):
    fmt = law.optimal_format(bits, any_split=True)
    assert (fmt.ebits, fmt.mbits) == BEST[bits] and fmt.bits == bits
    # brute force over every integer pair (E >= 1: E0My is E1M(y-1)), minimising 1/((E+.5)^dl (M+.5)^nu)
    pairs = [(e, bits - 1 - e) for e in range(1, bits)] or [(1, 0)]
    brute = min(pairs, key=lambda em: 1.0 / ((em[0] + 0.5) ** PAPER["dl"] * (em[1] + 0.5) ** PAPER["nu"]))
    assert brute == BEST[bits]
    # and it rounds the real optimum E_opt = dl P/(dl+nu) - 0.5 (docs/science.md section 4)
    e_opt = PAPER["dl"] * bits / (PAPER["dl"] + PAPER["nu"]) - 0.5
    m_opt = PAPER["nu"] * bits / (PAPER["dl"] + PAPER["nu"]) - 0.5
    assert law.optimal_split(bits) == pytest.approx((e_opt, m_opt), rel=1e-12)
    assert fmt.ebits in (math.floor(e_opt), math.ceil(e_opt))
    assert fmt.mbits in (math.floor(m_opt), math.ceil(m_opt))


def test_published_best_formats_are_the_hardware_ones(law):
    assert law.optimal_format(4).name == "e2m1"  # FP4
    assert law.optimal_format(6).name == "e3m2"  # FP6
    assert law.optimal_format(8) == FPFormat.parse("e4m3")  # FP8 E4M3 (OCP FN)
    assert law.optimal_format(16) == FPFormat.parse("bf16")  # E8M7


def test_optimal_format_respects_format_limits(law):
    assert law.optimal_format(32).name == "fp32"  # E8M23: E capped at 8
    assert law.optimal_format(32, any_split=True).name == "fp32"
    for bad in (1, 33, 4.0, "8", True):
        with pytest.raises(ValueError, match="bits="):
            law.optimal_format(bad)


# the formats hardware and papers use (OCP MX FP4/FP6, OCP FP8, float8_e3m4, IEEE fp16, bf16, fp32), by hand
IN_USE = {(2, 1), (2, 3), (3, 2), (4, 3), (5, 2), (3, 4), (5, 10), (8, 7), (8, 23)}
CALIBRATION = (
    Path(__file__).resolve().parents[1] / "lightning_fpq" / "scaling" / "calibrations" / "demo_calibration.yaml"
)


@pytest.mark.parametrize("which", ["paper", "demo-calibration"])
def test_optimal_format_proposes_only_formats_in_use_unless_asked(law, which):
    # issue 12: the shipped calibration answered e0m1, e0m2, e1m2, e2m5 for 2/3/4/8 bits
    the_law = law if which == "paper" else load_law(CALIBRATION)
    for bits in range(2, 33):
        if bits in {e + m + 1 for e, m in IN_USE}:
            fmt = the_law.optimal_format(bits)
            assert (fmt.ebits, fmt.mbits) in IN_USE and fmt.bits == bits
        else:
            with pytest.raises(ValueError, match=f"bits={bits} is not valid: no format in use.*any_split=True"):
                the_law.optimal_format(bits)
        assert the_law.optimal_format(bits, any_split=True).ebits >= 1  # never an E0 duplicate
    plan = the_law.optimal_precision(np.array([1e18, 1e23]))
    assert all((f.ebits, f.mbits) in IN_USE for f in plan.format)


def test_identical_grids_get_identical_predictions(law):
    from lightning_fpq.quantize import quantize

    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for y in range(0, 5):
        e0, e1 = FPFormat(ebits=0, mbits=y + 1), FPFormat(ebits=1, mbits=y)
        # brute force: the same grid up to a factor, so block scaling quantizes identically
        a, b = np.sort(e0.values().numpy()), np.sort(e1.values().numpy())
        np.testing.assert_array_equal(a / a.max(), b / b.max())
        assert torch.equal(quantize(x, e0, block_size=32), quantize(x, e1, block_size=32))
        for the_law in (law, load_law(CALIBRATION)):
            assert the_law.loss(1e9, 1e11, e0, 32) == the_law.loss(1e9, 1e11, e1, 32)
            assert the_law.critical_data_size(1e9, e0, 32) == the_law.critical_data_size(1e9, e1, 32)
            assert the_law.operand_factor(e0, 32) == the_law.operand_factor(e1, 32)
    # the representative is E1M(y-1): the law as written, evaluated at E = 1, M = 1 for e0m2
    assert law.loss(1e9, 1e11, "e0m2", 32) == pytest.approx(hand_loss(1e9, 1e11, 1, 1, 5.0), rel=1e-12)


# --------------------------------------------------------------- compute-optimal precision


def relaxed_loss(N, D, P, log2b, c=PAPER):
    """The law with the real-valued best split at P bits."""
    return (
        c["n"] / N ** c["a"]
        + c["d"] / D ** c["b"]
        + c["eps"]
        + D ** c["b"] / N ** c["a"] * log2b / (c["g"] * relaxed_q(P, c))
    )


def scipy_joint_optimum(C, log2b):
    """min over (log N, P) of the relaxed law with D = C/(k P N), by Nelder-Mead from several starts."""

    def objective(x):
        N, P = math.exp(x[0]), x[1]
        return relaxed_loss(N, C / (K * P * N), P, log2b) if 1.5 < P < 40 else 1e9

    best = min(
        (
            minimize(
                objective,
                [math.log(n0), p0],
                method="Nelder-Mead",
                options=dict(xatol=1e-10, fatol=1e-15, maxiter=4000),
            )
            for n0 in (1e9, 1e12, 1e15)
            for p0 in (4.0, 8.0)
        ),
        key=lambda r: r.fun,
    )
    return best.x[1], math.exp(best.x[0]), best.fun


def test_joint_optimal_precision_between_4_and_8_bits(law):
    computes = np.logspace(21, 31, 11)
    plan = law.optimal_precision(computes, block_size=128)
    assert np.all((plan.bits >= 4) & (plan.bits <= 8)), plan.bits
    assert np.all(np.diff(plan.bits) > 0)  # grows (slowly) with compute
    # the plan's N and D spend the budget
    np.testing.assert_allclose(K * plan.bits * plan.params * plan.tokens, computes, rtol=1e-9)


@pytest.mark.parametrize("C", [1e21, 1e26, 1e31])
def test_joint_optimum_matches_scipy(law, C):
    bits, N, loss = scipy_joint_optimum(C, 7.0)
    plan = law.optimal_precision(C, block_size=128)
    assert plan.regime == "joint"
    assert plan.bits == pytest.approx(bits, rel=1e-3)
    assert plan.params == pytest.approx(N, rel=1e-2)
    assert plan.loss == pytest.approx(loss, rel=1e-9)


def test_channel_wise_optimum_passes_8_bits_at_1e31(law):
    # documented in optimal_precision: the 4..8-bit finding holds for 128-element blocks
    assert 8.2 < law.optimal_precision(1e31, block_size="channel").bits < 8.6


def test_integer_format_plan_is_the_best_candidate(law):
    plan = law.optimal_precision(1e23, block_size=128)
    assert plan.format_loss >= plan.loss - 1e-12  # integer splits cannot beat the relaxed optimum
    for name in ("e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "e3m4", "fp16", "bf16", "fp32"):  # the formats in use
        _, _, loss = law.plan_format(1e23, name, block_size=128)
        assert plan.format_loss <= loss + 1e-12
    anything = law.optimal_precision(1e23, block_size=128, formats="any")  # every width's best split
    for name in ("e2m1", "e3m2", "e4m3", "bf16", "e2m2", "e3m3"):
        assert anything.format_loss <= law.plan_format(1e23, name, block_size=128)[2] + 1e-12
    assert anything.format.name == "e2m2"  # 5 bits: no hardware runs it, so only when asked
    n_, d_, loss = law.plan_format(1e23, plan.format, block_size=128)
    assert (n_, d_, loss) == pytest.approx((plan.format_params, plan.format_tokens, plan.format_loss), rel=1e-6)
    restricted = law.optimal_precision(1e23, formats=["e4m3", "bf16"])
    assert restricted.format.name == "e4m3"


def test_fixed_params_regime_matches_closed_form(law):
    # L(P) = d (kPN/C)^b + (C/(kPN))^b N^-a K0 / P^(dl+nu) with K0 = log2B/(g c_Q); dL/dP = 0 gives
    # P^(2b+dl+nu) = (b+dl+nu)/(b d) (C/(kN))^(2b) N^-a K0
    c, C, N, log2b = PAPER, 1e23, 1e9, 7.0
    s = c["dl"] + c["nu"]
    k0 = log2b / (c["g"] * (c["dl"] / s) ** c["dl"] * (c["nu"] / s) ** c["nu"])
    expected = ((c["b"] + s) / (c["b"] * c["d"]) * (C / (K * N)) ** (2 * c["b"]) * N ** -c["a"] * k0) ** (
        1 / (2 * c["b"] + s)
    )
    plan = law.optimal_precision(C, N=N, block_size=128)
    assert plan.regime == "fixed_N" and plan.params == N
    assert plan.bits == pytest.approx(expected, rel=1e-6)
    assert plan.tokens == pytest.approx(C / (K * expected * N), rel=1e-6)


def test_fixed_tokens_regime_matches_closed_form(law):
    # with N = C/(kPD): P^(dl+nu) = (dl+nu-a) D^b K0 / (a n), independent of C
    c, D, log2b = PAPER, 1e12, 7.0
    s = c["dl"] + c["nu"]
    k0 = log2b / (c["g"] * (c["dl"] / s) ** c["dl"] * (c["nu"] / s) ** c["nu"])
    expected = ((s - c["a"]) * D ** c["b"] * k0 / (c["a"] * c["n"])) ** (1 / s)
    for C in (1e22, 1e24):
        plan = law.optimal_precision(C, D=D, block_size=128)
        assert plan.regime == "fixed_D" and plan.tokens == D
        assert plan.bits == pytest.approx(expected, rel=1e-6)


def test_optimal_precision_rejects_bad_arguments(law):
    with pytest.raises(ValueError, match="at most one of N and D"):
        law.optimal_precision(1e23, N=1e9, D=1e12)
    with pytest.raises(ValueError, match="compute="):
        law.optimal_precision(-1.0)
    with pytest.raises(ValueError, match="less than one token"):
        law.optimal_precision(1e8, N=1e9)  # 1e8 / (k * 2 bits * 1e9) = 0.13 tokens


# ------------------------------------------------------------ exchange rate, N_eff


def test_compute_optimal_n_moves_1_6x_from_16_to_8_bits_not_50x(law):
    # issue 12: the old precision_parameter_tradeoff(16, 8) answered 50.4x, a relation between runs that end
    # at D_crit (the fixed-N optimum), not the compute-optimal N. The compute-optimal N per format, by scipy:
    C = 1e23

    def n_opt(E, M, P):
        res = minimize_scalar(
            lambda x: hand_loss(math.exp(x), C / (K * P * math.exp(x)), E, M, 7.0),
            bounds=(math.log(1e8), math.log(1e13)),
            method="bounded",
            options={"xatol": 1e-10},
        )
        return math.exp(res.x)

    n16, n8 = n_opt(8, 7, 16), n_opt(4, 3, 8)
    assert (n16, n8) == (pytest.approx(6.34e10, rel=2e-3), pytest.approx(1.03e11, rel=3e-3))
    assert law.plan_format(C, "bf16")[0] == pytest.approx(n16, rel=1e-5)
    assert law.plan_format(C, "e4m3")[0] == pytest.approx(n8, rel=1e-5)
    assert n8 / n16 == pytest.approx(1.62, abs=0.01)
    assert not hasattr(law, "precision_parameter_tradeoff")  # removed: it answered another question


def test_effective_params_give_the_same_loss_unquantized(law):
    N, D = 1e9, np.array([1e10, 1e11, 1e12, 1e13])
    n_eff = law.effective_params(N, D, "e2m1", 128)
    np.testing.assert_allclose(law.loss(n_eff, D, None), law.loss(N, D, "e2m1", 128), rtol=1e-12)
    assert np.all(n_eff < N) and np.all(np.diff(n_eff) < 0)  # more data, more penalty, fewer effective parameters
    assert law.effective_params(N, 1e10, None) == pytest.approx(N, rel=1e-12)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [0, -1, 1.5, "row", "", True, None, 2**0.5])
def test_block_size_rejected_with_the_choices(law, bad):
    with pytest.raises(ValueError, match="expected an int >= 1.*'channel' or 'tensor'"):
        law.loss(1e9, 1e10, "e4m3", bad)


@pytest.mark.parametrize(
    "N, D",
    [(0, 1e10), (-1e9, 1e10), (1e9, float("nan")), (1e9, float("inf")), (np.array([1e9, -1]), 1e10), ("x", 1e10)],
)
def test_non_positive_sizes_rejected(law, N, D):
    with pytest.raises(ValueError, match=r"(N|D)="):
        law.loss(N, D, "e4m3", 128)


def test_unknown_format_rejected(law):
    with pytest.raises(ValueError, match="unknown format 'e4m3x'"):
        law.critical_data_size(1e9, "e4m3x")


def test_constants_and_provenance_validated():
    with pytest.raises(ValueError, match="constant a=-0.2"):
        CapybaraLaw(**{**PAPER, "a": -0.2})
    with pytest.raises(ValueError, match="source='book'"):
        Provenance(source="book")
    CapybaraLaw(**{**PAPER, "eps": 0.0})  # eps may be 0


# ------------------------------------------------------------------------------- YAML


def test_yaml_round_trip_keeps_constants_and_provenance(tmp_path, law):
    for original in (
        law,
        KumarLaw.paper(),
        ChinchillaLaw.paper(),
        CapybaraLaw(**PAPER, provenance=Provenance(source="fit", rows=40, rmse=0.01, r2=0.99, heldout_rmse=0.02)),
    ):
        path = tmp_path / f"{original.kind}.yaml"
        original.save(path)
        assert type(original).load(path) == original
        assert load_law(path) == original
        assert load_law(path).provenance == original.provenance
    assert "kind: capybara" in (tmp_path / "capybara.yaml").read_text()


def test_bad_law_files_raise_one_clear_error(tmp_path):
    with pytest.raises(LawFileError, match="cannot read law file"):
        load_law(tmp_path / "missing.yaml")
    (tmp_path / "garbage.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(LawFileError, match="cannot read law file"):
        load_law(tmp_path / "garbage.yaml")
    (tmp_path / "kind.yaml").write_text("kind: moore\nconstants: {}\n")
    with pytest.raises(LawFileError, match="kind 'moore' is not one of"):
        load_law(tmp_path / "kind.yaml")
    (tmp_path / "short.yaml").write_text("kind: capybara\nconstants: {n: 1.0}\n")
    with pytest.raises(LawFileError, match="missing \\['a'"):
        load_law(tmp_path / "short.yaml")
    ChinchillaLaw.paper().save(tmp_path / "chin.yaml")
    with pytest.raises(LawFileError, match="kind 'chinchilla' is not 'capybara'"):
        CapybaraLaw.load(tmp_path / "chin.yaml")
    assert issubclass(LawFileError, ValueError)


# ------------------------------------------------------------------ Kumar and Chinchilla


# arXiv 2411.04330: g from the main text, offsets n from Appendix K, Table 2 (copied by hand)
KUMAR_G_N = ((2.6745, 0.3037), (2.2102, 1.4072), (0.9578, 2.4185))


def kumar_f(P):
    return math.prod(1 - math.exp(-P / g + n) for g, n in KUMAR_G_N)


def test_kumar_loss_by_hand_with_the_appendix_k_offsets():
    law = KumarLaw.paper()
    P = 8.0
    f = (
        (1 - math.exp(-P / 2.6745 + 0.3037))
        * (1 - math.exp(-P / 2.2102 + 1.4072))
        * (1 - math.exp(-P / 0.9578 + 2.4185))
    )
    expected = 4.299e3 * (1e9 * f) ** -0.4965 + 1.806e4 * 1e11**-0.4965 + 2.7648
    assert law.loss(1e9, 1e11, "e0m7") == pytest.approx(expected, rel=1e-12)
    assert law.loss(1e9, 1e11, "e4m3") == pytest.approx(expected, rel=1e-12)  # only the bit count matters
    assert law.effective_params(1e9, 1e11, "e0m7") == pytest.approx(1e9 * f, rel=1e-12)
    assert law.critical_data_size(1e9, "e0m7") == math.inf
    assert law.optimal_format(8) == FPFormat(ebits=0, mbits=7)


def test_kumar_factor_is_clamped_below_the_fitted_range_and_says_so():
    law = KumarLaw.paper()
    # activations: 1 - exp(-P/2.2102 + 1.4072) = 0 at P = 2.2102 * 1.4072 = 3.110 bits
    with pytest.warns(UserWarning, match="clamped to 0"):
        assert law.precision_factor(3.0) == 0.0
    with pytest.warns(UserWarning, match="clamped to 0"):
        assert law.loss(1e9, 1e11, "e1m1") == math.inf
    assert law.precision_factor(3.2) == pytest.approx(kumar_f(3.2), rel=1e-12) and kumar_f(3.2) > 0


def test_kumar_joint_optimum_is_seven_bits_independent_of_compute():
    # alpha = beta: the inner optimum over N leaves L* proportional to (P / f(P))^(alpha/2), so P* minimises
    # P/f(P); with the Appendix K offsets that is 7.0 bits, the paper's "7-8 bits" (without them: 3.47)
    law = KumarLaw.paper()
    expected = minimize_scalar(lambda P: P / kumar_f(P), bounds=(4, 16), method="bounded", options={"xatol": 1e-10}).x
    assert expected == pytest.approx(7.00, abs=0.005)
    plan = law.optimal_precision(np.array([1e21, 1e25]), block_size=128)
    np.testing.assert_allclose(plan.bits, expected, rtol=1e-4)
    assert [f.bits for f in plan.format] == [7, 7]


def test_chinchilla_by_hand_and_compute_optimal():
    law = ChinchillaLaw.paper()
    assert law.loss(7e10, 1.4e12) == pytest.approx(1.69 + 406.4 / 7e10**0.34 + 410.7 / 1.4e12**0.28, rel=1e-12)
    assert law.critical_data_size(7e10) == math.inf
    C = 5.76e23
    res = minimize_scalar(
        lambda x: law.loss(math.exp(x), C / (6 * math.exp(x))),
        bounds=(math.log(1e8), math.log(1e13)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    N, D = law.compute_optimal(C)
    assert N == pytest.approx(math.exp(res.x), rel=1e-4)
    assert 6 * N * D == pytest.approx(C, rel=1e-12)


# ------------------------------------------------------------------------- count_params


class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)  # 1600
        self.block = torch.nn.Linear(16, 16)  # 272
        self.norm = torch.nn.LayerNorm(16)  # 32
        self.head = torch.nn.Linear(16, 100, bias=False)  # 1600
        if tied:
            self.head.weight = self.embed.weight


def test_count_params_excludes_embeddings_by_default():
    assert count_params(TinyLM(tied=False)) == 272 + 32 + 1600  # untied head is a matmul: counted
    assert count_params(TinyLM(tied=False), include_embeddings=True) == 1600 + 272 + 32 + 1600
    assert count_params(TinyLM(tied=True)) == 272 + 32  # the tied head is the embedding matrix
    assert count_params(TinyLM(tied=True), include_embeddings=True) == 1600 + 272 + 32


def test_count_params_rejects_non_modules_and_lazy_ones():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        count_params([1, 2, 3])
    with pytest.raises(ValueError, match="uninitialized"):
        count_params(torch.nn.LazyLinear(4))


def test_scaling_and_fitting_do_not_import_lightning():
    # docs/architecture.md ("Layout"): the scaling package knows only formats
    root = Path(__file__).resolve().parents[1] / "lightning_fpq" / "scaling"
    for name in (
        "law.py",
        "inputs.py",
        "optimise.py",
        "planning.py",
        "capybara.py",
        "kumar.py",
        "chinchilla.py",
        "params.py",
        "fitting.py",
    ):
        tree = ast.parse((root / name).read_text())
        modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [
            m
            for m in modules
            if m.split(".")[0] in ("lightning", "pytorch_lightning", "scipy", "matplotlib")
            and not (name == "fitting.py" and m.startswith("scipy"))
        ], (name, modules)


# ------------------------------------------------------------------------ extrapolation


def test_extrapolation_warns_beyond_twice_the_fitted_range(law):
    import warnings

    from lightning_fpq.scaling.law import ExtrapolationWarning

    # the paper fitted 41M-679M parameters and 10B-100B tokens (docs/science.md section 4)
    with pytest.warns(ExtrapolationWarning) as record:
        assert law.loss(7e6, 2e3, "e2m1") == pytest.approx(hand_loss(7e6, 2e3, 2, 1, 7.0), rel=1e-12)
    found = sorted((w.message.quantity, w.message.value, w.message.low, w.message.high) for w in record)
    assert found == [("D", 2e3, 1e10, 1e11), ("N", 7e6, 41e6, 679e6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        law.loss(20.6e6, 5.1e9, "e2m1")  # inside: just above 41M/2 and 10B/2
        law.critical_data_size(1.35e9, "e2m1")  # just below 2 x 679M
    with pytest.warns(ExtrapolationWarning, match="N above the range"):
        law.critical_data_size(1.4e9, "e2m1")
    with pytest.warns(ExtrapolationWarning, match="N below the range"):
        law.plan_format(1e10, "e2m1")  # issue 12: N = 357 parameters
    assert law.extrapolation(N=5e8, D=5e10) == []
    assert CapybaraLaw(**PAPER).extrapolation(N=1.0, D=1.0) == []  # no range known: no warning


def test_named_laws_resolve_in_the_scaling_package():
    from lightning_fpq.scaling.law import NAMED_LAWS, named_law_path, resolve_named_law

    assert NAMED_LAWS == ("paper", "demo-calibration")
    assert resolve_named_law(None) == resolve_named_law("paper") == CapybaraLaw.paper()
    assert resolve_named_law("demo-calibration") == load_law(CALIBRATION)
    assert Path(named_law_path("demo-calibration")) == CALIBRATION
    with pytest.raises(LawFileError, match="cannot read law file 'papr'.*named laws: paper, demo-calibration"):
        resolve_named_law("papr")
