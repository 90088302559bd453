"""run_plans: several plans over the same inputs in one pass, each output as if run alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import soupkit
from soupkit.api.multi import run_plans
from soupkit.engine import MemorySink, run_plan
from soupkit.io.checkpoint import in_memory_checkpoint
from soupkit.io.reader import TensorReader
from soupkit.planning.plan import make_plan

from .helpers import base_state, bits_equal, finetunes


def _plans(recipes: list[dict[str, Any]], chunk_elems: int = 7) -> list[soupkit.MergePlan]:
    base = base_state(4)
    fts = finetunes(base, 3)
    models = [in_memory_checkpoint(s, f"m{i}") for i, s in enumerate(fts)]
    b = in_memory_checkpoint(base, "base")
    out = []
    for r in recipes:
        cfg = soupkit.load_recipe(
            {"base_model": "base", "models": [{"model": f"m{i}"} for i in range(3)], **r}
        )
        out.append(make_plan(cfg, models, b, chunk_elems=chunk_elems))
    return out


def test_mixed_methods_in_one_pass_equal_separate_runs() -> None:
    plans = _plans(
        [
            {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
            {
                "merge_method": "ties",
                "parameters": {"density": 0.3},
            },  # whole tensors + global pre-pass
            {
                "merge_method": "dare_ties",
                "parameters": {"density": 0.5},
                "seed": 3,
            },  # seeded blocks
            {
                "merge_method": "della",
                "parameters": {"density": 0.5, "epsilon": 0.1},
                "out_dtype": "bfloat16",
            },
            {"merge_method": "model_stock", "parameters": {}},
        ]
    )
    alone = []
    for p in plans:
        sink = MemorySink(p)
        run_plan(p, sink)
        alone.append(sink.tensors)
    sinks = [MemorySink(p) for p in plans]
    stats = run_plans(plans, sinks)
    for k, (s, want) in enumerate(zip(sinks, alone)):
        assert all(bits_equal(s.tensors[n], want[n]) for n in want), plans[k].method.name
    assert stats[3].tensors == len(plans[3].jobs)
    assert sinks[3].tensors["lm_head.weight"].dtype == torch.bfloat16


def test_elementwise_plans_read_each_chunk_once(monkeypatch: pytest.MonkeyPatch) -> None:
    plans = _plans(
        [
            {"merge_method": "task_arithmetic", "parameters": {"lambda": lam}}
            for lam in (0.1, 0.5, 1.0)
        ]
    )
    calls: list[tuple[int, str, int, int | None]] = []
    real = TensorReader.read

    def counting(self, info, start=0, stop=None, out=None):  # type: ignore[no-untyped-def]
        calls.append((id(info.data), info.name, start, stop))
        return real(self, info, start, stop, out)

    monkeypatch.setattr(TensorReader, "read", counting)
    run_plans(plans, [MemorySink(p) for p in plans])
    assert calls and len(calls) == len(set(calls))
    merged = [j for j in plans[0].jobs if not j.is_copy]
    # one read per chunk of 7 elements, per input (3 models + base)
    assert len(calls) == sum(4 * -(-j.numel // 7) for j in merged) + sum(
        -(-j.numel // 7) for j in plans[0].jobs if j.is_copy
    )


def test_plans_over_different_inputs_are_refused() -> None:
    base = base_state(4)
    fts = finetunes(base, 2)
    a = make_plan(
        soupkit.load_recipe({"merge_method": "linear", "models": [{"model": "x"}]}),
        [in_memory_checkpoint(fts[0], "x")],
        None,
    )
    b = make_plan(
        soupkit.load_recipe({"merge_method": "linear", "models": [{"model": "y"}]}),
        [in_memory_checkpoint(fts[1], "y")],
        None,
    )
    with pytest.raises(soupkit.UsageError, match="is read from different inputs"):
        run_plans([a, b], [MemorySink(a), MemorySink(b)])
