"""The fused elementwise kernels give the torch reference's bytes (tests/kernels/reference.py).

For every ISA this CPU runs (forced through SOUPKIT_KERNELS_ISA), every (input dtype, output
dtype) pair among float32 / bfloat16 / float16, sizes around vector and block edges, weights of
every sign, and inputs holding NaNs with payloads, Infs, denormals and values that overflow the
output dtype: the output bytes and the count of NaN / Inf written equal the reference's.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import soupkit.kernels as kernels
from soupkit.methods import REGISTRY

from .reference import DTYPES, first_difference, make_input, nan_pile, reference, same_bytes

ISAS = ["portable", "avx2", "avx512"]
AVAILABLE_ISAS = (
    ISAS[: ISAS.index(kernels.best_isa()) + 1] if kernels.best_isa() is not None else ["portable"]
)
BLOCK = 2048  # _elementwise.c's EW_BLOCK
SIZES = [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 23]

sizes = st.one_of(st.sampled_from(SIZES), st.integers(0, 3 * BLOCK))
dtypes = st.sampled_from(DTYPES)
# No -0.0: the reference's weight caches (functools.lru_cache keyed by the float) treat -0.0 as
# 0.0, so its product's sign depends on which of the two was cached first (+ 0.0 maps -0.0 to 0.0).
weights = st.one_of(
    st.sampled_from([1.0, 0.5, -1.0, 0.0, 0.1, 3.0, 1e-3, -0.25, 1e30]),
    st.floats(-4, 4, allow_nan=False, width=32).map(lambda w: w + 0.0),
)


def run_kernel(method: str, params: dict[str, object], inputs, base, out_dtype):  # type: ignore[no-untyped-def]
    n = inputs[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    if method == "linear":
        bad = kernels.linear(out, inputs, params["weight"], normalize=params["normalize"])  # type: ignore[arg-type]
    elif method == "task_arithmetic":
        bad = kernels.task_arithmetic(
            out,
            inputs,
            base,
            params["weight"],  # type: ignore[arg-type]
            lam=params["lambda"],  # type: ignore[arg-type]
            normalize=params["normalize"],  # type: ignore[arg-type]
        )
    else:
        bad = kernels.wise_ft(out, base, inputs[0], params["alpha"])  # type: ignore[arg-type]
    return out, bad


@st.composite
def cases(draw: st.DrawFn, method: str):  # type: ignore[no-untyped-def]
    n = draw(sizes)
    k = 1 if method == "wise_ft" else draw(st.integers(1, 5))
    in_dtypes = [draw(dtypes) for _ in range(k)]
    base_dtype = draw(dtypes)
    out_dtype = draw(dtypes)
    seed = draw(st.integers(0, 2**31))
    specials = draw(st.sampled_from([0, 0, 1, 3, 40]))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e4, 1e-40, 3e38]))
    ws = tuple(draw(weights) for _ in range(k))
    if method == "linear":
        params: dict[str, object] = {"weight": ws, "normalize": draw(st.booleans())}
        if params["normalize"]:
            assume(sum(ws) != 0)
    elif method == "task_arithmetic":
        params = {
            "weight": ws,
            "lambda": draw(st.sampled_from([1.0, 0.5, -2.0, 1.0000001, 0.3])),
            "normalize": draw(st.booleans()),
        }
        if params["normalize"]:
            assume(sum(ws) != 0)
    else:
        params = {"alpha": draw(st.sampled_from([0.5, 0.0, 1.0, 0.3, 1.7, -0.2]))}
    inputs = [make_input(n, d, seed + i, scale, specials) for i, d in enumerate(in_dtypes)]
    base = make_input(n, base_dtype, seed + 99, scale, specials) if method != "linear" else None
    isa = draw(st.sampled_from(AVAILABLE_ISAS))
    return params, inputs, base, out_dtype, isa


def check(method: str, case, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    params, inputs, base, out_dtype, isa = case
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    assert kernels.isa() == isa
    ref, ref_bad = reference(method, params, inputs, base, out_dtype)
    out, bad = run_kernel(method, params, inputs, base, out_dtype)
    assert same_bytes(out, ref), (isa, first_difference(out, ref))
    assert bad == ref_bad


SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(case=cases("linear"))
def test_linear_bytes(case, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    check("linear", case, monkeypatch)


@SETTINGS
@given(case=cases("task_arithmetic"))
def test_task_arithmetic_bytes(case, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    check("task_arithmetic", case, monkeypatch)


@SETTINGS
@given(case=cases("wise_ft"))
def test_wise_ft_bytes(case, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    check("wise_ft", case, monkeypatch)


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_every_dtype_pair_and_size(
    isa: str, in_dtype: torch.dtype, out_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pair and every edge size, deterministically (hypothesis samples them above)."""
    for n in SIZES:
        for specials in (0, 5):
            inputs = [make_input(n, in_dtype, 7 * n + i, 1.0, specials) for i in range(3)]
            base = make_input(n, in_dtype, 5 * n, 1.0, specials)
            for method, params in [
                ("linear", {"weight": (0.2, 0.3, 0.5), "normalize": True}),
                (
                    "task_arithmetic",
                    {"weight": (1.0, -0.5, 0.7), "lambda": 0.9, "normalize": False},
                ),
                ("wise_ft", {"alpha": 0.4}),
            ]:
                check(method, (params, inputs, base, out_dtype, isa), monkeypatch)


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("linear", {"weight": (0.5, 2.0, -1.0), "normalize": False}),
        ("linear", {"weight": (1.0, 1.0, 1.0)}),
        ("task_arithmetic", {"weight": (0.5, 0.3, 0.9), "lambda": 0.7, "normalize": True}),
        ("task_arithmetic", {"weight": (1.0, 1.0, 1.0)}),
        ("wise_ft", {"alpha": 0.35}),
    ],
)
def test_for_method_binds_the_registry_params(method: str, raw: dict[str, object]) -> None:
    """for_method() reads the parameter objects the planner resolves (the registry's Params
    models) and its kernel gives the reference's bytes, for a base of another dtype too."""
    spec = REGISTRY[method]
    params = spec.params.model_validate(raw)
    k = 1 if method == "wise_ft" else 3
    in_dts = [torch.bfloat16, torch.float16, torch.float32][:k]
    inputs = [make_input(999, d, i, 1.0, 3) for i, d in enumerate(in_dts)]
    base = make_input(999, torch.float16, 50, 1.0, 3) if spec.needs_base else None
    fn = kernels.for_method(
        method, params, in_dts, None if base is None else base.dtype, torch.bfloat16
    )
    assert fn is not None
    out = torch.empty(999, dtype=torch.bfloat16)
    bad = fn(out, inputs, base)
    ref, ref_bad = reference(method, raw, inputs, base, torch.bfloat16)
    assert same_bytes(out, ref) and bad == ref_bad, first_difference(out, ref)


def test_for_method_declines_what_it_does_not_reproduce(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = REGISTRY["linear"].params.model_validate({"weight": (1.0, 1.0)})
    f32 = [torch.float32, torch.float32]
    assert kernels.for_method("linear", lin, f32, None, torch.float32) is not None
    assert kernels.for_method("linear", lin, [torch.float64] * 2, None, torch.float32) is None
    assert kernels.for_method("linear", lin, f32, None, torch.float64) is None
    slerp = REGISTRY["slerp"].params.model_validate({"t": 0.5})
    assert kernels.for_method("slerp", slerp, f32, torch.float32, torch.float32) is None
    ta = REGISTRY["task_arithmetic"].params.model_validate({"weight": (1.0, 1.0)})
    assert kernels.for_method("task_arithmetic", ta, f32, None, torch.float32) is None  # no base
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.for_method("linear", lin, f32, None, torch.float32) is None
    assert set(kernels.METHODS) == {"linear", "task_arithmetic", "wise_ft"}


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
def test_nan_operands_everywhere(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    for n in (1, 5, 8, 9, 16, 17, 33, 70):
        for di in DTYPES:
            for do in DTYPES:
                xs = [nan_pile(n, di, i) for i in range(3)]
                base = nan_pile(n, di, 11)
                for method, params in [
                    ("linear", {"weight": (0.2, 0.3, 0.5), "normalize": True}),
                    (
                        "task_arithmetic",
                        {"weight": (1.0, -0.5, 0.7), "lambda": 0.9, "normalize": True},
                    ),
                    ("wise_ft", {"alpha": 0.4}),
                ]:
                    check(
                        method,
                        (params, xs if method != "wise_ft" else xs[:1], base, do, isa),
                        monkeypatch,
                    )


def test_hand_computed_values() -> None:
    """Golden values: weighted mean, task arithmetic and WiSE-FT on exactly representable numbers."""
    a = torch.tensor([1.0, 2.0, -4.0, 0.5], dtype=torch.bfloat16)
    b = torch.tensor([3.0, 6.0, 4.0, 0.25], dtype=torch.float16)
    out = torch.empty(4, dtype=torch.float32)
    assert kernels.linear(out, [a, b], [1.0, 3.0]) == 0  # (a + 3b) / 4
    assert out.tolist() == [2.5, 5.0, 2.0, 0.3125]
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert kernels.task_arithmetic(out, [a, b], base, [1.0, 0.5], lam=2.0) == 0
    # base + 2 * ((a - 1) + 0.5 * (b - 1))
    assert out.tolist() == [
        1 + 2 * (0 + 1),
        1 + 2 * (1 + 2.5),
        1 + 2 * (-5 + 1.5),
        1 + 2 * (-0.5 - 0.375),
    ]
    assert kernels.wise_ft(out, base, a, 0.25) == 0  # 0.75 * base + 0.25 * a
    assert out.tolist() == [1.0, 1.25, -0.25, 0.875]


def test_nonfinite_count() -> None:
    """The count is of NaN / Inf *stored*: float32 values past float16's range count once cast."""
    x = torch.tensor([1.0, float("nan"), 70000.0, float("-inf"), 65519.0])
    out16 = torch.empty(5, dtype=torch.float16)
    assert kernels.linear(out16, [x], [1.0]) == 3
    out32 = torch.empty(5, dtype=torch.float32)
    assert kernels.linear(out32, [x], [1.0]) == 2


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
def test_pieces_on_threads_equal_sequential_pieces(
    isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine computes a tensor as pieces on several threads (one call per piece): the bytes
    do not depend on the thread count, and equal the reference computed piece by piece."""
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    n, piece = 50_001, 4_099
    inputs = [make_input(n, torch.bfloat16, i, 1.0, 30) for i in range(5)]
    ranges = [(s, min(n, s + piece)) for s in range(0, n, piece)]
    w = [0.1, 0.2, 0.3, 0.15, 0.25]

    def run(threads: int) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.bfloat16)

        def one(r: tuple[int, int]) -> int:
            s, e = r
            return kernels.linear(out[s:e], [x[s:e] for x in inputs], w)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            assert sum(pool.map(one, ranges)) == int((~torch.isfinite(out)).sum())
        return out

    one_thread = run(1)
    assert same_bytes(run(2), one_thread) and same_bytes(run(4), one_thread)
    ref = torch.cat(
        [
            reference(
                "linear", {"weight": tuple(w)}, [x[s:e] for x in inputs], None, torch.bfloat16
            )[0]
            for s, e in ranges
        ]
    )
    assert same_bytes(one_thread, ref), first_difference(one_thread, ref)


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
def test_unaligned_inputs_and_output(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs read straight from a file buffer may start at any even address."""
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    n = 1001

    def at_offset(x: torch.Tensor, off: int) -> torch.Tensor:
        buf = torch.empty(x.numel() * x.element_size() + off, dtype=torch.uint8)
        y = buf[off:].view(x.dtype)
        y.copy_(x)
        return y

    for dt in (torch.bfloat16, torch.float16):
        xs = [at_offset(make_input(n, dt, i, 1.0, 4), 2 + 4 * i) for i in range(3)]
        assert all(x.data_ptr() % 4 == 2 for x in xs)
        out = at_offset(torch.empty(n, dtype=dt), 6)
        bad = kernels.linear(out, xs, [0.5, 0.25, 0.25])
        ref, ref_bad = reference("linear", {"weight": (0.5, 0.25, 0.25)}, xs, None, dt)
        assert same_bytes(out, ref) and bad == ref_bad, first_difference(out, ref)


def test_bad_arguments_are_refused() -> None:
    x = torch.ones(8)
    with pytest.raises(ValueError, match="input 1 has 7 elements, out has 8"):
        kernels.linear(torch.empty(8), [x, torch.ones(7)], [1.0, 1.0])
    with pytest.raises(ValueError, match="must be a contiguous CPU tensor"):
        kernels.linear(torch.empty(8), [torch.ones(16)[::2]], [1.0])
    with pytest.raises(ValueError, match="2 inputs but 1 weights"):
        kernels.linear(torch.empty(8), [x, x], [1.0])
    with pytest.raises(ValueError, match="not supported here"):
        kernels.linear(torch.empty(8), [x.double()], [1.0])
    assert not kernels.supports([torch.float32], torch.float32, [float("nan")])
    assert kernels.supports([torch.float32] * kernels.MAX_INPUTS, torch.float32)
    assert not kernels.supports([torch.float32] * (kernels.MAX_INPUTS + 1), torch.float32)
    with pytest.raises(ValueError, match="not supported here"):
        kernels.linear(torch.empty(8), [x], [float("inf")])


def test_extension_refuses_malformed_programs() -> None:
    """The private entry point checks what it can, so a wrong call raises instead of crashing."""
    from soupkit.kernels import _elementwise as ext

    x, out = torch.ones(4), torch.empty(4)
    ok = (x.data_ptr(), 0, ext.SET_MUL, 1.0)
    args = (4, out.data_ptr(), 0, 0, 0, (ok,), 0, 1.0, 1.0, 0, 1, 0)
    assert ext.run(*args) == 0
    bad_calls = {
        "no output": (4, 0, *args[2:]),
        "no steps": (*args[:5], (), *args[6:]),
        "unknown dtype": (*args[:5], ((x.data_ptr(), 7, ext.SET_MUL, 1.0),), *args[6:]),
        "null input": (*args[:5], ((0, 0, ext.SET_MUL, 1.0),), *args[6:]),
        "first step adds": (*args[:5], ((x.data_ptr(), 0, ext.MUL_ADD, 1.0),), *args[6:]),
        "task vector without base": (
            *args[:5],
            ((x.data_ptr(), 0, ext.SUB_SET_MUL, 1.0),),
            *args[6:],
        ),
        "base added without base": (*args[:6], ext.ADD_BASE, *args[7:]),
        "negative n": (-1, *args[1:]),
    }
    for what, call in bad_calls.items():
        with pytest.raises(ValueError):
            ext.run(*call)
            pytest.fail(what)


SUBPROCESS_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from reference import make_input, nan_pile, reference, same_bytes, DTYPES
import soupkit.kernels as k
print(torch.backends.cpu.get_cpu_capability(), k._calibrate())
for n in (0, 1, 9, 17, 70, 2049, 5000):
    for di in DTYPES:
        for do in DTYPES:
          for piles in (False, True):
            xs = [nan_pile(n, di, i) if piles else make_input(n, di, 3 * n + i, 1.0, 9) for i in range(3)]
            base = nan_pile(n, di, 11) if piles else make_input(n, di, n, 1.0, 9)
            for m, p in [("linear", {"weight": (0.3, 0.3, 0.4)}),
                         ("task_arithmetic", {"weight": (1.0, 0.5, 0.2), "lambda": 0.7}),
                         ("wise_ft", {"alpha": 0.3})]:
                ref, bad = reference(m, p, xs if m != "wise_ft" else xs[:1], base if m != "linear" else None, do)
                out = torch.empty(n, dtype=do)
                if m == "linear":
                    got = k.linear(out, xs, p["weight"])
                elif m == "task_arithmetic":
                    got = k.task_arithmetic(out, xs, base, p["weight"], lam=0.7)
                else:
                    got = k.wise_ft(out, base, xs[0], 0.3)
                assert same_bytes(out, ref) and got == bad, (m, n, di, do)
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_calibration_follows_torchs_cpu_capability(capability: str) -> None:
    """torch's portable kernels round addcmul_ twice and write 0x7FC0 for a bfloat16 NaN; its
    AVX2 / AVX-512 kernels fuse the multiply-add and write 0xFFFF. The kernels measure which
    torch this process runs and match it (here torch forced by ATEN_CPU_CAPABILITY)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CHECK, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    assert capability.upper() in r.stdout
