"""The counter-based noise stream (``lightning_fpq.philox``): Philox4x32-10 against the known
answers of its authors, the stream's bookkeeping, and its checkpoint state. The bit-for-bit
comparison with Triton's own ``tl.rand4x`` runs under the interpreter in
``tests/test_kernels.py`` (``test_philox_reference_is_tl_rand4x_bit_for_bit``)."""

from __future__ import annotations

import pytest
import torch

from lightning_fpq.philox import PhiloxGenerator, philox4x32, philox_uniform4, philox_words, stream_draws

M = 0xFFFFFFFF

# Random123's known-answer vectors for philox4x32 with 10 rounds (kat_vectors):
# counter words, key words, output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox4x32_10_matches_the_known_answers(counter, key, expected):
    out = philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(w) for w in out] == list(expected)


def test_words_take_the_seed_as_key_and_the_counter_as_the_low_two_words():
    # seed = key1 * 2**32 + key0, counter c = c1 * 2**32 + c0, c2 = c3 = 0
    key = (0xA4093822, 0x299F31D0)
    seed = key[1] << 32 | key[0]
    c = torch.tensor([0x05A308D3 << 32 | 0x243F6A88, 0, 2**40 + 7])
    expected = torch.stack(philox4x32((c & M, c >> 32, torch.zeros_like(c), torch.zeros_like(c)), key), dim=-1)
    assert torch.equal(philox_words(seed, c), expected)


def _fold_and_scale(words: torch.Tensor) -> torch.Tensor:
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~w for w < 0
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def test_uniform_folds_the_signed_word_and_stays_below_one():
    # w and ~w (as int32) give the same draw; the largest fold, 2**31 - 1, still maps below 1.
    counters = torch.arange(50_000)
    u = philox_uniform4(5, counters)
    assert u.shape == (50_000, 4) and u.dtype == torch.float32
    assert bool((u >= 0).all()) and bool((u < 1).all())
    assert torch.equal(u, _fold_and_scale(philox_words(5, counters)))
    top = torch.tensor(2**31 - 1, dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    assert float(top) < 1.0


def test_stream_draw_d_is_word_d_mod_4_of_counter_d_div_4():
    words = philox_uniform4(77, torch.arange(10, 13))  # counters 10, 11, 12: draws 40 .. 51
    assert torch.equal(stream_draws(77, 40, 12), words.reshape(-1))
    assert torch.equal(stream_draws(77, 40, 10), words.reshape(-1)[:10])  # a call that is not a multiple of 4
    with pytest.raises(ValueError, match="first=42 is not valid"):
        stream_draws(77, 42, 4)


def test_uniform_draws_look_uniform():
    u = stream_draws(123, 0, 200_000).double()
    assert abs(float(u.mean()) - 0.5) < 0.005  # sd of the mean: 0.29 / sqrt(2e5) = 0.00065
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float(counts.min()) > 19_000 and float(counts.max()) < 21_000
    # neighbouring draws (words of one counter, and across counters) are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:-4], u[4:]]))[0, 1])) < 0.01


def test_generator_hands_out_consecutive_draws_each_call_on_a_fresh_counter():
    g = PhiloxGenerator(seed=42)
    a = g.uniform((3, 5))  # 15 draws: the stream moves to 16
    b = g.uniform((7,))
    assert g.offset == 24
    whole = stream_draws(42, 0, 24)
    assert torch.equal(a.reshape(-1), whole[:15]) and torch.equal(b, whole[16:23])
    assert g.reserve(10) == (42, 24) and g.offset == 36


def test_generator_draws_in_chunks_equal_one_pass():
    # uniform() computes long ranges chunk by chunk (to stay in cache): same values as one pass
    n = 3 * (1 << 16) + 5
    first = 4 * (2**32 - 70_000)  # the range crosses a 32-bit counter boundary
    g = PhiloxGenerator(seed=99, offset=first)
    counters = torch.arange(first // 4, (first + n + 3) // 4)
    assert torch.equal(g.uniform((n,)), philox_uniform4(99, counters).reshape(-1)[:n])


def test_generator_state_round_trips_and_reseeding_restarts():
    g = PhiloxGenerator(seed=7)
    g.uniform((100,))
    state = g.get_state()
    nxt = g.uniform((50,))
    g.uniform((1000,))
    assert torch.equal(PhiloxGenerator().set_state(state).uniform((50,)), nxt)
    assert g.manual_seed(7).offset == 0 and g.initial_seed() == 7
    assert torch.equal(g.uniform((4,)), PhiloxGenerator(7).uniform((4,)))
    with pytest.raises(ValueError, match="offset=6 is not valid: a call's draws start on a counter"):
        PhiloxGenerator(7, offset=6)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3"])
def test_invalid_seeds_name_the_value_and_the_range(seed):
    with pytest.raises(ValueError, match=r"seed=.* is not valid: expected an int in \[0, 2\*\*63\)"):
        PhiloxGenerator(seed)


def test_a_torch_generator_state_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"int64 tensor \[seed, offset\].*rng='torch'"):
        PhiloxGenerator().set_state(torch.Generator().get_state())
