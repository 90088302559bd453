"""A tiny layered classifier where per-layer mixing pays, for the `soupkit optimize` tests.

Five residual layers (``layers.{i}.weight``, 8x8) and a head (``head.weight``, 3x8). The labels
come from a true network. Each of the four ingredients is the true network with small noise in
the layers it is "expert" in (layer ``i`` for ingredient ``i % 4``) and large noise elsewhere,
so the best soup takes each layer mostly from its expert: per-layer coefficients beat any single
weight per model.

The evaluators are module-level objects (importable by path on Ray workers): ``val`` and
``holdout`` are bounded accuracies (exact early rejection) on two independent sets.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from soupkit.evaluate.protocol import EvalResult, accuracy_bound, meets

D, C, L, N_MODELS = 8, 3, 5, 4


def _true(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    st = {f"layers.{i}.weight": torch.randn(D, D, generator=g) / D**0.5 for i in range(L)}
    st["head.weight"] = torch.randn(C, D, generator=g)
    return st


def forward(state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = x
    for i in range(L):
        h = h + torch.tanh(h @ state[f"layers.{i}.weight"].float().T)
    return h @ state["head.weight"].float().T


def data(split: str, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed({"val": 1, "holdout": 2}[split])
    x = torch.randn(n, D, generator=g)
    return x, forward(_true(), x).argmax(1)


def ingredients(root: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Four fine-tunes: ``root/ft{k}/model.safetensors``."""
    true = _true()
    g = torch.Generator().manual_seed(11)
    paths = []
    for k in range(N_MODELS):
        st = {}
        for i in range(L):
            scale = 0.05 if i % N_MODELS == k else 0.8
            st[f"layers.{i}.weight"] = (
                true[f"layers.{i}.weight"] + scale * torch.randn(D, D, generator=g) / D**0.5
            ).to(dtype)
        st["head.weight"] = (true["head.weight"] + 0.3 * torch.randn(C, D, generator=g)).to(dtype)
        folder = root / f"ft{k}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(st, str(folder / "model.safetensors"))
        paths.append(folder)
    return paths


def space(paths: Sequence[Path], points: int = L) -> dict[str, object]:
    """Per-layer weights of every model (``points`` per model: 4 x 5 = 20 by default)."""
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(p), "parameters": {"weight": {"min": 0.0, "max": 1.0, "points": points}}}
            for p in paths
        ],
        "parameters": {"normalize": True},
    }


class Accuracy:
    """A bounded evaluator (exact early rejection) on one split."""

    def __init__(self, split: str, batch: int = 50, kill_at: int = 0) -> None:
        self.split, self.batch, self.kill_at = split, batch, kill_at
        self.cache_key = f"optimize-toy-{split}"
        self.calls = 0
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        return self.evaluate(state).score

    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> EvalResult:
        if self._data is None:
            self._data = data(self.split)
        x, y = self._data
        self.calls += 1
        if self.calls == self.kill_at:  # the resumption test: die mid-run, as a killed job does
            os.kill(os.getpid(), signal.SIGKILL)
        total, correct, done = len(y), 0, 0
        for a in range(0, total, self.batch):
            if need is not None and not meets(
                accuracy_bound(correct, total - done, total), need, strict=strict
            ):
                return EvalResult(accuracy_bound(correct, total - done, total), done, total, False)
            correct += int(
                (forward(state, x[a : a + self.batch]).argmax(1) == y[a : a + self.batch]).sum()
            )
            done += len(y[a : a + self.batch])
        return EvalResult(correct / total, done, total, True)


val = Accuracy("val")
holdout = Accuracy("holdout")
