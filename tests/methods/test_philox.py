"""The counter-based generator of DARE / DELLA: Philox4x32-10 known answers, stream layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soupkit.methods import CounterRNG, _philox

# Random123 1.14, examples/kat_vectors: "philox4x32 10", counter (4 words), key (2 words),
# expected output (4 words); the published known-answer test of Salmon et al. (SC 2011).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("ctr", "key", "want"), KAT)
def test_philox4x32_10_known_answers(
    ctr: tuple[int, ...], key: tuple[int, int], want: tuple[int, ...]
) -> None:
    out = _philox.philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], *key)
    assert tuple(int(o[0]) for o in out) == want


def _scalar_philox(ctr: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 on Python integers, written from the paper's round function: the
    independent reference for the vectorised one."""
    c, k = list(ctr), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) % 2**32, (k[1] + 0xBB67AE85) % 2**32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 % 2**32, (p0 >> 32) ^ c[3] ^ k[1], p0 % 2**32]
    return c


@settings(max_examples=50, deadline=None)
@given(
    key=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**40),
    stream=st.integers(0, 50),
    n=st.integers(0, 13),
)
def test_words_follow_the_documented_counter_layout(
    key: int, offset: int, stream: int, n: int
) -> None:
    got = _philox.words(CounterRNG(key, offset), stream, n).tolist()
    want = []
    for e in range(offset, offset + n):
        q = e >> 2
        block = _scalar_philox([q % 2**32, q >> 32, stream, 0], [key % 2**32, key >> 32])
        want.append(block[e & 3])
    assert got == want


def test_keep_threshold_is_the_exact_real_comparison() -> None:
    for density in (0.0, 1e-9, 0.3, 0.5, 1 - 2**-30, 1.0):
        t = _philox.keep_threshold(density)
        assert t == 0 or (t - 1) / 2**24 < density
        assert t == 2**24 or t / 2**24 >= density
    assert _philox.keep_threshold(0.5) == 2**23


def test_a_torch_generator_stands_for_its_seed_and_none_is_refused() -> None:
    assert _philox.counter_rng(torch.Generator().manual_seed(7)) == CounterRNG(7)
    rng = CounterRNG(3, 10)
    assert _philox.counter_rng(rng) is rng
    assert rng.at(5) == CounterRNG(3, 15)
    with pytest.raises(ValueError, match="this method is stochastic"):
        _philox.counter_rng(None)
    with pytest.raises(ValueError, match="key must be in"):
        CounterRNG(-1)


def test_uniform_draws_are_uniform() -> None:
    v = _philox.uniform24(CounterRNG(123), 0, 1 << 18).to(torch.float64) / 2**24
    assert abs(v.mean().item() - 0.5) < 0.003
    hist = torch.histc(v, bins=16, min=0, max=1)
    assert (hist - (1 << 14)).abs().max() < 5 * 128  # ~5 sigma of a binomial count
