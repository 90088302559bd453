"""The ``greedy``, ``sweep`` and ``learned`` commands end to end: user evaluator modules written to
tmp_path, and the built-in Hugging Face evaluator on a tiny BERT."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import soup_toy as toy
import torch
from safetensors.torch import load_file, save_file

from soupkit.cli import main

EVAL_MODULE = """
import torch
from soupkit.evaluate.protocol import EvalResult, accuracy_bound, meets

_x, _y = torch.load({data!r}, weights_only=True)

def accuracy(state):
    logits = _x @ state["fc.weight"].float().T + state["fc.bias"].float()
    return int((logits.argmax(1) == _y).sum()) / len(_y)

class Bounded:
    calls = 0
    def __call__(self, state):
        return self.evaluate(state).score
    def evaluate(self, state, *, need=None, strict=False):
        Bounded.calls += 1
        total, correct, done = len(_y), 0, 0
        for a in range(0, total, 50):
            if need is not None and not meets(accuracy_bound(correct, total - done, total), need, strict=strict):
                return EvalResult(accuracy_bound(correct, total - done, total), done, total, False)
            logits = _x[a:a+50] @ state["fc.weight"].float().T + state["fc.bias"].float()
            correct += int((logits.argmax(1) == _y[a:a+50]).sum())
            done += len(_y[a:a+50])
        return EvalResult(correct / total, done, total, True)

bounded = Bounded()
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working directory, with val/test evaluator modules and toy ingredients."""
    monkeypatch.chdir(tmp_path)
    _, xv, yv, xt, yt = toy.problem()
    torch.save((xv, yv), tmp_path / "val.pt")
    torch.save((xt, yt), tmp_path / "test.pt")
    (tmp_path / "val_eval.py").write_text(EVAL_MODULE.format(data=str(tmp_path / "val.pt")))
    (tmp_path / "test_eval.py").write_text(EVAL_MODULE.format(data=str(tmp_path / "test.pt")))
    toy.make_ingredients(tmp_path / "runs", ["good", "perm", "good", "noisy", "good", "good"])
    return tmp_path


def ingredients(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "runs").iterdir())


def test_greedy_end_to_end_writes_soup_report_plot_and_reuses_the_cache(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "greedy",
        "--evaluator",
        "val_eval:bounded",
        "--test-evaluator",
        "test_eval.py:accuracy",
        "--cache",
        "scores.jsonl",
        "--out",
        "soup",
        "--no-progress",
        *ingredients(project),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "greedy soup (>=): 4 of 6 ingredients" in out
        and "rejected early" in out
        and "held-out test" in out
    )
    report = json.loads((project / "soup" / "soupkit-report.json").read_text())
    g = report["greedy"]
    assert sorted(Path(p).name for p in g["final"]["ingredients"]) == [
        "ft00-good",
        "ft02-good",
        "ft04-good",
        "ft05-good",
    ]
    assert (
        g["examples"]["saved"] > 0
        and g["held_out"]["soup_score"] > g["held_out"]["best_single_score"]
    )
    assert (
        g["evaluator"].startswith("val_eval:bounded@")
        and report["cli"]["command"] == "soupkit greedy"
    )
    assert report["cli"]["options"]["evaluator"] == "val_eval:bounded"
    assert (project / "soup" / "greedy-soup.png").read_bytes().startswith(b"\x89PNG")
    assert (project / "soup" / "model.safetensors").is_file()

    assert main(args + ["--force"]) == 0
    again = capsys.readouterr().out
    assert f"evaluations: 0 run, {g['evaluations']} from the cache" in again
    # Editing the evaluator module changes its identity: nothing stale is reused.
    (project / "val_eval.py").write_text((project / "val_eval.py").read_text() + "\n# edited\n")
    assert main(args + ["--force", "--no-early-stop"]) == 0
    assert "evaluations: 0 run" not in capsys.readouterr().out


def test_sweep_end_to_end_with_a_shift_set(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = toy.problem()[0]
    e = 0.8 * torch.randn(toy.C, toy.D, generator=torch.Generator().manual_seed(4))
    for name, weight in (("zs", w + e), ("ft", w - e)):
        toy.write(project / name, {"fc.weight": weight, "fc.bias": torch.zeros(toy.C)})
    assert (
        main(
            [
                "sweep",
                "--base",
                "zs",
                "ft",
                "--values",
                "0:1:5",
                "--evaluator",
                "val_eval:accuracy",
                "--shift-evaluator",
                "test_eval:accuracy",
                "--no-cache",
                "--out",
                "wise",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "best alpha=0.5 with score 1" in out and "shifted" in out
    report = json.loads((project / "wise" / "soupkit-report.json").read_text())
    assert [p["value"] for p in report["sweep"]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(p["shift_score"] is not None for p in report["sweep"]["points"])
    assert (project / "wise" / "sweep.png").is_file()


def test_learned_end_to_end_with_a_setup_module(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "setup_mod.py").write_text(
        textwrap.dedent(f"""
        import torch
        from torch import nn
        x, y = torch.load({str(project / "val.pt")!r}, weights_only=True)

        class Toy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear({toy.D}, {toy.C})
                self.fc.register_buffer("steps", torch.zeros(1, dtype=torch.int64))
            def forward(self, x):
                return self.fc(x)

        def setup():
            return {{"model": Toy(), "data": [(x[i:i+200], y[i:i+200]) for i in range(0, 1000, 200)]}}
    """)
    )
    assert (
        main(
            [
                "learned",
                "--setup",
                "setup_mod:setup",
                "--evaluator",
                "val_eval:accuracy",
                "--steps",
                "40",
                "--lr",
                "0.1",
                "--out",
                "learned",
                "--no-progress",
                *ingredients(project),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "score: learned soup" in out
    report = json.loads((project / "learned" / "soupkit-report.json").read_text())
    assert report["learned"]["score"] > report["learned"]["uniform_score"]
    assert (project / "learned" / "learned-soup.png").is_file()


def test_usage_errors_exit_2_with_a_hint(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = ingredients(project)
    assert main(["greedy", "--out", "x", *ck]) == 2
    assert "give exactly one of --evaluator" in capsys.readouterr().err
    assert (
        main(
            [
                "greedy",
                "--evaluator",
                "val_eval:accuracy",
                "--test-data",
                "t.csv",
                "--out",
                "x",
                *ck,
            ]
        )
        == 2
    )
    assert "needs a built-in evaluator" in capsys.readouterr().err
    assert (
        main(
            ["sweep", "--values", "0,a", "--evaluator", "val_eval:accuracy", "--out", "x", *ck[:2]]
        )
        == 2
    )
    assert "--values '0,a'" in capsys.readouterr().err
    assert main(["greedy", "--evaluator", "nosuch_mod:fn", "--out", "x", *ck]) == 1
    assert "no module named 'nosuch_mod'" in capsys.readouterr().err
    assert not (project / "x").exists()


# --- the built-in Hugging Face evaluator, on a tiny BERT --------------------------------------

transformers = pytest.importorskip("transformers")
WORDS = "good great fun loved bad awful boring hated the a movie plot was very".split()


def tiny_bert_ingredients(root: Path, k: int) -> list[Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        pad_token_id=0,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    base = transformers.BertForSequenceClassification(config).eval()
    paths = []
    for i in range(k):
        folder = root / f"bert{i}"
        base.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        g = torch.Generator().manual_seed(i)
        sd = load_file(str(folder / "model.safetensors"))
        sd = {
            n: (t + 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
            for n, t in sd.items()
        }
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        paths.append(folder)
    return paths


def write_csv(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = ["text,label"]
    for _ in range(n):
        pos = bool(torch.randint(0, 2, (1,), generator=g))
        words = ["good", "great", "fun", "loved"] if pos else ["bad", "awful", "boring", "hated"]
        picks = [words[int(j)] for j in torch.randint(0, 4, (3,), generator=g)]
        rows.append(f"the movie was {' '.join(picks)},{'positive' if pos else 'negative'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_builtin_hf_classification_greedy_and_learned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    paths = [str(p) for p in tiny_bert_ingredients(tmp_path, 3)]
    write_csv(tmp_path / "val.csv", 60, 0)
    write_csv(tmp_path / "test.csv", 40, 1)
    args = [
        "greedy",
        "--hf-classification",
        "val.csv",
        "--test-data",
        "test.csv",
        "--batch-size",
        "16",
        "--cache",
        "c.jsonl",
        "--out",
        "soup",
        "--no-progress",
        *paths,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "soup" / "soupkit-report.json").read_text())
    g = report["greedy"]
    assert g["evaluator"].startswith("hf-classification|val.csv|") and g["held_out"] is not None
    assert all(0.0 <= s["score"] <= 1.0 for s in g["ingredients"])
    assert (tmp_path / "soup" / "config.json").is_file() and (
        tmp_path / "soup" / "tokenizer.json"
    ).is_file()
    assert "greedy soup (>=)" in out
    assert main(args + ["--force"]) == 0
    assert "evaluations: 0 run" in capsys.readouterr().out
    # Mixed precision is another evaluator: its scores are cached under another identity.
    assert main(args + ["--force", "--eval-autocast", "bfloat16"]) == 0
    assert "evaluations: 0 run" not in capsys.readouterr().out
    amp = json.loads((tmp_path / "soup" / "soupkit-report.json").read_text())["greedy"]
    assert (
        amp["evaluator"].startswith("hf-classification|val.csv|")
        and amp["evaluator"] != g["evaluator"]
    )

    assert (
        main(
            [
                "learned",
                "--hf-classification",
                "val.csv",
                "--test-data",
                "test.csv",
                "--steps",
                "3",
                "--batch-size",
                "20",
                "--out",
                "learned",
                "--no-progress",
                *paths,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "learned" / "soupkit-report.json").read_text())
    assert len(report["learned"]["losses"]) == 3 and report["learned"]["score"] is not None
    coef = report["learned"]["coefficients"]
    assert len(coef) == 3 and abs(sum(coef) - 1) < 1e-6
    written = load_file(str(tmp_path / "learned" / "model.safetensors"))
    assert written.keys() == load_file(str(Path(paths[0]) / "model.safetensors")).keys()
