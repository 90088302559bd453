"""soupkit's native kernels: the merge pass fused into one read of each input.

The C extension ``soupkit.kernels._elementwise`` (built by the package's own setup.py) computes
one piece of an elementwise merge in a single pass: it reads every input in its stored dtype
(float32, bfloat16 or float16), converts to float32, combines, converts to the output dtype and
counts the stored values that are NaN or +-Inf. Its results are the bytes of soupkit's torch
reference (``methods/linear.py``, ``methods/task_arithmetic.py``, ``methods/wise_ft.py`` run on
float32 copies, then ``Tensor.copy_`` into the output dtype), NaN payloads included:
tests/kernels/ compares them byte for byte.

One call is one piece on the calling thread, with the GIL released: the engine already splits
a tensor into pieces across its compute threads. The functions here take contiguous CPU
tensors: the inputs in their own dtypes (what the reader returns), an output tensor of ``n``
elements in the output dtype, and the method's parameters.

Switches (environment variables, read at every call):

- ``SOUPKIT_KERNELS=0`` turns the kernels off: `available()` is False and soupkit runs its
  torch implementation (same bytes, slower).
- ``SOUPKIT_KERNELS_ISA=portable|avx2|avx512`` caps the instruction set (at most what the
  CPU has; for tests and benchmarks). By default the best the CPU runs is chosen at import.

This module imports only torch, the standard library and the extension (no other soupkit
module), so every layer may use it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "DISABLE_ENV",
    "ISA_ENV",
    "MAX_INPUTS",
    "available",
    "METHODS",
    "RunningSumOps",
    "best_isa",
    "for_method",
    "isa",
    "linear",
    "running_sum_ops",
    "supports",
    "task_arithmetic",
    "wise_ft",
]

DISABLE_ENV = "SOUPKIT_KERNELS"
MAX_INPUTS = 4096  # inputs (models and base) of one call: _elementwise.c's EW_MAX_STEPS
ISA_ENV = "SOUPKIT_KERNELS_ISA"

_ext: ModuleType | None
try:
    from soupkit.kernels import _elementwise
except ImportError:  # built without a C compiler, or a source tree without `make kernels`
    _ext = None
else:
    _ext = _elementwise

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class _Calibration:
    """How this process's torch rounds where CPUs or torch builds may differ (measured once).

    Attributes:
        fused: ``Tensor.addcmul_`` rounds once (a fused multiply-add: torch's AVX2 / AVX-512
            kernels) rather than after the product and after the sum (its portable kernel).
        bf16_nan: the bfloat16 word torch stores for every float32 NaN (None: not one word,
            so bfloat16 outputs are not offered).
        f16_block: torch converts float16 to float32 in runs of this many elements; the last
            ``n % f16_block`` of a tensor go through another path (None: float16 inputs are not
            offered).
        f16_tail_nan: the float32 bits that path gives every float16 NaN.
    """

    fused: bool
    bf16_nan: int | None
    f16_block: int | None
    f16_tail_nan: int


_lock = threading.Lock()
_calibrated: _Calibration | None = None
_measured = False


def _bits32(x: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in x.view(torch.int32).tolist()]


def _from_bits(words: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` (32 or 16 bits) holding these bit patterns."""
    bits = 32 if dtype == torch.float32 else 16
    itype = torch.int32 if bits == 32 else torch.int16
    signed = [w - (1 << bits) if w >> (bits - 1) else w for w in words]
    return torch.tensor(signed, dtype=itype).view(dtype)


def _calibrate() -> _Calibration | None:
    """The calibration of this process (measured on first use); None when torch behaves in a
    way the kernels do not reproduce (then they are not used)."""
    global _calibrated, _measured
    with _lock:
        if not _measured:
            with torch.inference_mode(False):
                _calibrated = _measure()
            _measured = True
        return _calibrated


def _measure() -> _Calibration | None:
    assert _ext is not None
    # addcmul_: fused or not, decided by which of the two programs gives torch's bits
    g = torch.Generator().manual_seed(1234)
    acc, t = torch.randn(4099, generator=g), torch.randn(4099, generator=g)
    w = torch.tensor(0.1, dtype=torch.float32)
    ref = acc.clone().addcmul_(t, w)
    fused: bool | None = None
    for kind in (_ext.FMA, _ext.MUL_ADD):
        out = torch.empty_like(acc)
        steps = ((acc.data_ptr(), 0, _ext.SET_MUL, 1.0), (t.data_ptr(), 0, kind, float(w)))
        _ext.run(acc.numel(), out.data_ptr(), 0, 0, 0, steps, 0, 1.0, 1.0, 0, 1, 0)
        if torch.equal(out.view(torch.int32), ref.view(torch.int32)):
            fused = kind == _ext.FMA
            break
    if fused is None:
        return None
    # float32 NaN -> bfloat16: one word, whatever the payload, position and length?
    nans = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF]
    seen: set[int] = set()
    for n in (1, 7, 16, 33, 64):
        bf = _from_bits((nans * n)[:n], torch.float32).to(torch.bfloat16)
        seen.update(v & 0xFFFF for v in bf.view(torch.int16).tolist())
    bf16_nan = seen.pop() if len(seen) == 1 else None
    # float16 -> float32: which trailing elements take another path, and what a NaN becomes there
    starts: dict[int, int] = {}
    words: set[int] = set()
    for n in range(1, 70):
        got = _bits32(_from_bits(([0x7C01, 0xFE02] * n)[:n], torch.float16).float())
        want = ([0x7FC02000, 0xFFC04000] * n)[:n]
        odd = [i for i in range(n) if got[i] != want[i]]
        starts[n] = odd[0] if odd else n
        if odd != list(range(starts[n], n)):
            starts = {}  # not a trailing run: not a pattern the kernels know
            break
        words.update(got[i] for i in odd)
    blocks = [b for b in (1, 2, 4, 8, 16, 32, 64) if all(s == n - n % b for n, s in starts.items())]
    f16_block = blocks[0] if starts and blocks and len(words) <= 1 else None
    return _Calibration(fused, bf16_nan, f16_block, words.pop() if words else 0)


def _enabled() -> bool:
    return _ext is not None and os.environ.get(DISABLE_ENV, "1").strip() != "0"


_isa_env: str | None = None  # the SOUPKIT_KERNELS_ISA value applied last


def _apply_isa_env() -> None:
    global _isa_env
    want = os.environ.get(ISA_ENV, "").strip()
    if want == _isa_env:
        return
    assert _ext is not None
    _ext.set_isa(want or _ext.best_isa())  # ValueError names the levels this CPU runs
    _isa_env = want


def available() -> bool:
    """True when the native kernels are built and not switched off (``SOUPKIT_KERNELS=0``)."""
    return _enabled() and _calibrate() is not None


def isa() -> str | None:
    """The instruction set the kernels use now: ``"avx512"``, ``"avx2"`` or ``"portable"``
    (None when they are not available)."""
    if not _enabled():
        return None
    assert _ext is not None
    _apply_isa_env()
    return str(_ext.isa())


def best_isa() -> str | None:
    """The best instruction set this CPU runs the kernels with (None when not built)."""
    return None if _ext is None else str(_ext.best_isa())


def supports(
    in_dtypes: Sequence[torch.dtype], out_dtype: torch.dtype, params: Sequence[float] = ()
) -> bool:
    """Whether the kernels reproduce the reference for these dtypes and parameter values.

    Args:
        in_dtypes: the dtypes of the inputs (and the base) as the reader returns them (at most
            `MAX_INPUTS`).
        out_dtype: the output dtype.
        params: the method's numeric parameters (weights, lambda, alpha): NaN or +-Inf ones
            are left to the reference.
    """
    if not _enabled() or out_dtype not in _CODES or any(d not in _CODES for d in in_dtypes):
        return False
    if len(in_dtypes) > MAX_INPUTS:
        return False
    cal = _calibrate()
    if cal is None:
        return False
    if out_dtype == torch.bfloat16 and cal.bf16_nan is None:
        return False
    if torch.float16 in in_dtypes and cal.f16_block is None:
        return False
    return all(math.isfinite(p) for p in params)


def _f32(values: Sequence[float]) -> list[float]:
    """The values rounded to float32, as ``torch.tensor(values, dtype=torch.float32)`` does."""
    return torch.tensor(list(values), dtype=torch.float32).tolist()


def _f32_sum(values: Sequence[float]) -> float:
    """The float32 sum the methods divide by: ``torch.tensor(values, dtype=float32).sum()``."""
    return float(torch.tensor(list(values), dtype=torch.float32).sum())


@dataclass(frozen=True)
class _Program:
    """One method's parameters for one tensor, as the extension runs them: built once, then
    run once per piece (a few microseconds of Python per call)."""

    kinds: tuple[int, ...]  # one step kind per input (_elementwise's SET_MUL, FMA, ...)
    weights: tuple[float, ...]  # float32 values
    flags: int
    total: float
    lam: float
    in_codes: tuple[int, ...]
    base_code: int | None
    out_code: int
    cal: _Calibration

    def run(
        self, out: torch.Tensor, inputs: Sequence[torch.Tensor], base: torch.Tensor | None
    ) -> int:
        n = out.numel()
        tensors = [out, *inputs] if base is None else [out, *inputs, base]
        codes = (self.out_code, *self.in_codes) + (() if base is None else (self.base_code,))
        if (
            len(inputs) != len(self.kinds)
            or (base is None) != (self.base_code is None)
            or not all(
                t.is_cpu and t.is_contiguous() and t.numel() == n and _CODES.get(t.dtype) == c
                for t, c in zip(tensors, codes)
            )
        ):
            raise self._mismatch(out, inputs, base)
        if n == 0:
            return 0
        assert _ext is not None
        _apply_isa_env()
        return int(
            _ext.run(
                n,
                out.data_ptr(),
                self.out_code,
                0 if base is None else base.data_ptr(),
                0 if self.base_code is None else self.base_code,
                tuple(
                    (x.data_ptr(), c, kind, w)
                    for x, c, kind, w in zip(inputs, self.in_codes, self.kinds, self.weights)
                ),
                self.flags,
                self.total,
                self.lam,
                self.cal.bf16_nan or 0,
                self.cal.f16_block or 1,
                self.cal.f16_tail_nan,
            )
        )

    def _mismatch(
        self, out: torch.Tensor, inputs: Sequence[torch.Tensor], base: torch.Tensor | None
    ) -> ValueError:
        """What is wrong with the tensors of a call (the checks in `run`, spelled out)."""
        if len(inputs) != len(self.kinds) or (base is None) != (self.base_code is None):
            return ValueError(
                f"soupkit.kernels: {len(inputs)} inputs{'' if base is None else ' and a base'}, "
                f"expected {len(self.kinds)}{'' if self.base_code is None else ' and a base'}"
            )
        named: list[tuple[str, torch.Tensor, int | None]] = [("out", out, self.out_code)]
        named += [(f"input {i}", x, c) for i, (x, c) in enumerate(zip(inputs, self.in_codes))]
        if base is not None:
            named.append(("base", base, self.base_code))
        for what, t, code in named:
            if not t.is_cpu or not t.is_contiguous():
                return ValueError(f"soupkit.kernels: {what} must be a contiguous CPU tensor")
            if t.numel() != out.numel():
                return ValueError(
                    f"soupkit.kernels: {what} has {t.numel()} elements, out has {out.numel()}"
                )
            if _CODES.get(t.dtype) != code:
                return ValueError(f"soupkit.kernels: {what} is {t.dtype}, not the program's dtype")
        return ValueError("soupkit.kernels: inconsistent call")


def _program(
    kinds: Sequence[int],
    weights: Sequence[float],
    flags: int,
    in_dtypes: Sequence[torch.dtype],
    base_dtype: torch.dtype | None,
    out_dtype: torch.dtype,
    params: Sequence[float],
    total: float = 1.0,
    lam: float = 1.0,
) -> _Program | None:
    dts = [*in_dtypes, *([base_dtype] if base_dtype is not None else [])]
    if not in_dtypes or not supports(dts, out_dtype, params):
        return None
    cal = _calibrate()
    assert cal is not None  # supports() said yes
    return _Program(
        tuple(kinds),
        tuple(_f32(weights)),
        flags,
        total,
        lam,
        tuple(_CODES[d] for d in in_dtypes),
        None if base_dtype is None else _CODES[base_dtype],
        _CODES[out_dtype],
        cal,
    )


def _linear_program(
    weights: Sequence[float],
    normalize: bool,
    in_dtypes: Sequence[torch.dtype],
    out_dtype: torch.dtype,
) -> _Program | None:
    if _ext is None or len(weights) != len(in_dtypes):
        return None
    kinds = list(_kinds(len(weights)))
    flags = _ext.DIV if normalize else 0
    total = _f32_sum(weights) if all(math.isfinite(w) for w in weights) else 1.0
    return _program(kinds, weights, flags, in_dtypes, None, out_dtype, weights, total)


def _task_arithmetic_program(
    weights: Sequence[float],
    lam: float,
    normalize: bool,
    in_dtypes: Sequence[torch.dtype],
    base_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> _Program | None:
    if _ext is None or len(weights) != len(in_dtypes):
        return None
    kinds = [_ext.SUB_SET_MUL] + [_ext.SUB_MUL_ADD] * (len(weights) - 1)
    flags = _ext.ADD_BASE | (_ext.DIV if normalize else 0) | (_ext.SCALE if lam != 1 else 0)
    params = [*weights, lam]
    finite = all(math.isfinite(v) for v in params)
    total = _f32_sum(weights) if finite else 1.0
    lam32 = _f32([lam])[0] if finite else 1.0
    return _program(kinds, weights, flags, in_dtypes, base_dtype, out_dtype, params, total, lam32)


def _wise_ft_program(
    alpha: float, zero_shot: torch.dtype, fine_tuned: torch.dtype, out_dtype: torch.dtype
) -> _Program | None:
    if _ext is None:
        return None
    kinds = [_ext.SET_MUL, _ext.MUL_ADD]
    # (1 - alpha) formed in double precision, as methods/wise_ft.py does
    return _program(
        kinds, [1.0 - alpha, alpha], 0, [zero_shot, fine_tuned], None, out_dtype, [alpha]
    )


def _unsupported(
    inputs: Sequence[torch.Tensor], out: torch.Tensor, params: Sequence[float]
) -> ValueError:
    return ValueError(
        "soupkit.kernels: not supported here: "
        f"inputs {[str(t.dtype) for t in inputs]}, out {out.dtype}, parameters {list(params)}"
        " (check soupkit.kernels.supports() first)"
    )


def linear(
    out: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
) -> int:
    """``out = sum_i w_i * inputs[i]`` (``/ sum_i w_i`` when ``normalize``), as `linear` computes it.

    The reference is ``soupkit.methods.linear`` on float32 copies of the inputs, then
    ``out.copy_(result)``: ``acc = x_0 * w_0``, ``acc.addcmul_(x_i, w_i)`` in order, then
    ``acc / sum(w)`` with the float32 sum of the float32 weights.

    Args:
        out: the output piece (float32, bfloat16 or float16), written in place.
        inputs: one tensor per model, ``out.numel()`` elements each, any of those dtypes.
        weights: one weight per model.
        normalize: divide by the sum of the weights.

    Returns:
        How many values written to ``out`` are NaN or +-Inf.
    """
    if len(weights) != len(inputs):
        raise ValueError(f"soupkit.kernels: {len(inputs)} inputs but {len(weights)} weights")
    prog = _linear_program(weights, normalize, [x.dtype for x in inputs], out.dtype)
    if prog is None:
        raise _unsupported(inputs, out, weights)
    return prog.run(out, inputs, None)


def task_arithmetic(
    out: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
) -> int:
    """``out = base + lam * sum_i w_i * (inputs[i] - base)`` (the sum ``/ sum_i w_i`` when
    ``normalize``), as `task_arithmetic` computes it.

    The reference: ``d_i = x_i - base``, ``m = d_0 * w_0``, ``m += d_i * w_i`` in order, then
    ``m / sum(w)``, ``m * lam`` (skipped for 1) and ``m + base``, each rounded to float32.

    Args:
        out: the output piece, written in place.
        inputs: one tensor per model.
        base: the base model's piece.
        weights: one weight per model.
        lam: the recipe's ``lambda``.
        normalize: divide the weighted sum by the sum of the weights.

    Returns:
        How many values written to ``out`` are NaN or +-Inf.
    """
    if len(weights) != len(inputs):
        raise ValueError(f"soupkit.kernels: {len(inputs)} inputs but {len(weights)} weights")
    prog = _task_arithmetic_program(
        weights, lam, normalize, [x.dtype for x in inputs], base.dtype, out.dtype
    )
    if prog is None:
        raise _unsupported([*inputs, base], out, [*weights, lam])
    return prog.run(out, inputs, base)


def wise_ft(
    out: torch.Tensor, zero_shot: torch.Tensor, fine_tuned: torch.Tensor, alpha: float
) -> int:
    """``out = (1 - alpha) * zero_shot + alpha * fine_tuned``, as `wise_ft` computes it: both
    products rounded to float32 (``1 - alpha`` formed in double precision), then added.

    Returns:
        How many values written to ``out`` are NaN or +-Inf.
    """
    prog = _wise_ft_program(alpha, zero_shot.dtype, fine_tuned.dtype, out.dtype)
    if prog is None:
        raise _unsupported([zero_shot, fine_tuned], out, [alpha])
    return prog.run(out, [zero_shot, fine_tuned], None)


class RunningSumOps:
    """The hot operations of greedy soup's float32 running sum (`soupkit.methods.linear.
    RunningSum`, which takes this as ``ops``) and of learned soup's mixture, on the kernels.

    Each operation returns None (or False) when the kernels do not reproduce torch's bytes for
    its tensors (a dtype they do not read, a non-contiguous tensor, float16 inputs while torch
    converts on several threads, or the kernels switched off since): the caller then runs its
    torch code. Otherwise the result is those bytes: ``linear``'s program with weights of 1 and
    the running sum's divisor (tests/kernels/test_running_sum.py compares them).

    One call splits its tensor into pieces on up to ``threads`` threads (default: torch's
    thread count at the call, so a worker's ``torch.set_num_threads`` applies); the pieces are
    computed exactly as one call would, so the bytes do not depend on the count.

    Attributes:
        calls: operations the kernels ran (for tests and benchmarks).
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.calls = 0

    def _prog(
        self,
        kinds: Sequence[int],
        weights: Sequence[float],
        ins: Sequence[torch.Tensor],
        out_dtype: torch.dtype,
        divisor: float | None,
    ) -> _Program | None:
        if not all(x.is_cpu and x.is_contiguous() for x in ins):
            return None
        dts = [x.dtype for x in ins]
        if torch.float16 in dts and torch.get_num_threads() != 1:
            return None  # torch converts float16 NaNs per thread range: not reproduced
        params = [*weights, *([] if divisor is None else [divisor])]
        assert _ext is not None
        flags = 0 if divisor is None else _ext.DIV
        return _program(kinds, weights, flags, dts, None, out_dtype, params, divisor or 1.0)

    def _run(self, prog: _Program, out: torch.Tensor, ins: Sequence[torch.Tensor]) -> None:
        _run_split(prog, out, ins, self.threads or torch.get_num_threads())
        self.calls += 1

    def scaled(self, x: torch.Tensor, w: float) -> torch.Tensor | None:
        """``x.to(float32) * w`` as a new float32 tensor (``w`` a float32 value)."""
        prog = self._prog(_kinds(1), (w,), (x,), torch.float32, None)
        if prog is None:
            return None
        out = torch.empty(x.shape, dtype=torch.float32)
        self._run(prog, out, (x,))
        return out

    def step(self, acc: torch.Tensor, x: torch.Tensor, w: float) -> bool:
        """``acc.addcmul_(x.to(float32), w)`` in place (``acc`` float32, ``w`` a float32 value);
        False: not done, run torch."""
        if acc.dtype != torch.float32 or acc.shape != x.shape:
            return False
        prog = self._prog(_kinds(2), (1.0, w), (acc, x), torch.float32, None)
        if prog is None:
            return False
        self._run(prog, acc, (acc, x))
        return True

    def mean(
        self,
        acc: torch.Tensor,
        divisor: float,
        dtype: torch.dtype,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``(acc / divisor).to(dtype)``, or with ``extra``
        ``(torch.addcmul(acc, extra.to(float32), 1) / divisor).to(dtype)``, as a new tensor."""
        ins = (acc,) if extra is None else (acc, extra)
        if acc.dtype != torch.float32 or (extra is not None and extra.shape != acc.shape):
            return None
        prog = self._prog(_kinds(len(ins)), (1.0,) * len(ins), ins, dtype, divisor)
        if prog is None:
            return None
        out = torch.empty(acc.shape, dtype=dtype)
        self._run(prog, out, ins)
        return out


def running_sum_ops(threads: int | None = None) -> RunningSumOps | None:
    """`RunningSumOps` when the kernels are available (built, calibrated, switched on), else
    None (the running sum runs torch)."""
    return RunningSumOps(threads) if available() else None


_SPLIT_MIN = 1 << 18  # elements below which one call stays on one thread
_SPLIT_ALIGN = 4096  # piece boundaries: a multiple of every float16 run and vector width
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the process id, its pool)


def _kinds(n: int) -> tuple[int, ...]:
    """The step kinds of ``x_0 * 1`` then ``n - 1`` times ``addcmul_`` in this process (fused
    or not, as calibrated)."""
    assert _ext is not None
    cal = _calibrate()
    fma = _ext.FMA if cal is not None and cal.fused else _ext.MUL_ADD
    return (_ext.SET_MUL,) + (fma,) * (n - 1)


def _run_split(
    prog: _Program, out: torch.Tensor, ins: Sequence[torch.Tensor], threads: int
) -> None:
    """``prog`` over the whole of ``out`` in up to ``threads`` pieces (one on this thread)."""
    global _pool
    n = out.numel()
    k = max(1, min(threads, n // _SPLIT_MIN))
    if k == 1:
        prog.run(out.view(-1), [x.view(-1) for x in ins], None)
        return
    step = -(-n // k // _SPLIT_ALIGN) * _SPLIT_ALIGN
    o, xs = out.view(-1), [x.view(-1) for x in ins]
    ranges = [(s, min(s + step, n)) for s in range(0, n, step)]
    with _lock:
        # one pool per process (a forked child has none of its parent's threads); more pieces
        # than workers wait their turn
        if _pool is None or _pool[0] != os.getpid():
            workers = os.cpu_count() or 1
            _pool = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="soupkit-kernels"))
        pool = _pool[1]
    futs = [pool.submit(prog.run, o[s:e], [x[s:e] for x in xs], None) for s, e in ranges[1:]]
    try:
        s, e = ranges[0]
        prog.run(o[s:e], [x[s:e] for x in xs], None)
    finally:
        for f in futs:  # every piece is finished (or failed) before the call returns
            f.result()


#: The merge methods the kernels compute (their float32 mode), by registry name.
METHODS = ("linear", "task_arithmetic", "wise_ft")

#: A kernel bound to one tensor's parameters: ``fn(out, inputs, base) -> NaN / Inf count``.
PieceKernel = Callable[[torch.Tensor, Sequence[torch.Tensor], "torch.Tensor | None"], int]


def for_method(
    method: str,
    params: Any,
    in_dtypes: Sequence[torch.dtype],
    base_dtype: torch.dtype | None,
    out_dtype: torch.dtype,
) -> PieceKernel | None:
    """The kernel that computes one piece of ``method`` with these parameters, or None when the
    torch implementation must run (another method, a dtype or a parameter value the kernels do
    not reproduce, or the kernels switched off).

    Args:
        method: the registry name (``"linear"``, ``"task_arithmetic"``, ``"wise_ft"``).
        params: the method's resolved parameters for this tensor (``LinearParams``, ...: read
            by attribute, ``weight``, ``normalize``, ``lambda_``, ``alpha``).
        in_dtypes: the models' input dtypes, as the reader returns them.
        base_dtype: the base model's dtype, None without a base.
        out_dtype: the output dtype.

    Returns:
        ``fn(out, inputs, base)``: writes the piece into ``out`` (inputs and base: contiguous
        tensors of ``out.numel()`` elements in the dtypes given) and returns how many values it
        wrote are NaN or +-Inf. Decide once per tensor (the parameters are converted here); call
        once per piece (a few microseconds of Python).
    """
    if method == "linear":
        lprog = _linear_program(tuple(params.weight), bool(params.normalize), in_dtypes, out_dtype)
        if lprog is None:
            return None

        def lin(out: torch.Tensor, xs: Sequence[torch.Tensor], base: torch.Tensor | None) -> int:
            return lprog.run(out, xs, None)  # a base the engine read for the plan is not used

        return lin
    if method == "task_arithmetic" and base_dtype is not None:
        prog = _task_arithmetic_program(
            tuple(params.weight),
            float(params.lambda_),
            bool(params.normalize),
            in_dtypes,
            base_dtype,
            out_dtype,
        )
        return None if prog is None else prog.run
    if method == "wise_ft" and base_dtype is not None and len(in_dtypes) == 1:
        wprog = _wise_ft_program(float(params.alpha), base_dtype, in_dtypes[0], out_dtype)
        if wprog is None:
            return None

        def wf(out: torch.Tensor, xs: Sequence[torch.Tensor], base: torch.Tensor | None) -> int:
            if base is None or len(xs) != 1:
                raise ValueError("soupkit.kernels: wise_ft takes one input and a base")
            return wprog.run(out, [base, xs[0]], None)

        return wf
    return None
