"""Learned soup: streamed gradient == autograd on the in-memory mixture, learning, memory, output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soup_toy as toy
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from soupkit.errors import UsageError
from soupkit.search.learned import StreamingMixture, classification_loss, learned_soup


class MLP(nn.Module):
    """Two layers with a tied embedding-style pair and a BatchNorm, to exercise every kind of tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(toy.D, 16)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, toy.C)
        self.proj = nn.Linear(toy.C, toy.C, bias=False)
        self.back = nn.Linear(toy.C, toy.C, bias=False)
        self.back.weight = self.proj.weight  # tied: the checkpoints hold it once, as 'proj.weight'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.out(torch.relu(self.norm(self.inp(x))))
        return h + self.back(torch.tanh(self.proj(h)))


def mlp_ingredients(root: Path, k: int, seed: int = 0) -> list[Path]:
    torch.manual_seed(seed)
    base = MLP().state_dict()
    paths = []
    for i in range(k):
        g = torch.Generator().manual_seed(100 * seed + i)
        sd = {
            n: (t + 0.3 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t + i)
            for n, t in base.items()
            if n != "back.weight"
        }
        sd["norm.running_var"] = sd["norm.running_var"].abs() + 0.5
        (root / f"mlp{i}").mkdir(parents=True)
        save_file(sd, str(root / f"mlp{i}" / "model.safetensors"))
        paths.append(root / f"mlp{i}")
    return paths


def naive_logit_gradient(
    paths: list[Path],
    model: nn.Module,
    logits: torch.Tensor,
    temperature: float,
    names: list[str] | None,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[float, torch.Tensor]:
    """The reference: every ingredient in memory, autograd through the mixture (functional_call)."""
    states = [load_file(str(p / "model.safetensors")) for p in paths]
    lg = logits.detach().clone().requires_grad_(True)
    alpha = torch.softmax(lg / temperature, dim=0)
    params = {}
    for n, t in states[0].items():
        if not t.is_floating_point():
            params[n] = t
            continue
        a = alpha[:, names.index(n)] if names is not None else alpha
        if "running" in n:  # buffers: no gradient flows into them (BatchNorm updates them in place)
            a = a.detach()
        params[n] = sum(a[k] * states[k][n] for k in range(len(states)))
    model.train()
    loss = F.cross_entropy(functional_call(model, params, (x,), tie_weights=True), y)
    loss.backward()
    assert lg.grad is not None
    return float(loss.detach()), lg.grad


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_streamed_gradient_equals_autograd_on_the_in_memory_mixture(
    tmp_path: Path, per_tensor: bool, temperature: float
) -> None:
    paths = mlp_ingredients(tmp_path, 4)
    _, xv, yv, _, _ = toy.problem(n=64)
    model = MLP()
    with StreamingMixture(paths, model, per_tensor=per_tensor, temperature=temperature) as mix:
        with torch.no_grad():
            mix.logits.copy_(
                torch.randn(mix.logits.shape, generator=torch.Generator().manual_seed(3))
            )
        loss, grad = mix.gradient(classification_loss, (xv, yv))
        names = [s.names[0] for s in mix.slots if s.is_float] if per_tensor else None
        logits = mix.logits.detach().clone()
    ref_loss, ref_grad = naive_logit_gradient(paths, MLP(), logits, temperature, names, xv, yv)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grad.shape == ref_grad.shape
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7), (grad - ref_grad).abs().max()
    assert ref_grad.abs().max() > 1e-3  # a real gradient, not zeros on both sides
    if per_tensor:  # buffers and integer tensors get no gradient, trained parameters do
        cols = dict(zip(names, ref_grad.T))  # type: ignore[arg-type]
        assert torch.count_nonzero(cols["norm.running_mean"]) == 0
        assert torch.count_nonzero(cols["proj.weight"]) > 0


def test_memory_holds_one_tensor_at_a_time_whatever_k(tmp_path: Path, live_reads) -> None:  # type: ignore[no-untyped-def]
    paths = mlp_ingredients(tmp_path, 6)
    _, xv, yv, _, _ = toy.problem(n=64)
    sd = load_file(str(paths[0] / "model.safetensors"))
    largest = max(t.numel() * t.element_size() for t in sd.values())
    model_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    learned_soup(paths, [(xv, yv)], model=MLP(), steps=3, lr=0.1, per_tensor=True)
    assert live_reads.reads > 0
    assert live_reads.peak <= largest, (live_reads.peak, largest, 6 * model_bytes)


class ToyLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(toy.D, toy.C)
        self.fc.register_buffer("steps", torch.zeros(1, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_learns_to_downweight_harmful_ingredients_and_writes_exactly_the_mixture(
    tmp_path: Path, per_tensor: bool
) -> None:
    kinds = ["good", "perm", "good", "noisy", "good"]
    paths = toy.make_ingredients(tmp_path, kinds)
    _, xv, yv, _, _ = toy.problem()
    batches = [(xv[i : i + 100], yv[i : i + 100]) for i in range(0, 1000, 100)]
    model = ToyLinear()
    val = toy.Accuracy(xv, yv)
    r = learned_soup(
        paths,
        batches,
        tmp_path / "soup",
        model=model,
        steps=60,
        lr=0.1,
        per_tensor=per_tensor,
        evaluator=val,
    )
    mean = r.coefficient_history[-1]
    bad = [mean[i] for i, k in enumerate(kinds) if k != "good"]
    good = [mean[i] for i, k in enumerate(kinds) if k == "good"]
    assert max(bad) < 0.05 < min(good), mean
    assert r.losses[-1] < 0.5 * r.losses[0]
    assert r.score is not None and r.uniform_score is not None and r.score > r.uniform_score + 0.1
    # The model holds the learned soup, and the written soup (the engine's linear merge of the
    # learned recipe) is exactly it.
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    held = model.state_dict()
    assert written.keys() == held.keys()
    for k in written:
        assert torch.equal(written[k], held[k]), k
    report = json.loads((tmp_path / "soup" / "soupkit-report.json").read_text())
    assert (
        report["learned"]["coefficients"] == r.coefficients
        and len(report["learned"]["losses"]) == 60
    )
    assert report["recipe"]["parameters"]["normalize"] is False
    assert (tmp_path / "soup" / "learned-soup.png").read_bytes().startswith(b"\x89PNG")


def test_user_loss_function_and_one_shot_data(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, ["good", "good"])
    _, xv, yv, _, _ = toy.problem()
    seen = []

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(1)
        return F.cross_entropy(model(batch["x"]), batch["y"])

    r = learned_soup(paths, [{"x": xv, "y": yv}], model_fn=ToyLinear, loss_fn=loss_fn, steps=4)
    assert len(seen) == 4 and len(r.losses) == 4
    with pytest.raises(UsageError, match="one-shot iterator"):
        learned_soup(paths, iter([(xv, yv)]), model=ToyLinear(), steps=2)
    with pytest.raises(UsageError, match="no batch"):
        learned_soup(paths, [], model=ToyLinear(), steps=1)
    with pytest.raises(UsageError, match="exactly one of"):
        learned_soup(paths, [(xv, yv)], steps=1)


def test_model_that_does_not_match_the_checkpoints_is_refused_with_every_problem(
    tmp_path: Path,
) -> None:
    paths = mlp_ingredients(tmp_path, 2)
    with pytest.raises(UsageError) as e:
        StreamingMixture(paths, ToyLinear())
    msg = str(e.value)
    assert "'fc.weight'" in msg and "is in no checkpoint" in msg and "not in the model" in msg
