"""The pre-pass hook: a method that needs a whole-tensor (or whole-model) statistic declares a
`Prepass` on its spec, and the engine streams it. Both methods here are registered from this
file alone (nothing in soupkit names them) and streamed in small chunks on 1 and 2 compute
threads; the output equals the method's pure function run on whole tensors, bit for bit.

- ``toy_topk``: keep each model's ``int(density * n)`` largest magnitudes per tensor, then sum
  (the statistic: exact top-k cuts from `soupkit.methods._topk`, as TIES uses);
- ``toy_clip``: keep the entries with ``|delta| >= ratio * max|delta|``, the maximum taken per
  tensor or over the whole model (``scope: global``); its accumulator is written here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import soupkit
from soupkit import methods
from soupkit.engine import execute, prepass
from soupkit.methods import Params, Prepass, _ops
from soupkit.methods._cuts import TopKCounts
from soupkit.methods._topk import magnitude_bits_

from .helpers import base_state, bits_equal, finetunes, write

# ------------------------------------------------------------------------- toy_topk (one file)


class TopParams(Params):
    per_model: ClassVar[dict[str, Any]] = {"density": 1.0}
    density: tuple[float, ...]


def _topk_start(p: TopParams, numel: int) -> TopKCounts:
    return TopKCounts(numel, [(int(d * numel),) for d in p.density])


TOPK = Prepass(
    scope=lambda p: "tensor" if any(d < 1 for d in p.density) else None,
    start=_topk_start,
    passes=lambda p: 2,
    observe=magnitude_bits_,
)


def toy_topk(
    deltas: Sequence[torch.Tensor], p: TopParams, *, rng: Any = None, stat: Any = None
) -> torch.Tensor:
    """Sum of each model's top-k magnitudes (cuts from the pre-pass, else computed here)."""
    if stat is None:
        kept = [_ops.trim_topk(d, k) for d, k in zip(deltas, p.density)]
    else:
        kept = [_ops.apply_cut(d, c[0]) for d, c in zip(deltas, stat)]
    return _ops.weighted_sum(kept, [1.0] * len(kept))


# ------------------------------------------------------------------------- toy_clip (one file)


class ClipParams(Params):
    ratio: float = 0.5
    scope: Literal["tensor", "global"] = "tensor"


class MaxAbs:
    """Accumulator: each model's largest |delta| (one pass; max is exact in any order)."""

    def __init__(self, n_models: int) -> None:
        self.top = [0.0] * n_models

    @property
    def models(self) -> tuple[int, ...]:
        return tuple(range(len(self.top)))

    def wants(self, step: int) -> bool:
        return step == 0

    def add(self, step: int, part: int, observed: Mapping[int, torch.Tensor]) -> None:
        for i, m in observed.items():
            if m.numel():
                self.top[i] = max(self.top[i], float(m.max()))

    def end_pass(self, step: int) -> None:
        pass

    def fork(self) -> MaxAbs:
        return MaxAbs(len(self.top))

    def join(self, part: MaxAbs) -> None:
        self.top = [max(a, b) for a, b in zip(self.top, part.top)]

    def result(self, part: int) -> Tops:
        return Tops(tuple(self.top))


class Tops:
    """The statistic: the same maxima for every piece."""

    def __init__(self, top: tuple[float, ...]) -> None:
        self.top = top

    def piece(self, xs: Sequence[torch.Tensor], base: torch.Tensor | None) -> tuple[float, ...]:
        return self.top


def _clip_start(p: ClipParams, numel: int) -> MaxAbs:
    return MaxAbs(N_MODELS)


CLIP = Prepass(
    scope=lambda p: p.scope,
    start=_clip_start,
    passes=lambda p: 1,
    observe=torch.abs_,
)


def toy_clip(
    deltas: Sequence[torch.Tensor], p: ClipParams, *, rng: Any = None, stat: Any = None
) -> torch.Tensor:
    """Sum of the entries with |delta_i| >= ratio * max|delta_i| (max from ``stat``, else here)."""
    top = stat if stat is not None else [float(d.abs().max()) for d in deltas]
    kept = [d * (d.abs() >= p.ratio * t) for d, t in zip(deltas, top)]
    return _ops.weighted_sum(kept, [1.0] * len(kept))


N_MODELS = 3


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    for name, fn, params, decl in [
        ("toy_topk", toy_topk, TopParams, TOPK),
        ("toy_clip", toy_clip, ClipParams, CLIP),
    ]:
        methods.method(
            name,
            kind="task_vector",
            params=params,
            paper="https://example.org",
            summary="test method",
            needs_base=True,
            elementwise=False,
            prepass=decl,
        )(fn)
    yield
    for name in ("toy_topk", "toy_clip"):
        methods.REGISTRY.pop(name)


def _merge(tmp: Path, recipe: dict[str, Any], threads: int) -> tuple[dict[str, torch.Tensor], int]:
    """The streamed merge (units of 16 elements, pieces of 5), and how many pre-pass units ran."""
    with (
        mock.patch.object(execute, "COMPUTE_ELEMS", 5),  # many pieces per unit, shared by threads
        mock.patch.object(execute, "_sizes_stream_threads", lambda: threads),
        mock.patch.object(prepass, "accumulate", wraps=prepass.accumulate) as spy,
    ):
        res = soupkit.merge(
            recipe, tmp / f"out{threads}", progress=False, chunk_elems=16, hash_inputs=False
        )
    return load_file(str(res.out / "model.safetensors")), spy.call_count


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("toy_topk", {"density": 0.3}),
        ("toy_topk", {"density": 1.0}),  # no statistic: plain elementwise pieces
        ("toy_clip", {"ratio": 0.5}),
        ("toy_clip", {"ratio": 0.5, "scope": "global"}),
    ],
)
def test_a_method_registered_in_one_file_streams_like_its_whole_tensor_function(
    method: str, parameters: dict[str, Any], tmp_path: Path
) -> None:
    # tied magnitudes (few levels): the top-k tie quota is spread over many pieces
    base = base_state()
    levels = torch.tensor([-2.0, -1.0, 0.0, 1.0, 1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(1)
    fts = finetunes(base, N_MODELS)
    for ft in fts:
        for k, v in ft.items():
            if v.is_floating_point():
                ft[k] = base[k] + levels[torch.randint(0, 7, v.shape, generator=g)]
    recipe = {
        "merge_method": method,
        "base_model": str(write(tmp_path / "base", base)),
        "parameters": parameters,
        "models": [{"model": str(write(tmp_path / f"ft{i}", s))} for i, s in enumerate(fts)],
    }
    spec = methods.get(method)
    p = spec.params.model_validate(
        {
            **parameters,
            **({"density": (parameters["density"],) * N_MODELS} if "density" in parameters else {}),
        }
    )
    floats = sorted(k for k, v in base.items() if v.is_floating_point())
    if parameters.get("scope") == "global":  # the pure function on the whole model at once
        flat = {k: torch.cat([ft[k].reshape(-1) for k in floats]) for k, ft in enumerate(fts)}
        whole_base = torch.cat([base[k].reshape(-1) for k in floats])
        merged = toy_clip([flat[i] - whole_base for i in range(N_MODELS)], p) + whole_base
        sizes = [base[k].numel() for k in floats]
        want = dict(
            zip(floats, [t.view(base[k].shape) for t, k in zip(merged.split(sizes), floats)])
        )
    else:
        want = {k: spec.fn([ft[k] - base[k] for ft in fts], p) + base[k] for k in floats}
    for threads in (1, 2):
        got, prepass_units = _merge(tmp_path, recipe, threads)
        for k in floats:
            assert bits_equal(got[k], want[k]), (threads, k)
        # a per-tensor statistic is read in its own passes over the tensor's units
        assert spec.prepass is not None
        assert (prepass_units > 0) == (spec.prepass.scope(p) == "tensor")
    if method == "toy_topk" and parameters["density"] < 1:  # and it trimmed something
        d = [got[k] - base[k] for k in floats]
        assert sum(int((x == 0).sum()) for x in d) > 0


def test_the_engine_names_no_method() -> None:
    src = Path(soupkit.__file__).parent / "engine"
    names = {s.name for s in methods.all_methods()}
    for path in src.glob("*.py"):
        text = path.read_text().lower()
        found = {n for n in names if f"'{n}'" in text or f'"{n}"' in text}
        assert not found, f"{path.name} names methods {found}"
