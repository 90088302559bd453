"""The torch reference the kernels must reproduce byte for byte, and adversarial inputs.

The reference is the engine's float32 path for one piece (``execute._Engine._inputs`` /
``_call`` / ``_emit``): every input copied into a float32 buffer with ``copy_``, the method
module run through its ``MethodSpec.call`` (which forms and adds back task vectors), the result
copied into the output dtype with ``copy_``, and the output checked for NaN / Inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soupkit.methods import REGISTRY

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# float32 bit patterns that stress conversions and NaN propagation
SPECIAL32 = [
    0x7FC00000,  # quiet NaN
    0xFFC00000,  # negative quiet NaN (x86's default NaN)
    0x7F800001,  # signalling NaN, lowest payload
    0x7FA5A5A5,  # signalling NaN, payload
    0xFFE12345,  # negative quiet NaN, payload
    0x7FFFFFFF,  # all-ones NaN
    0x7F800000,  # +Inf
    0xFF800000,  # -Inf
    0x00000001,  # smallest denormal
    0x807FFFFF,  # largest negative denormal
    0x00400000,  # denormal
    0x7F7FFFFF,  # largest float
    0x477FF000,  # 65520: rounds to Inf in float16
    0x477FEFFF,  # just below: rounds to 65504
    0x7F7F8000,  # rounds to Inf in bfloat16
    0x7F7F7FFF,  # just below
    0x33000000,  # 2^-25: a tie to 0 in float16
    0x33000001,  # just above: the smallest float16 subnormal
    0x387FE000,  # float16 subnormal boundary region
    0x80000000,  # -0.0
]
# 16-bit patterns, stored directly into bfloat16 / float16 inputs
SPECIAL16 = [0x7C01, 0x7E00, 0xFE01, 0x7FFF, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x7F81, 0xFFC1, 0x8000]


def from_bits32(words: Sequence[int]) -> torch.Tensor:
    return torch.tensor([w - (1 << 32) if w >> 31 else w for w in words], dtype=torch.int32).view(
        torch.float32
    )


def make_input(n: int, dtype: torch.dtype, seed: int, scale: float, specials: int) -> torch.Tensor:
    """n values of ``dtype``: normal * scale, with ``specials`` positions overwritten by
    special bit patterns (NaNs with payloads, Infs, denormals, overflow boundaries)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * scale).to(dtype)
    if n and specials:
        pos = torch.randint(0, n, (specials,), generator=g).tolist()
        pick = torch.randint(0, 1 << 30, (specials,), generator=g).tolist()
        for p, r in zip(pos, pick):
            if dtype == torch.float32 or r % 3 == 0:
                x[p : p + 1] = from_bits32([SPECIAL32[r % len(SPECIAL32)]]).to(dtype)
            else:
                w = SPECIAL16[r % len(SPECIAL16)]
                x.view(torch.int16)[p] = w - 0x10000 if w >= 0x8000 else w
    return x


def nan_pile(n: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    """Every element a NaN (payload, sign, quiet or signalling: salted per input) or an Inf, so
    that every operation meets two NaN operands somewhere: which payload wins is tested."""
    if dtype == torch.float32:
        words = [(0x7F800001 + 0x1111 * (i + salt)) | ((i + salt) % 3 == 0) << 31 for i in range(n)]
        words = [w if (i + salt) % 7 else 0x7F800000 for i, w in enumerate(words)]
        return from_bits32([w & 0xFFFFFFFF for w in words])
    top = 0x7F80 if dtype == torch.bfloat16 else 0x7C00
    words = [
        top | (1 + (i * 5 + salt * 3) % 0x3F) | (0x8000 if (i + salt) % 3 == 0 else 0)
        for i in range(n)
    ]
    words = [w if (i + salt) % 7 else top for i, w in enumerate(words)]
    return torch.tensor([w - 0x10000 if w >= 0x8000 else w for w in words], dtype=torch.int16).view(
        dtype
    )


def reference(
    method: str,
    params: dict[str, object],
    inputs: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, int]:
    """The engine's float32 path for one piece: (output in out_dtype, count of NaN / Inf in it)."""
    spec = REGISTRY[method]
    p = spec.params.model_validate(params)
    n = inputs[0].numel()

    def f32(raw: torch.Tensor) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.float32)
        out.copy_(raw)
        return out

    xs = [f32(x) for x in inputs]
    b = f32(base) if base is not None else None
    res = spec.call(xs, p, base=b, rng=None, exact=False)
    dest = torch.empty(n, dtype=out_dtype)
    dest.copy_(res)
    bad = int((~torch.isfinite(dest)).sum())
    return dest, bad


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two tensors of one dtype differ first, with both bit patterns (for assertion messages)."""
    ia = a.view(torch.int32 if a.element_size() == 4 else torch.int16)
    ib = b.view(torch.int32 if b.element_size() == 4 else torch.int16)
    diff = (ia != ib).nonzero().flatten().tolist()
    if not diff:
        return "no difference"
    i = diff[0]
    m = 0xFFFFFFFF if a.element_size() == 4 else 0xFFFF
    return (
        f"{len(diff)} of {a.numel()} elements differ; first at {i}: kernel "
        f"{int(ia[i]) & m:#x} ({float(a[i])}) vs reference {int(ib[i]) & m:#x} ({float(b[i])})"
    )
