"""Counter-based stochastic-rounding noise: Triton's ``tl.rand4x`` stream, reproduced in torch.

Stochastic rounding needs one uniform draw per element. ``torch.rand`` on a generator
(the default, ``rng="torch"``) has to be written to memory as a float32 tensor and read
again by the quantizer. A counter-based generator needs no such tensor: draw ``d`` is a pure
function of ``(seed, d)``, so a kernel can compute it where it needs it. This module defines
that function once, in torch, equal bit for bit to what the Triton quantize kernel computes
with ``tl.rand4x(seed, d // 4)`` (``triton/language/random.py``):

- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with
  key ``(seed mod 2**32, seed div 2**32)`` and counter ``(c mod 2**32, c div 2**32, 0, 0)``
  gives four 32-bit words; draw ``d`` is word ``d mod 4`` of counter ``c = d div 4``, so one
  Philox evaluation (ten rounds of two 32 x 32-bit products) serves four elements;
- each word, read as a signed int32 ``w``, is folded to ``w' = w`` when ``w >= 0`` and ``~w``
  otherwise (so ``w'`` is in [0, 2**31 - 1]);
- ``u = float32(w') * float32(4.6566127342e-10)``, both roundings to nearest, always < 1.

:class:`PhiloxGenerator` is the stream a layer draws from: a seed and an offset, the offset
advancing by the number of draws each call, rounded up to a multiple of four (so that every
call starts on a fresh counter and no two calls share one), as torch's CUDA generator advances
its Philox offset. Its ``get_state``/``set_state`` make resuming from a checkpoint exact.

The reference computes the words in int64 without overflow: each 32 x 32-bit product is
formed from two 32 x 16-bit products (below 2**48), so every device and dtype path agrees.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # the key's Weyl increments
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # the round multipliers
ROUNDS = 10
_TO_UNIFORM = 4.6566127342e-10  # triton's scale: the largest with (2**31 - 1) * scale < 1 in float32
MAX_SEED = 2**63  # seeds and offsets are non-negative int64
_CHUNK = 1 << 16  # draws computed at once by PhiloxGenerator.uniform (a multiple of 4)


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a * x) div 2**32`` and ``(a * x) mod 2**32`` for a 32-bit constant ``a`` and a tensor
    of 32-bit values, in int64 arithmetic that never overflows."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = x_hi * a, x_lo * a  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int], rounds: int = ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 (``rounds`` rounds) of four int64 tensors of 32-bit counter words under a
    two-word key: the four output words, int64 values in [0, 2**32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four output words of Philox4x32-10 for key ``seed`` and each counter in ``counters``
    (int64, non-negative), on a new last dimension: int64 values in [0, 2**32)."""
    return _words(key_words(seed), counters)


def philox_uniform4(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """float32 draws in [0, 1), four per counter on a new last dimension:
    ``tl.rand4x(seed, counters)`` bit for bit."""
    return uniform4_from_key(key_words(seed), counters)


def stream_draws(seed: int, first: int, n: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Draws ``first .. first + n - 1`` of the stream of ``seed`` (``first`` a multiple of 4):
    draw ``d`` is ``philox_uniform4(seed, d // 4)[d % 4]``. float32, shape ``(n,)``."""
    if first % 4:
        raise ValueError(f"first={first} is not valid: a call's draws start on a counter (a multiple of 4)")
    counters = torch.arange(first // 4, (first + n + 3) // 4, dtype=torch.int64, device=device)
    return philox_uniform4(seed, counters).reshape(-1)[:n]


def uniform4_from_key(key: Union[tuple[int, int], torch.Tensor], counters: torch.Tensor) -> torch.Tensor:
    """:func:`philox_uniform4` with the seed given as its two key words (ints, or an int64 tensor
    of two: a compiled graph takes them as data, so a new seed does not recompile it)."""
    w = _words(key, counters)
    folded = torch.where(w >= 2**31, _M32 - w, w)  # int32 w < 0  ->  ~w = 2**32 - 1 - w (unsigned)
    scale = torch.tensor(_TO_UNIFORM, dtype=torch.float32, device=folded.device)
    return folded.to(torch.float32) * scale


def key_words(seed: int) -> tuple[int, int]:
    """The two 32-bit key words of ``seed`` (see :func:`uniform4_from_key`)."""
    check_seed(seed, "seed")
    return seed & _M32, (seed >> 32) & _M32


def _words(key, counters: torch.Tensor) -> torch.Tensor:
    c = counters.to(torch.int64)
    zero = torch.zeros_like(c)
    return torch.stack(philox4x32((c & _M32, (c >> 32) & _M32, zero, zero), (key[0], key[1])), dim=-1)


def check_seed(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_SEED:
        raise ValueError(f"{name}={value!r} is not valid: expected an int in [0, 2**63)")
    return value


def _check_offset(value: int) -> int:
    check_seed(value, "offset")
    if value % 4:
        raise ValueError(f"offset={value} is not valid: a call's draws start on a counter, a multiple of 4")
    return value


class PhiloxGenerator:
    """A counter-based stochastic-rounding stream with ``torch.Generator``'s seeding and state
    methods: each call of :meth:`reserve` hands out the next ``n`` counters.

    Pass it wherever the quantizers take ``generator=``: the reference and compiled
    quantizers compute the draws with :func:`stream_draws`, the Triton kernel computes the
    same draws in registers (no noise tensor), so every backend rounds identically.
    The element at row-major position ``i`` of a quantized tensor gets draw ``offset + i``.
    """

    def __init__(self, seed: int = 0, offset: int = 0) -> None:
        self._seed = check_seed(seed, "seed")
        self._offset = _check_offset(offset)

    def manual_seed(self, seed: int) -> PhiloxGenerator:
        self._seed = check_seed(seed, "seed")
        self._offset = 0
        return self

    def initial_seed(self) -> int:
        return self._seed

    @property
    def offset(self) -> int:
        """The draw the next call starts at (a multiple of 4)."""
        return self._offset

    def reserve(self, n: int) -> tuple[int, int]:
        """``(seed, offset)`` for the next ``n`` draws; the stream moves past them, to the next
        multiple of 4 (the next call starts on a fresh counter)."""
        start = self._offset
        self._offset = (start + -(-int(n) // 4) * 4) % MAX_SEED
        return self._seed, start

    def uniform(self, shape: Union[torch.Size, tuple[int, ...]], device: Optional[torch.device] = None) -> torch.Tensor:
        """The next ``prod(shape)`` draws as a float32 tensor of ``shape``, in row-major order."""
        n = 1
        for size in shape:
            n *= int(size)
        seed, start = self.reserve(n)
        out = torch.empty(n, dtype=torch.float32, device=device)
        # in chunks (a multiple of 4 draws): the ~250 elementwise int64 passes of 10 rounds then
        # run in cache, about 13x faster on CPU than over the whole range at once (same values)
        for begin in range(0, n, _CHUNK):
            size = min(_CHUNK, n - begin)
            out[begin : begin + size] = stream_draws(seed, start + begin, size, device)
        return out.view(shape)

    def get_state(self) -> torch.Tensor:
        """``[seed, offset]`` as an int64 tensor (what a checkpoint stores)."""
        return torch.tensor([self._seed, self._offset], dtype=torch.int64)

    def set_state(self, state: torch.Tensor) -> PhiloxGenerator:
        values = torch.as_tensor(state)
        if values.dtype != torch.int64 or values.shape != (2,):
            raise ValueError(
                f"a PhiloxGenerator state is an int64 tensor [seed, offset], got {values.dtype} of shape "
                f"{tuple(values.shape)} (a torch.Generator's state? the run used rng='torch')"
            )
        self._seed = check_seed(int(values[0]), "seed")
        self._offset = _check_offset(int(values[1]))
        return self

    def __repr__(self) -> str:
        return f"PhiloxGenerator(seed={self._seed}, offset={self._offset})"


NoiseGenerator = Union[torch.Generator, PhiloxGenerator]
"""What the quantizers take as ``generator=``: torch's (``torch.rand`` draws) or the counter-based stream."""


def uniform_noise(
    shape: Union[torch.Size, tuple[int, ...]], generator: Optional[NoiseGenerator], device: torch.device
) -> torch.Tensor:
    """One float32 draw in [0, 1) per element of a tensor of ``shape``, in row-major order:
    ``torch.rand`` on a ``torch.Generator`` (or torch's default one), else the Philox stream."""
    if isinstance(generator, PhiloxGenerator):
        return generator.uniform(shape, device)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
