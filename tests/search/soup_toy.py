"""A tiny classification problem with a known answer, shared by the search tests.

A linear 3-class classifier on 12 features. The labels come from a true weight matrix ``W``.
*Good* ingredients are ``W`` plus independent noise: each alone is decent, and their average
cancels noise, so it is better. *Bad* ingredients are harmful: their class rows are permuted
(systematically wrong) or drowned in noise. Greedy soup must keep the good ones and reject the
bad ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from soupkit.evaluate.protocol import EvalResult, accuracy_bound, meets

D, C = 12, 3


def problem(
    seed: int = 0, n: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W, X_val, y_val, X_test, y_test`` (the test set is shifted: scaled and offset)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g)
    xv = torch.randn(n, D, generator=g)
    xt = torch.randn(n, D, generator=g) * 1.5 + 0.3
    return w, xv, (xv @ w.T).argmax(1), xt, (xt @ w.T).argmax(1)


def states(
    kinds: Sequence[str], seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[dict[str, torch.Tensor]]:
    """One state dict per kind: ``good`` (true weights plus an error; the good ingredients'
    errors cancel on average, so their soup is near perfect), ``perm`` (class rows permuted:
    systematically wrong) or ``noisy`` (true weights drowned in noise)."""
    w = problem(seed)[0]
    g = torch.Generator().manual_seed(7 + seed)
    err = 1.2 * torch.randn(len(kinds), C, D, generator=g)
    goods = [i for i, k in enumerate(kinds) if k == "good"]
    if len(goods) > 1:
        err[goods] -= err[goods].mean(0)
    out = []
    for i, kind in enumerate(kinds):
        if kind == "good":
            weight = w + err[i]
        elif kind == "perm":
            weight = w[[1, 2, 0]] + 0.25 * err[i]
        elif kind == "noisy":
            weight = w + 5.0 * err[i]
        else:
            raise ValueError(kind)
        out.append(
            {
                "fc.weight": weight.to(dtype),
                "fc.bias": (0.05 * torch.randn(C, generator=g)).to(dtype),
                "fc.steps": torch.tensor(
                    [i], dtype=torch.int64
                ),  # non-float: copied, never averaged
            }
        )
    return out


def write(folder: Path, state: Mapping[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(state), str(folder / "model.safetensors"))
    return folder


def make_ingredients(
    root: Path, kinds: Sequence[str], dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[Path]:
    return [
        write(root / f"ft{i:02d}-{k}", s)
        for i, (k, s) in enumerate(zip(kinds, states(kinds, seed, dtype)))
    ]


def accuracy(state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    logits = x @ state["fc.weight"].float().T + state["fc.bias"].float()
    return int((logits.argmax(1) == y).sum()) / len(y)


class Accuracy:
    """A bounded evaluator (exact early rejection) that counts the work it does."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch: int = 50, key: str = "toy-val"
    ) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.cache_key = key
        self.calls = 0
        self.examples = 0
        self.states: list[dict[str, torch.Tensor]] = []

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        return self.evaluate(state).score

    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> EvalResult:
        self.calls += 1
        self.states.append({k: v.clone() for k, v in state.items()})
        total, correct, done = len(self.y), 0, 0
        for a in range(0, total, self.batch):
            if need is not None and not meets(
                accuracy_bound(correct, total - done, total), need, strict=strict
            ):
                return EvalResult(accuracy_bound(correct, total - done, total), done, total, False)
            xb, yb = self.x[a : a + self.batch], self.y[a : a + self.batch]
            logits = xb @ state["fc.weight"].float().T + state["fc.bias"].float()
            correct += int((logits.argmax(1) == yb).sum())
            done += len(yb)
            self.examples += len(yb)
        return EvalResult(correct / total, done, total, True)


def naive_greedy(
    states: Sequence[Mapping[str, torch.Tensor]], score, strict: bool = False
) -> tuple[list[int], float]:
    """The paper's algorithm with every ingredient in memory (the reference for tests)."""
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: (-scores[i], i))
    soup, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        members = soup + [i]
        cand = {}
        for k in states[0]:
            if not states[0][k].is_floating_point():
                cand[k] = states[members[0]][k]
                continue
            acc = states[members[0]][k].float().clone()
            for j in members[1:]:
                acc = acc + states[j][k].float()
            cand[k] = (acc / float(len(members))).to(states[0][k].dtype)
        s = score(cand)
        if (s > best) if strict else (s >= best):
            soup, best = members, s
    return soup, best


class PerExampleAccuracy(Accuracy):
    """`Accuracy` plus ``per_example`` (a `PerExampleEvaluator`), counting the examples it scores."""

    def n_examples(self) -> int:
        return len(self.y)

    def per_example(
        self, state: Mapping[str, torch.Tensor], indices: Sequence[int]
    ) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        logits = self.x[idx] @ state["fc.weight"].float().T + state["fc.bias"].float()
        self.examples += len(idx)
        return (logits.argmax(1) == self.y[idx]).float()
