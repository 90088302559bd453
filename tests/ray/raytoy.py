"""A tiny classification problem and evaluators for the backend tests (no Ray needed here).

A linear 3-class classifier on 12 features; *good* ingredients are the true weights plus noise
that cancels in their average, *perm* / *noisy* ones are harmful. Evaluators come in the forms a
backend must handle: a picklable object (`Accuracy`, a bounded evaluator) and a Python file named
by an import string (`write_eval_module`), including ones that fail on their first call.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from soupkit.evaluate.protocol import EvalResult, accuracy_bound, meets

D, C = 12, 3
KINDS = ["good", "perm", "good", "noisy", "good", "good"]


def problem(
    seed: int = 0, n: int = 600
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W, X_val, y_val, X_test, y_test`` (the test set is shifted)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g)
    xv = torch.randn(n, D, generator=g)
    xt = torch.randn(n, D, generator=g) * 1.5 + 0.3
    return w, xv, (xv @ w.T).argmax(1), xt, (xt @ w.T).argmax(1)


def make_ingredients(
    root: Path, kinds: Sequence[str] = tuple(KINDS), dtype: torch.dtype = torch.float32
) -> list[Path]:
    """One folder with ``model.safetensors`` per kind (``good`` / ``perm`` / ``noisy``)."""
    w = problem()[0]
    g = torch.Generator().manual_seed(7)
    err = 1.2 * torch.randn(len(kinds), C, D, generator=g)
    goods = [i for i, k in enumerate(kinds) if k == "good"]
    if len(goods) > 1:
        err[goods] -= err[goods].mean(0)
    paths = []
    for i, kind in enumerate(kinds):
        weight = {
            "good": w + err[i],
            "perm": w[[1, 2, 0]] + 0.25 * err[i],
            "noisy": w + 5.0 * err[i],
        }[kind]
        state = {
            "fc.weight": weight.to(dtype),
            "fc.bias": (0.05 * torch.randn(C, generator=g)).to(dtype),
            "fc.steps": torch.tensor([i], dtype=torch.int64),
        }
        folder = root / f"ft{i:02d}-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "model.safetensors"))
        paths.append(folder)
    return paths


def accuracy(state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    logits = x @ state["fc.weight"].float().T + state["fc.bias"].float()
    return int((logits.argmax(1) == y).sum()) / len(y)


class Accuracy:
    """A picklable bounded evaluator (exact early rejection)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch: int = 50, key: str = "toy-val"
    ) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.cache_key = key

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        return self.evaluate(state).score

    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> EvalResult:
        total, correct, done = len(self.y), 0, 0
        for a in range(0, total, self.batch):
            if need is not None and not meets(
                accuracy_bound(correct, total - done, total), need, strict=strict
            ):
                return EvalResult(accuracy_bound(correct, total - done, total), done, total, False)
            logits = (
                self.x[a : a + self.batch] @ state["fc.weight"].float().T + state["fc.bias"].float()
            )
            correct += int((logits.argmax(1) == self.y[a : a + self.batch]).sum())
            done += len(self.y[a : a + self.batch])
        return EvalResult(correct / total, done, total, True)


class PerExampleAccuracy(Accuracy):
    """`Accuracy` that also scores examples one by one (a `PerExampleEvaluator`)."""

    def n_examples(self) -> int:
        return len(self.y)

    def per_example(
        self, state: Mapping[str, torch.Tensor], indices: Sequence[int]
    ) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        logits = self.x[idx] @ state["fc.weight"].float().T + state["fc.bias"].float()
        return (logits.argmax(1) == self.y[idx]).float()


class Plain:
    """A picklable plain evaluator (no early rejection): accuracy."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, key: str = "toy-plain") -> None:
        self.x, self.y, self.cache_key = x, y, key

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        return accuracy(state, self.x, self.y)


EVAL_MODULE = """
import os
import torch

_x, _y = torch.load({data!r}, weights_only=True)
MARK = {mark!r}

def accuracy(state):
    logits = _x @ state["fc.weight"].float().T + state["fc.bias"].float()
    return int((logits.argmax(1) == _y).sum()) / len(_y)

def _first_call():
    # Exactly one call, in any process, creates the marker (O_EXCL is atomic).
    try:
        os.close(os.open(MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True

def crash_once(state):
    # The first call anywhere kills its worker process (as a segfault or the OOM killer would).
    if _first_call():
        os._exit(3)
    return accuracy(state)

def raise_once(state):
    if _first_call():
        raise RuntimeError("transient failure on the first call")
    return accuracy(state)

def fail_on_ingredient_1(state):
    # fc.steps holds the index of the (first) ingredient: ingredient 1 alone cannot be scored.
    if int(state["fc.steps"][0]) == 1:
        raise ValueError("cannot score this candidate")
    return accuracy(state)
"""


def write_eval_module(folder: Path, name: str, x: torch.Tensor, y: torch.Tensor) -> Path:
    """``folder/name.py`` with the evaluators above on ``(x, y)``; its marker is ``folder/name.mark``."""
    data = folder / f"{name}.pt"
    torch.save((x, y), data)
    path = folder / f"{name}.py"
    path.write_text(
        textwrap.dedent(EVAL_MODULE.format(data=str(data), mark=str(folder / f"{name}.mark")))
    )
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    """Every weight file of an output folder (name -> bytes)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def tiny_bert(root: Path, k: int) -> list[Path]:
    """``k`` tiny BERT sentiment classifiers (Hugging Face folders; needs transformers) and
    ``root/val.csv`` / ``root/test.csv``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = "good great fun loved bad awful boring hated the a movie plot was very".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
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
        save_file(
            {
                n: (t + 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
                for n, t in sd.items()
            },
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
        paths.append(folder)
    for name, n, seed in (("val.csv", 40, 0), ("test.csv", 30, 1)):
        g = torch.Generator().manual_seed(seed)
        rows = ["text,label"]
        for _ in range(n):
            pos = bool(torch.randint(0, 2, (1,), generator=g))
            pool = ["good", "great", "fun", "loved"] if pos else ["bad", "awful", "boring", "hated"]
            picks = [pool[int(j)] for j in torch.randint(0, 4, (3,), generator=g)]
            rows.append(f"the movie was {' '.join(picks)},{'positive' if pos else 'negative'}")
        (root / name).write_text("\n".join(rows) + "\n")
    return paths
