"""Greedy soup's running sum on the kernels (`soupkit.kernels.RunningSumOps`) gives the bytes of
its torch form (`soupkit.methods.linear.RunningSum` without ``ops``).

Every ISA this CPU runs, float32 / bfloat16 / float16 soups and ingredients, sizes around vector
and piece edges, NaNs with payloads, Infs and overflow boundaries (tests/kernels/reference.py),
counts far beyond the ingredients added, and pieces split over several threads: the float32
sum after every add and every mean (with and without a candidate ingredient) are equal byte for
byte, and the kernels ran.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import soupkit.kernels as kernels
from soupkit.methods.linear import RunningSum

from .reference import DTYPES, first_difference, make_input, same_bytes
from .test_elementwise import AVAILABLE_ISAS, SIZES


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # split calls into pieces from a few elements on, so that threads are exercised on small sizes
    monkeypatch.setattr(kernels, "_SPLIT_MIN", 64)
    monkeypatch.setattr(kernels, "_SPLIT_ALIGN", 64)


@pytest.fixture
def one_torch_thread() -> object:
    # float16 inputs run on the kernels only while torch converts on one thread
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": x, "steps": torch.arange(3)}


@st.composite
def cases(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    n = draw(st.one_of(st.sampled_from(SIZES), st.integers(0, 700)))
    k = draw(st.integers(1, 5))
    dts = [draw(st.sampled_from(DTYPES)) for _ in range(k + 1)]  # k added, one candidate
    seed = draw(st.integers(0, 2**31))
    specials = draw(st.sampled_from([0, 0, 1, 3, 40]))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e4, 1e-40, 3e38]))
    xs = [make_input(n, d, seed + i, scale, specials) for i, d in enumerate(dts)]
    count = draw(st.sampled_from([None, None, 3, 7, 1000, 12345]))
    return xs, count, draw(st.sampled_from(AVAILABLE_ISAS)), draw(st.integers(1, 3))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_running_sum_bytes(case, monkeypatch, one_torch_thread, small_pieces) -> None:  # type: ignore[no-untyped-def]
    xs, count, isa, threads = case
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    ops = kernels.running_sum_ops(threads)
    assert ops is not None
    ref, fast = RunningSum(_state(xs[0])), RunningSum(_state(xs[0]), ops=ops)
    *added, extra = xs[1:]

    def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert same_bytes(a, b), (what, isa, threads, first_difference(a, b))

    same(fast._acc["w"], ref._acc["w"], "first")
    for i, x in enumerate(added):
        ref.add("w", x)
        fast.add("w", x)
        ref.added()
        fast.added()
        same(fast._acc["w"], ref._acc["w"], f"sum after add {i + 1}")
    if count is not None:
        ref.count = fast.count = count
    same(fast.mean("w"), ref.mean("w"), "mean")
    same(fast.mean("w", extra), ref.mean("w", extra), "mean with a candidate")
    assert torch.equal(fast.mean("steps"), ref.mean("steps"))
    # every operation ran on the kernels: the first, the adds, the two means
    assert ops.calls == 1 + len(added) + 2


def test_hand_computed_values() -> None:
    ops = kernels.running_sum_ops()
    assert ops is not None
    bf = torch.bfloat16
    r = RunningSum({"w": torch.tensor([1.0, 2.0, -3.0], dtype=bf)}, ops=ops)
    r.add("w", torch.tensor([2.0, 0.5, 3.0], dtype=bf))
    r.added()
    assert r._acc["w"].tolist() == [3.0, 2.5, 0.0]
    assert r.mean("w").dtype == bf and r.mean("w").tolist() == [1.5, 1.25, 0.0]
    # (sum + extra) / 3, rounded to bfloat16: 7/3 = 2.333.. -> 2.328125 (8 bits of mantissa)
    got = r.mean("w", torch.tensor([4.0, 0.5, 3.0], dtype=torch.float32))
    assert got.tolist() == [2.328125, 1.0, 1.0]
    assert ops.calls == 5  # the first, the add, three means


def test_declines_what_it_does_not_reproduce(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = kernels.running_sum_ops(1)
    assert ops is not None
    acc = torch.zeros(8)
    assert not ops.step(acc, torch.ones(8, dtype=torch.float64), 1.0)  # a dtype it does not read
    assert not ops.step(acc, torch.ones(16)[::2], 1.0)  # not contiguous
    assert not ops.step(acc, torch.ones(4), 1.0)  # another shape
    assert ops.mean(acc, 2.0, torch.float64) is None
    assert ops.mean(acc, float("inf"), torch.float32) is None
    if torch.get_num_threads() != 1:
        assert not ops.step(acc, torch.ones(8, dtype=torch.float16), 1.0)
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.running_sum_ops() is None
    assert not ops.step(acc, torch.ones(8), 1.0)  # switched off after it was made
    assert ops.calls == 0
    # RunningSum then runs torch, with the same result
    r = RunningSum({"w": torch.ones(8)}, ops=ops)
    r.add("w", torch.ones(8, dtype=torch.float64))
    r.added()
    assert r.mean("w").tolist() == [1.0] * 8


def test_threads_split_large_tensors_into_the_same_bytes() -> None:
    n = 3 * (1 << 18) + 4097
    x0 = make_input(n, torch.bfloat16, 1, 1.0, 40)
    x1 = make_input(n, torch.bfloat16, 2, 1e4, 40)
    outs = []
    for threads in (1, 2, 4):
        ops = kernels.running_sum_ops(threads)
        assert ops is not None
        r = RunningSum(_state(x0), ops=ops)
        r.add("w", x1)
        r.added()
        outs.append((r._acc["w"], r.mean("w"), r.mean("w", x0)))
        assert ops.calls == 4
    ref = RunningSum(_state(x0))
    ref.add("w", x1)
    ref.added()
    want = (ref._acc["w"], ref.mean("w"), ref.mean("w", x0))
    for got in outs:
        for a, b in zip(got, want):
            assert same_bytes(a, b), first_difference(a, b)
