"""CheckpointSoup keeps the soup of the last N snapshots of a training loop, without files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.errors import CheckpointFormatError, UsageError


def train(
    soup: soupkit.CheckpointSoup, steps: int, *, save_dir: Path | None = None
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(32, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        taken = soup.update(model, step)
        if taken and save_dir is not None:
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                str(save_dir / f"step_{step}.safetensors"),
            )
    return model


def test_exact_mode_equals_the_uniform_soup_of_the_last_n(tmp_path: Path) -> None:
    soup = soupkit.CheckpointSoup(last=3, every=4)
    model = train(soup, 20, save_dir=tmp_path)
    assert soup.steps == [8, 12, 16] and len(soup) == 3
    got = soup.state_dict()
    # the file-based checkpoint soup of the same snapshots, bit for bit
    soupkit.soup_checkpoints(
        tmp_path, tmp_path / "soup", last=3, pattern="step_*.safetensors", progress=False
    )
    ref = load_file(str(tmp_path / "soup" / "model.safetensors"))
    floats = [k for k, v in got.items() if v.is_floating_point()]
    assert floats and all(torch.equal(got[k], ref[k]) for k in floats)
    # integer buffers are counters, not weights: the newest snapshot's value
    assert (
        got["1.num_batches_tracked"].item() == 17
        and model.state_dict()["1.num_batches_tracked"].item() == 20
    )
    # and the soup never shares memory with the live model
    assert all(
        v.data_ptr() != p.data_ptr() for v, p in zip(got.values(), model.state_dict().values())
    )


def test_running_mode_is_the_same_mean_rounded_once(tmp_path: Path) -> None:
    exact, running = (
        soupkit.CheckpointSoup(last=3, every=2),
        soupkit.CheckpointSoup(last=3, every=2, mode="running"),
    )
    everything = soupkit.CheckpointSoup(last=None, every=2, mode="running")
    snaps: list[dict[str, torch.Tensor]] = []

    class Both:
        def update(self, model: torch.nn.Module, step: int) -> bool:
            exact.update(model, step)
            everything.update(model, step)
            if running.update(model, step):
                snaps.append({k: v.clone() for k, v in model.state_dict().items()})
                return True
            return False

    train(Both(), 15)  # type: ignore[arg-type]
    a, b, c = exact.state_dict(), running.state_dict(), everything.state_dict()
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(b[k], v, rtol=2e-7, atol=1e-9)
            mean64 = sum(s[k].double() for s in snaps[-3:]) / 3
            assert torch.equal(b[k], mean64.float())  # float64 sum, one rounding
            all64 = sum(s[k].double() for s in snaps) / len(snaps)
            assert torch.equal(c[k], all64.float())
    assert running.steps == [10, 12, 14] and len(everything) == 8


def test_save_writes_a_folder(tmp_path: Path) -> None:
    soup = soupkit.CheckpointSoup(last=2)
    train(soup, 5)
    out = soup.save(tmp_path / "soup")
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in soup.state_dict().items())
    report = json.loads((out / "soupkit-report.json").read_text())
    assert report["checkpoint_soup"] == {
        "mode": "exact",
        "last": 2,
        "every": 1,
        "steps": [3, 4],
        "snapshots": 2,
    }


def test_errors() -> None:
    with pytest.raises(UsageError, match="needs mode='running'"):
        soupkit.CheckpointSoup(last=None)
    with pytest.raises(UsageError, match="at least 1 snapshot"):
        soupkit.CheckpointSoup(last=0)
    with pytest.raises(UsageError, match="no snapshot yet"):
        soupkit.CheckpointSoup(every=10).state_dict()
    soup = soupkit.CheckpointSoup()
    soup.update({"w": torch.zeros(3)}, 0)
    with pytest.raises(CheckpointFormatError, match="changed since the first snapshot: changed"):
        soup.update({"w": torch.zeros(4)}, 1)
    assert soup.update({"w": torch.ones(3)}, 1) is True
    assert soupkit.CheckpointSoup(every=2).update({"w": torch.ones(3)}, 1) is False
