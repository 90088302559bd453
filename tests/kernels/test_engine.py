"""The engine runs pieces on the native kernels, with the bytes of its torch path.

Every merge here runs twice through the streaming engine, kernels on and off
(``SOUPKIT_KERNELS=0``), and the outputs must be equal byte for byte; a spy on
`soupkit.engine.core._Engine._kernel_piece` (elementwise methods) or on
`soupkit.engine.native.SparseKernel` (TIES, DARE, DELLA, Breadcrumbs) proves the kernel path ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.engine import core, execute, native
from soupkit.kernels import sparsify

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls = [0]
    orig = core._Engine._kernel_piece

    def counted(self: core._Engine, *a: Any) -> bool:
        calls[0] += 1
        return orig(self, *a)

    monkeypatch.setattr(core._Engine, "_kernel_piece", counted)
    yield calls


def _models(tmp: Path, dtype: torch.dtype, n: int = 3, nan: bool = False) -> list[str]:
    g = torch.Generator().manual_seed(7)
    base = {
        "a.weight": torch.randn(37, 129, generator=g),
        "b.bias": torch.randn(1001, generator=g),
        "steps": torch.arange(5),
    }
    paths = []
    for i in range(n):
        sd = {
            k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(dtype)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        if nan and i == 1:
            sd["b.bias"][17] = float("nan")
        p = tmp / f"m{i}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
    return paths


def _merge(recipe: dict[str, Any], out: Path, **kw: Any) -> dict[str, bytes]:
    soupkit.merge(recipe, out, progress=False, force=True, chunk_elems=1000, **kw)
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}


def _recipes(paths: list[str], out_dtype: str) -> dict[str, dict[str, Any]]:
    models = [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths[1:], (0.7, -0.2))]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": p, "parameters": {"weight": 0.3}} for p in paths],
            "out_dtype": out_dtype,
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": paths[0],
            "models": models,
            "parameters": {"lambda": 0.9},
            "out_dtype": out_dtype,
        },
        "wise_ft": {
            "merge_method": "wise_ft",
            "base_model": paths[0],
            "models": [{"model": paths[1]}],
            "parameters": {"alpha": 0.35},
            "out_dtype": out_dtype,
        },
    }


@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
def test_engine_kernels_write_the_torch_bytes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spy: list[int],
    in_dtype: torch.dtype,
    out_dtype: str,
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the engine's float16 rule
    paths = _models(tmp_path, in_dtype)
    for name, recipe in _recipes(paths, out_dtype).items():
        with monkeypatch.context() as m:
            m.setenv("SOUPKIT_KERNELS", "0")
            before = spy[0]
            ref = _merge(recipe, tmp_path / f"{name}-torch")
            assert spy[0] == before, "SOUPKIT_KERNELS=0 must not run the kernels"
        before = spy[0]
        got = _merge(recipe, tmp_path / f"{name}-kernels")
        assert spy[0] > before, f"{name}: the kernels did not run"
        assert got == ref, f"{name} {in_dtype} -> {out_dtype}: kernel bytes differ"


def test_recipe_dtype_that_rounds_first_stays_on_torch(tmp_path: Path, spy: list[int]) -> None:
    paths = _models(tmp_path, torch.float32)
    recipe = _recipes(paths, "float32")["linear"] | {"dtype": "bfloat16"}
    _merge(recipe, tmp_path / "o")
    assert spy[0] == 0


def test_nonfinite_is_diagnosed_as_on_the_torch_path(tmp_path: Path, spy: list[int]) -> None:
    paths = _models(tmp_path, torch.bfloat16, nan=True)
    recipe = _recipes(paths, "bfloat16")["linear"]
    with pytest.raises(soupkit.NonFiniteError) as err:
        _merge(recipe, tmp_path / "o")
    assert "b.bias" in str(err.value) and spy[0] > 0
    # allowed: the same bytes as torch writes
    got = _merge(recipe, tmp_path / "k", allow_nonfinite=True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SOUPKIT_KERNELS", "0")
        ref = _merge(recipe, tmp_path / "t", allow_nonfinite=True)
    assert got == ref
    assert torch.isnan(load_file(str(tmp_path / "k" / "model.safetensors"))["b.bias"][17])


# ------------------------------------------------------------ sparsifying methods (TIES, DARE, ...)


@pytest.fixture
def sparse_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts the engine's calls of the sparsifying kernels, per kind of call."""
    calls = {"merge": 0, "cut_piece": 0, "hist": 0}
    hist = sparsify.NativeMagnitude.hist

    def counted_hist(self: Any, *a: Any) -> None:
        calls["hist"] += 1
        hist(self, *a)

    monkeypatch.setattr(sparsify.NativeMagnitude, "hist", counted_hist)
    for kind in ("merge", "cut_piece"):
        orig = getattr(native.SparseKernel, kind)

        def counted(
            self: native.SparseKernel, *a: Any, _o: Any = orig, _k: str = kind, **kw: Any
        ) -> Any:
            calls[_k] += 1
            return _o(self, *a, **kw)

        monkeypatch.setattr(native.SparseKernel, kind, counted)
    yield calls


def _sparse_recipes(paths: list[str], out_dtype: str) -> dict[str, tuple[dict[str, Any], str]]:
    """Recipe and the kernel call that must serve it, per case."""
    d = [0.45, 0.6]

    def rec(method: str, params: dict[str, Any], per: dict[str, list[Any]]) -> dict[str, Any]:
        models = [
            {"model": p, "parameters": {"weight": w} | {k: v[i] for k, v in per.items()}}
            for i, (p, w) in enumerate(zip(paths[1:], (0.7, 0.4)))
        ]
        return {
            "merge_method": method,
            "base_model": paths[0],
            "models": models,
            "parameters": params,
            "out_dtype": out_dtype,
            "seed": 11,
        }

    return {
        "ties-mergekit": (rec("ties", {"convention": "mergekit"}, {"density": d}), "cut_piece"),
        "ties-paper-global": (
            rec("ties", {"convention": "paper", "density": 0.4}, {}),
            "cut_piece",
        ),
        "ties-peft-lambda": (
            rec("ties", {"convention": "peft", "lambda": 1.3}, {"density": d}),
            "cut_piece",
        ),
        "dare_ties-l1": (rec("dare_ties", {"rescale": "l1"}, {"density": d}), "merge"),
        "dare_linear-l1": (rec("dare_linear", {"rescale": "l1"}, {"density": d}), "merge"),
        "dare_linear-density": (
            rec("dare_linear", {"rescale": "density"}, {"density": d}),
            "merge",
        ),
        "della": (rec("della", {}, {"density": d, "epsilon": [0.1, 0.2]}), "merge"),
        "breadcrumbs": (rec("breadcrumbs", {}, {"density": d, "gamma": [0.02, 0.05]}), "cut_piece"),
        "breadcrumbs_ties": (
            rec("breadcrumbs_ties", {}, {"density": d, "gamma": [0.02, 0.05]}),
            "cut_piece",
        ),
    }


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_engine_sparsifying_kernels_write_the_torch_bytes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sparse_spy: dict[str, int],
    in_dtype: torch.dtype,
) -> None:
    # several RNG blocks and compute pieces per tensor, several units per tensor (chunk_elems)
    monkeypatch.setattr(execute, "RNG_BLOCK", 1024)
    monkeypatch.setattr(execute, "COMPUTE_ELEMS", 300)
    paths = _models(tmp_path, in_dtype)
    for name, (recipe, kind) in _sparse_recipes(paths, "bfloat16").items():
        with monkeypatch.context() as m:
            m.setenv("SOUPKIT_KERNELS", "0")
            before = dict(sparse_spy)
            ref = _merge(recipe, tmp_path / f"{name}-torch")
            assert sparse_spy == before, "SOUPKIT_KERNELS=0 must not run the kernels"
        before = dict(sparse_spy)
        got = _merge(recipe, tmp_path / f"{name}-kernels")
        assert sparse_spy[kind] > before[kind], f"{name}: the kernels did not run"
        # the magnitude pre-passes (per tensor and global) count natively
        assert (sparse_spy["hist"] > before["hist"]) == (kind == "cut_piece"), name
        assert got == ref, f"{name} {in_dtype}: kernel bytes differ"


def test_sparsifying_kernels_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_spy: dict[str, int]
) -> None:
    """Exact mode, a recipe dtype that rounds the inputs first, and float64 inputs: torch."""
    paths = _models(tmp_path, torch.float32)
    recipe, _ = _sparse_recipes(paths, "float32")["dare_ties-l1"]
    _merge(recipe | {"compute": "exact"}, tmp_path / "exact")
    _merge(recipe | {"dtype": "bfloat16"}, tmp_path / "rounded")
    (tmp_path / "f64").mkdir()
    paths64 = _models(tmp_path / "f64", torch.float64)
    recipe64, _ = _sparse_recipes(paths64, "float32")["ties-mergekit"]
    _merge(recipe64, tmp_path / "f64-out")
    assert sparse_spy == {"merge": 0, "cut_piece": 0, "hist": 0}
    # and the same recipe without those does run them
    _merge(recipe, tmp_path / "plain")
    assert sparse_spy["merge"] > 0


def test_sparsifying_nonfinite_is_diagnosed_as_on_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_spy: dict[str, int]
) -> None:
    """A NaN input: the same error as on the torch path (or, where the drop or trim removes it,
    the same bytes), and with allow_nonfinite the same bytes."""
    monkeypatch.setattr(execute, "COMPUTE_ELEMS", 300)
    paths = _models(tmp_path, torch.bfloat16, nan=True)

    def outcome(recipe: dict[str, Any], out: Path, kernels: bool) -> str | dict[str, bytes]:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("SOUPKIT_KERNELS", "1" if kernels else "0")
            try:
                return _merge(recipe, out)
            except soupkit.NonFiniteError as e:
                return str(e)

    raised = 0
    for name in ("ties-mergekit", "dare_linear-density", "della", "breadcrumbs"):
        recipe, kind = _sparse_recipes(paths, "bfloat16")[name]
        before = sparse_spy[kind]
        ref = outcome(recipe, tmp_path / f"{name}-t", kernels=False)
        got = outcome(recipe, tmp_path / f"{name}-o", kernels=True)
        assert sparse_spy[kind] > before, name
        assert got == ref, name
        raised += isinstance(got, str) and "b.bias" in got
        got = _merge(recipe, tmp_path / f"{name}-k", allow_nonfinite=True)
        with pytest.MonkeyPatch.context() as m:
            m.setenv("SOUPKIT_KERNELS", "0")
            ref = _merge(recipe, tmp_path / f"{name}-r", allow_nonfinite=True)
        assert got == ref, name
    assert raised >= 2  # the NaN survives TIES's and Breadcrumbs' trims (NaN ranks on top)


def _coarse_models(tmp: Path, nan: bool) -> list[str]:
    """Base + 3 bf16 models whose deltas take few values: many entries tie at every
    threshold, spread over the pieces and units of each tensor (and a NaN / an Inf)."""
    g = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.randn(41, 127, generator=g), "b.bias": torch.randn(2999, generator=g)}
    paths = []
    for i in range(4):
        sd = {
            k: (v + (torch.randint(-3, 4, v.shape, generator=g) / 64 if i else 0)).to(
                torch.bfloat16
            )
            for k, v in base.items()
        }
        if nan and i == 2:
            sd["b.bias"][1500] = float("nan")
            sd["a.weight"][3, 5] = float("inf")
        p = tmp / f"c{i}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
def test_statistic_pieces_on_threads_write_the_bytes_of_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nan: bool
) -> None:
    """TIES's pieces (tie quotas flowing piece to piece) counted and merged on two threads give
    the bytes of one thread and of the torch path, per-tensor and global trims."""
    monkeypatch.setattr(execute, "COMPUTE_ELEMS", 300)
    ran = [0]
    counted = core._Engine._counted_parts

    def spy(self: core._Engine, *a: Any) -> Any:
        parts = counted(self, *a)
        ran[0] += parts is not None
        return parts

    monkeypatch.setattr(core._Engine, "_counted_parts", spy)
    paths = _coarse_models(tmp_path, nan)
    models = [
        {"model": p, "parameters": {"weight": w, "density": d}}
        for p, w, d in zip(paths[1:], (1.0, 0.6, 0.8), (0.5, 0.3, 0.7))
    ]
    for scope in ("tensor", "global"):
        recipe = {
            "merge_method": "ties",
            "base_model": paths[0],
            "models": models,
            "parameters": {"trim_scope": scope} if scope == "global" else {},
            "out_dtype": "float32",
        }
        out: dict[str, dict[str, bytes]] = {}
        for threads, kernels in ((2, "1"), (1, "1"), (2, "0")):
            with monkeypatch.context() as m:
                m.setattr(execute, "_sizes_compute_threads", lambda t=threads: t)
                m.setattr(execute, "_sizes_stream_threads", lambda t=threads: t)
                m.setenv("SOUPKIT_KERNELS", kernels)
                before = ran[0]
                key = f"{scope}-{threads}-{kernels}"
                out[key] = _merge(recipe, tmp_path / key, allow_nonfinite=nan)
                if kernels == "1":  # one thread: the pieces run in order, no counting ahead
                    assert (ran[0] > before) == (threads == 2), key
        assert len({tuple(v.items()) for v in out.values()}) == 1, scope
