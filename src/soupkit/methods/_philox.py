"""Philox4x32-10: the counter-based generator of the stochastic drops (DARE, DELLA).

Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011
(Random123). A Philox draw is a pure function of a 64-bit key and a 128-bit counter, so any
element's draw can be computed on its own: the result of a drop does not depend on how a tensor
is cut into pieces, in which order the pieces run or on how many threads run them. This module
is the reference (vectorised int64 torch arithmetic); the native kernels
(`soupkit.kernels.sparsify`) compute the same words and are tested against it.

The stream of a drop:

- key ``(k0, k1)``: the low and high 32 bits of the 64-bit seed of the tensor (the engine
  derives it from the recipe ``seed`` and the tensor name, `CounterRNG.key`);
- element ``e`` (flat index in the whole tensor: ``CounterRNG.offset`` + index in the piece) of
  model ``m`` (its position in the recipe) reads word ``e % 4`` of the block of counter
  ``(e // 4 mod 2^32, e // 4 div 2^32, m, 0)``;
- the uniform draw is ``u = (word >> 8) / 2^24`` (24 bits, exact in float32, in ``[0, 1)``).

A model's draws depend only on (key, model position, element index): changing one model's
density never changes another model's mask. The words are checked against the published
known-answer vectors of Random123's ``kat_vectors`` (tests/methods/test_philox.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "CounterRNG",
    "counter_rng",
    "keep_threshold",
    "philox4x32_10",
    "uniform24",
    "words",
]

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9  # the key schedule's Weyl increments (golden ratio, sqrt(3) - 1)
_W1 = 0xBB67AE85
_MASK = 0xFFFFFFFF
ROUNDS = 10


@dataclass(frozen=True)
class CounterRNG:
    """The random source of a stochastic method: a 64-bit key and the flat index of element 0.

    Attributes:
        key: the tensor's seed, ``0 <= key < 2^64`` (the engine's
            ``tensor_seed(seed, tensor name)``).
        offset: the flat index, in the whole tensor, of the first element the method is given
            (a piece of a tensor starting at element ``a`` has ``offset = a``).
    """

    key: int
    offset: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.key < 1 << 64:
            raise ValueError(f"CounterRNG key must be in [0, 2^64), got {self.key}")
        if not 0 <= self.offset < 1 << 62:
            raise ValueError(f"CounterRNG offset must be in [0, 2^62), got {self.offset}")

    def at(self, offset: int) -> CounterRNG:
        """The same key, for a piece starting ``offset`` elements further on."""
        return CounterRNG(self.key, self.offset + offset)


def counter_rng(rng: CounterRNG | torch.Generator | None) -> CounterRNG:
    """The `CounterRNG` a stochastic method draws from.

    A ``torch.Generator`` (what the engine and older callers pass) stands for its seed: its
    ``initial_seed()`` becomes the key, with offset 0, and it is not advanced.

    Raises:
        ValueError: ``rng`` is None (a stochastic method was called without a random source).
    """
    if isinstance(rng, CounterRNG):
        return rng
    if isinstance(rng, torch.Generator):
        return CounterRNG(rng.initial_seed() & ((1 << 64) - 1))
    raise ValueError(
        "this method is stochastic: pass rng=soupkit.methods.CounterRNG(seed) "
        "(or a seeded torch.Generator, whose seed is used)"
    )


def philox4x32_10(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int,
    k1: int,
    rounds: int = ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 (``rounds`` rounds, 10 by default) of the counters ``(c0, c1, c2, c3)``
    (int64 tensors holding uint32 words; consumed) under key ``(k0, k1)``: four int64 tensors
    of uint32 words, as Random123's ``philox4x32_R``.

    The 64-bit product of two 32-bit words wraps around in int64 (two's complement, as torch's
    integer multiplication does on every CPU), so its bits are the unsigned product's: ``>> 32``
    then ``& 0xFFFFFFFF`` gives the high word, ``& 0xFFFFFFFF`` the low one. The known-answer
    tests (the all-ones vector overflows every product) would catch a platform that differs.
    """
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = c0.mul_(_M0)
        p1 = c2.mul_(_M1)
        n0 = (p1 >> 32).bitwise_and_(_MASK).bitwise_xor_(c1).bitwise_xor_(k0)
        n2 = (p0 >> 32).bitwise_and_(_MASK).bitwise_xor_(c3).bitwise_xor_(k1)
        c1 = p1.bitwise_and_(_MASK)
        c3 = p0.bitwise_and_(_MASK)
        c0, c2 = n0, n2
    return c0, c1, c2, c3


_CHUNK = 1 << 14  # counters per round of torch calls: the int64 work tensors stay in cache


def words(rng: CounterRNG, stream: int, n: int) -> torch.Tensor:
    """The ``n`` Philox words (int64 holding uint32) of elements ``rng.offset .. + n`` of
    stream ``stream`` (the model's position).

    The counters run ``_CHUNK`` at a time (each word's int64 tensor then stays in the CPU's
    cache across the ten rounds: 1.2-1.8x less CPU than whole-tensor passes for 2^20
    elements, benchmarks/README.md); each
    counter's words depend on that counter alone, so the chunking changes no word."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    first = rng.offset >> 2
    nq = ((rng.offset + n - 1) >> 2) - first + 1
    out = torch.empty(nq, 4, dtype=torch.int64)
    q = torch.empty(min(nq, _CHUNK), dtype=torch.int64)
    for a in range(0, nq, _CHUNK):
        m = min(_CHUNK, nq - a)
        qa = torch.arange(first + a, first + a + m, out=q[:m])
        block = philox4x32_10(
            qa & _MASK,
            qa >> 32,
            torch.full_like(qa, stream & _MASK),
            torch.zeros_like(qa),
            rng.key & _MASK,
            rng.key >> 32,
        )
        for i, w in enumerate(block):
            out[a : a + m, i] = w
    start = rng.offset & 3
    return out.reshape(-1)[start : start + n]


def uniform24(rng: CounterRNG, stream: int, n: int) -> torch.Tensor:
    """The 24-bit integer draws ``word >> 8`` (int64, ``0 <= v < 2^24``); ``u = v / 2^24``."""
    return words(rng, stream, n) >> 8


def keep_threshold(density: float) -> int:
    """``T`` such that ``v < T`` exactly when ``v / 2^24 < density`` (real numbers): an entry
    with draw ``v`` survives a DARE drop of ``density`` when ``v < T``."""
    return min(1 << 24, max(0, math.ceil(density * (1 << 24))))
