"""BatchNorm recalibration: same statistics as torch's update_bn, and soups written with them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import update_bn

from soupkit import uniform_soup
from soupkit.errors import UsageError
from soupkit.search import greedy_soup, recalibrate_bn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=0.3)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def loader(n: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 2, (4,), generator=g))
        for _ in range(n)
    ]


def test_same_statistics_as_torch_update_bn() -> None:
    torch.manual_seed(0)
    net = SmallCNN().eval()
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    data = loader()
    assert recalibrate_bn(ours, data) == len(data)
    update_bn(data, theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["bn1.running_mean"], net.state_dict()["bn1.running_mean"])
    # Mode and momentum are restored.
    assert not ours.training and ours.bn2.momentum == 0.3 and ours.bn1.momentum == 0.1


def test_dictionary_batches_max_batches_and_models_without_bn() -> None:
    class DictCNN(SmallCNN):
        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(pixel_values)

    torch.manual_seed(1)
    net = DictCNN()
    data = loader()
    ref = copy.deepcopy(net)
    update_bn(data[:2], ref)
    n = recalibrate_bn(net, [{"pixel_values": x, "labels": y} for x, y in data], max_batches=2)
    assert n == 2
    assert torch.equal(net.bn2.running_var, ref.bn2.running_var)
    assert recalibrate_bn(nn.Linear(3, 3), data) == 0
    with pytest.raises(UsageError, match="no batch"):
        recalibrate_bn(SmallCNN(), [])


def test_greedy_soup_written_with_recalibrated_statistics(tmp_path: Path) -> None:
    torch.manual_seed(2)
    base = SmallCNN().state_dict()
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        sd = {
            k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in base.items()
        }
        sd["bn1.running_var"] = sd["bn1.running_var"].abs()
        sd["bn2.running_var"] = sd["bn2.running_var"].abs()
        (tmp_path / f"cnn{i}").mkdir()
        save_file(sd, str(tmp_path / f"cnn{i}" / "model.safetensors"))
        paths.append(tmp_path / f"cnn{i}")
    data = loader(4, seed=9)

    def score(state):  # type: ignore[no-untyped-def]
        return 1.0  # every candidate ties: the paper's rule keeps all of them

    model = SmallCNN()
    r = greedy_soup(paths, score, tmp_path / "soup", recalibrate=(model, data))
    assert len(r.ingredients) == 3
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    uniform_soup(r.ingredients, tmp_path / "uniform", progress=False)
    plain = load_file(str(tmp_path / "uniform" / "model.safetensors"))
    ref = SmallCNN()
    ref.load_state_dict(plain)
    update_bn(data, ref)
    expected = ref.state_dict()
    bn = {
        f"bn{i}.{b}" for i in (1, 2) for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    for k in written:
        if k in bn:
            assert torch.equal(written[k], expected[k]), k
        else:
            assert torch.equal(written[k], plain[k]), (
                k
            )  # every weight is the uniform soup's, bit for bit
    report = json.loads((tmp_path / "soup" / "soupkit-report.json").read_text())
    assert (
        report["bn_recalibration"]["batches"] == 4
        and set(report["bn_recalibration"]["tensors"]) == bn
    )
    assert report["soup_recipe"]["merge_method"] == "linear" and "greedy" in report
    assert (tmp_path / "soup" / "greedy-soup.png").is_file()
