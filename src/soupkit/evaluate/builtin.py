"""Built-in evaluators for Hugging Face models. Needs the ``eval`` extra (``transformers``).

Both evaluators build the model and tokenize the data **once**; each candidate only costs a
``load_state_dict`` and batched forward passes under ``torch.inference_mode()``. Examples are
sorted by length and padded per batch, so little compute goes to padding.

* :class:`HFClassificationEvaluator`: accuracy (or negative mean cross-entropy) of a
  sequence-classification model on a CSV / TSV / JSONL file. A :class:`BoundedEvaluator`: it stops
  as soon as a candidate cannot reach the threshold it is asked about; and a
  :class:`PerExampleEvaluator`: it scores requested examples one by one, for paired sequential
  decisions.
* :class:`HFCausalLMPerplexityEvaluator`: negative perplexity of a causal LM on a text file.

Loading a candidate is strict: every tensor of the model must be provided, with the right shape,
and no unknown tensor may appear; all problems are reported at once as
:class:`~soupkit.errors.EvaluationError`. Two exceptions, both as in Hugging Face's own loading:
tied weights (e.g. GPT-2's ``lm_head.weight``, which *is* ``transformer.wte.weight``; checkpoints
hold one name of a tied group, so any one name suffices), and names the model class lists in
``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``. Errors raised
while running the model propagate unchanged; :func:`~soupkit.evaluate.protocol.run_evaluator`
wraps them with the candidate's name.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from soupkit._util import extras as _extras
from soupkit.errors import EvaluationError
from soupkit.evaluate.protocol import EvalResult, accuracy_bound, meets

__all__ = ["HFCausalLMPerplexityEvaluator", "HFClassificationEvaluator"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _transformers() -> Any:
    return _extras.require(
        "transformers", "eval", "the built-in Hugging Face evaluation", EvaluationError
    )


_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast(device: str, dtype: str | torch.dtype | None) -> Callable[[], Any]:
    """A factory of the evaluation's autocast context (``None``: full precision)."""
    if dtype is None:
        return contextlib.nullcontext
    amp = dtype if isinstance(dtype, torch.dtype) else _AUTOCAST.get(dtype)
    if amp not in _AUTOCAST.values():
        raise EvaluationError(
            f"unknown autocast dtype {dtype!r}; expected one of {sorted(_AUTOCAST)} or None"
        )
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type=device_type, dtype=amp)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise EvaluationError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _load_hf(auto_class: str, model_dir: Path, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model (in eval mode) and tokenizer from a local folder; never touches the network."""
    transformers = _transformers()
    if not (model_dir / "config.json").is_file():
        raise EvaluationError(
            f"{str(model_dir)!r} is not a Hugging Face model folder: no config.json\n"
            "hint: give the folder that holds config.json, the tokenizer files and the weights"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True
        )
        model = getattr(transformers, auto_class).from_pretrained(
            str(model_dir), local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise EvaluationError(
            f"cannot load {auto_class} and its tokenizer from {str(model_dir)!r}: {e}\n"
            "hint: the folder needs config.json, tokenizer files and weights (save_pretrained "
            "writes all three)"
        ) from e
    model.to(device=device, dtype=dtype).eval()
    # Evaluation needs no gradients; turning them off also lets load_state_dict skip autograd.
    model.requires_grad_(False)
    return model, tokenizer


class _StateLoader:
    """Strict, tie-aware ``load_state_dict`` with every problem reported at once."""

    def __init__(self, model: Any, model_dir: Path) -> None:
        self.model = model
        self.model_dir = model_dir
        expected = model.state_dict()
        self.shapes = {k: tuple(t.shape) for k, t in expected.items()}
        groups: dict[tuple[int, tuple[int, ...]], list[str]] = defaultdict(list)
        for k, t in expected.items():
            if t.numel():
                groups[(t.data_ptr(), tuple(t.shape))].append(k)
        self.tied = {k: g for g in groups.values() if len(g) > 1 for k in g}
        # The model class's own list of names a checkpoint may lack or carry extra (constant
        # buffers, unused poolers): Hugging Face's from_pretrained accepts them, and so do we.
        self.may_miss = [
            re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []
        ]
        self.may_add = [
            re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
        ]

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [
            k
            for k in self.shapes
            if k not in state
            and not any(alias in state for alias in self.tied.get(k, ()))
            and not any(p.search(k) for p in self.may_miss)
        ]
        unexpected = [
            k for k in state if k not in self.shapes and not any(p.search(k) for p in self.may_add)
        ]
        wrong = [
            f"{k}: got {list(state[k].shape)}, expected {list(self.shapes[k])}"
            for k in state
            if k in self.shapes and tuple(state[k].shape) != self.shapes[k]
        ]
        if missing or unexpected or wrong:
            parts = [f"the candidate's tensors do not fit the model in {str(self.model_dir)!r}:"]
            for title, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", wrong),
            ):
                if items:
                    shown = ", ".join(items[:8]) + (
                        f", ... ({len(items) - 8} more)" if len(items) > 8 else ""
                    )
                    parts.append(f"  {len(items)} {title}: {shown}")
            parts.append(
                "hint: the candidate must use the tensor names and shapes of this model's "
                "checkpoint; all-missing plus all-unexpected usually means a name prefix differs "
                "(e.g. 'module.' or 'model.') or a different architecture"
            )
            raise EvaluationError("\n".join(parts))
        # Validated above: non-strict loading only tolerates tied aliases and the model's own
        # ignore lists, and skips the tolerated extra names.
        self.model.load_state_dict(
            {k: v for k, v in state.items() if k in self.shapes}, strict=False
        )


def _read_records(path: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a CSV / TSV / JSONL file, checked to have ``columns``."""
    if not path.is_file():
        raise EvaluationError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = reader.fieldnames or []
            absent = [c for c in columns if c not in header]
            if absent:
                raise EvaluationError(
                    f"data file {str(path)!r} has no column(s) {absent}; its columns are "
                    f"{header}\nhint: set text_column= / label_column= to the right names"
                )
            for row in reader:
                if any(row.get(c) is None for c in columns):
                    raise EvaluationError(
                        f"data file {str(path)!r}, line {reader.line_num}: the row has fewer "
                        f"fields than the header {header}\nhint: quote fields that contain commas"
                    )
                rows.append(row)
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvaluationError(
                        f"data file {str(path)!r}, line {number}: not valid JSON ({e.msg})"
                    ) from e
                except RecursionError:
                    raise EvaluationError(
                        f"data file {str(path)!r}, line {number}: not valid JSON (nested too deeply)"
                    ) from None
                if not isinstance(row, dict) or any(c not in row for c in columns):
                    have = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise EvaluationError(
                        f"data file {str(path)!r}, line {number}: expected an object with keys "
                        f"{list(columns)}, got {have}\nhint: set text_column= / label_column="
                    )
                rows.append(row)
    else:
        raise EvaluationError(
            f"data file {str(path)!r}: unknown format {suffix!r}; expected .csv, .tsv or .jsonl"
        )
    if not rows:
        raise EvaluationError(f"data file {str(path)!r} holds no examples")
    return rows


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _label_ids(
    values: Sequence[Any],
    labels: Mapping[str, int] | None,
    config: Any,
    data_file: Path,
    model_dir: Path,
) -> tuple[list[int], dict[str, int]]:
    """Map the file's label values to class ids; returns the ids and the mapping used.

    Order of precedence: the ``labels`` argument; the label names in the model's ``label2id``
    (integer ids are accepted too); if the model has no names (``LABEL_0``...), integer ids as
    they are, or else the sorted unique values.
    """
    num_labels = int(config.num_labels)
    if labels is not None:
        mapping, source, ints_ok = {str(k): int(v) for k, v in labels.items()}, "labels=", False
    else:
        names = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        if names and not all(re.fullmatch(r"LABEL_\d+", k) for k in names):
            mapping, source, ints_ok = names, f"label2id in {model_dir / 'config.json'}", True
        elif all(_as_int(v) is not None for v in values):
            mapping, source, ints_ok = {}, "integer ids", True
        else:
            unique = sorted({str(v) for v in values})
            mapping = {v: i for i, v in enumerate(unique)}
            source, ints_ok = "sorted unique values (the model names no labels)", False
    ids: list[int] = []
    unknown: set[str] = set()
    for v in values:
        key = str(v)
        as_int = _as_int(v)
        if key in mapping:
            ids.append(mapping[key])
        elif ints_ok and as_int is not None:
            ids.append(as_int)
        else:
            unknown.add(key)
    if unknown:
        shown = sorted(unknown)[:10]
        raise EvaluationError(
            f"data file {str(data_file)!r}: {len(unknown)} label value(s) {shown} are not known "
            f"(mapping from {source}: {mapping})\nhint: pass labels={{'name': id, ...}} to map "
            "the file's labels to the model's class ids"
        )
    bad = sorted({i for i in ids if not 0 <= i < num_labels})
    if bad:
        raise EvaluationError(
            f"data file {str(data_file)!r}: class id(s) {bad[:10]} are outside the model's "
            f"{num_labels} labels (mapping from {source})\nhint: the model in {str(model_dir)!r} "
            f"has num_labels={num_labels}; check label_column= or pass labels="
        )
    return ids, mapping


def _pad_batches(
    encoded: Mapping[str, Sequence[Sequence[int]]],
    order: Sequence[int],
    batch_size: int,
    pad_id: int,
    device: str,
) -> list[dict[str, torch.Tensor]]:
    """Right-padded tensors per batch of ``order`` (indices sorted by length)."""
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded["input_ids"][i]) for i in idx)
        batch = {}
        for key, seqs in encoded.items():
            fill = pad_id if key == "input_ids" else 0
            t = torch.full((len(idx), width), fill, dtype=torch.long)
            for row, i in enumerate(idx):
                t[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            batch[key] = t.to(device)
        batches.append(batch)
    return batches


class HFClassificationEvaluator:
    """Accuracy (or negative loss) of a sequence-classification model on a labelled file.

    Args:
        model_dir (`str | Path`): a local Hugging Face folder (config, tokenizer, weights) whose
            architecture matches the candidates, e.g. one of the ingredients.
        data_file (`str | Path`): ``.csv``, ``.tsv`` or ``.jsonl`` with a text and a label column.
        text_column (`str`): column holding the text.
        label_column (`str`): column holding the label (a name or an integer id).
        labels (`Mapping[str, int]`, *optional*): label value -> class id. Without it, the names
            in the model's ``label2id`` are used (integer ids are accepted as well); if the model
            names no labels, integer ids are used as they are, else the sorted unique values.
        text_pair_column (`str`, *optional*): second text for pair tasks (NLI, paraphrase).
        batch_size (`int`): examples per forward pass.
        max_length (`int`): truncation length in tokens.
        device (`str`): torch device.
        dtype (`str | torch.dtype`): the dtype the model's weights are cast to (``"float32"`` by
            default).
        autocast (`str | torch.dtype`, *optional*): mixed precision: ``"bfloat16"`` or
            ``"float16"`` runs matrix products in that dtype under `torch.autocast` while the
            weights, LayerNorm and softmax stay float32. On a CPU with AVX512-BF16, ``"bfloat16"``
            evaluates about twice as fast as float32; predictions can differ on a few borderline
            examples, so compare candidates under one setting.
        metric (`str`): ``"accuracy"`` or ``"neg_loss"`` (negative mean cross-entropy).

    Both metrics support exact early stopping (see :mod:`soupkit.evaluate.protocol`): accuracy
    through :func:`accuracy_bound`; ``neg_loss`` because per-example losses are non-negative, so
    ``-(loss so far) / total`` bounds the final score. ``result.metrics`` holds ``accuracy`` and
    ``loss`` over the evaluated examples.
    """

    def __init__(
        self,
        model_dir: str | Path,
        data_file: str | Path,
        *,
        text_column: str = "text",
        label_column: str = "label",
        labels: Mapping[str, int] | None = None,
        text_pair_column: str | None = None,
        batch_size: int = 64,
        max_length: int = 128,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        autocast: str | torch.dtype | None = None,
        metric: str = "accuracy",
    ) -> None:
        if metric not in ("accuracy", "neg_loss"):
            raise EvaluationError(f"unknown metric {metric!r}; expected 'accuracy' or 'neg_loss'")
        if batch_size < 1 or max_length < 1:
            raise EvaluationError(
                f"batch_size and max_length must be positive, got {batch_size} and {max_length}"
            )
        self.model_dir, self.data_file, self.metric = Path(model_dir), Path(data_file), metric
        self._amp = _autocast(device, autocast)
        self.model, tokenizer = _load_hf(
            "AutoModelForSequenceClassification", self.model_dir, device, _resolve_dtype(dtype)
        )
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            # Decoder-only classifiers (GPT-2) have no pad token; they find the last real token
            # through config.pad_token_id, so both must agree.
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise EvaluationError(
                f"the tokenizer in {str(self.model_dir)!r} has neither a pad nor an eos token, "
                "so batches cannot be padded\nhint: set pad_token in tokenizer_config.json"
            )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id
        columns = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
        rows = _read_records(self.data_file, columns)
        ids, self.label_to_id = _label_ids(
            [r[label_column] for r in rows],
            labels,
            self.model.config,
            self.data_file,
            self.model_dir,
        )
        texts = [str(r[text_column]) for r in rows]
        pairs = [str(r[text_pair_column]) for r in rows] if text_pair_column else None
        encoded = dict(tokenizer(texts, pairs, truncation=True, max_length=max_length))
        order = sorted(range(len(rows)), key=lambda i: len(encoded["input_ids"][i]))
        self._order = order
        self._batches = _pad_batches(encoded, order, batch_size, tokenizer.pad_token_id, device)
        label_tensor = torch.tensor(ids, dtype=torch.long)
        # Kept for per_example: requested examples are padded per request batch.
        self._encoded, self._label_all = encoded, label_tensor
        self._pad_id, self._device, self.batch_size = tokenizer.pad_token_id, device, batch_size
        self._labels = [
            label_tensor[order[s : s + batch_size]].to(device)
            for s in range(0, len(order), batch_size)
        ]
        self.total = len(rows)
        self._loader = _StateLoader(self.model, self.model_dir)

    def __repr__(self) -> str:
        return (
            f"HFClassificationEvaluator(model_dir={str(self.model_dir)!r}, "
            f"data_file={str(self.data_file)!r}, examples={self.total}, metric={self.metric!r})"
        )

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        """The full-set score of ``state`` (accuracy, or negative mean loss)."""
        return self.evaluate(state).score

    def _bound(self, correct: int, loss_sum: float, done: int) -> float:
        if self.metric == "accuracy":
            return accuracy_bound(correct, self.total - done, self.total)
        return -(loss_sum / self.total)

    @torch.inference_mode()
    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> EvalResult:
        """Evaluate ``state``, stopping early once it certainly fails ``need``.

        Args:
            state (`Mapping[str, torch.Tensor]`): candidate weights (names as in the model's
                checkpoint; any float dtype, cast on load).
            need (`float`, *optional*): acceptance threshold; ``None`` evaluates everything.
            strict (`bool`): acceptance is ``score > need`` instead of ``score >= need``.

        Returns:
            `EvalResult`: see :mod:`soupkit.evaluate.protocol`.

        Raises:
            EvaluationError: ``state`` does not fit the model (all problems listed).
        """
        self._loader.load(state)
        correct, loss_sum, done = 0, 0.0, 0
        for batch, labels in zip(self._batches, self._labels, strict=True):
            if need is not None:
                bound = self._bound(correct, loss_sum, done)
                if not meets(bound, need, strict=strict):
                    return EvalResult(
                        bound, done, self.total, False, self._metrics(correct, loss_sum, done)
                    )
            with self._amp():
                logits = self.model(**batch).logits.float()
            correct += int((logits.argmax(-1) == labels).sum())
            # Clamped at 0 so the running sum never decreases: that is what makes the neg_loss
            # bound exact (cross-entropy is >= 0 in exact arithmetic anyway).
            loss_sum += max(0.0, float(F.cross_entropy(logits, labels, reduction="sum")))
            done += len(labels)
        score = correct / self.total if self.metric == "accuracy" else -(loss_sum / self.total)
        return EvalResult(score, done, self.total, True, self._metrics(correct, loss_sum, done))

    @staticmethod
    def _metrics(correct: int, loss_sum: float, done: int) -> dict[str, float]:
        return {"accuracy": correct / done, "loss": loss_sum / done} if done else {}

    def n_examples(self) -> int:
        """The number of examples in the data file (see `PerExampleEvaluator`)."""
        return self.total

    @torch.inference_mode()
    def per_example(
        self, state: Mapping[str, torch.Tensor], indices: Sequence[int]
    ) -> torch.Tensor:
        """Per-example scores of ``state`` on the examples at ``indices`` (data-file positions).

        Accuracy: 1.0 for a correct prediction, 0.0 for a wrong one; ``neg_loss``: minus the
        example's cross-entropy. The requested examples are sorted by length and padded per
        batch of ``batch_size``, so a borderline prediction can differ from `evaluate`'s (whose
        batches group other examples) by rounding, most visibly under ``autocast``; compare
        candidates through one of the two paths.

        Raises:
            EvaluationError: an index is outside the data, or ``state`` does not fit the model.
        """
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.total]
        if bad:
            raise EvaluationError(
                f"per_example: example index(es) {bad[:5]} are outside the {self.total} examples of "
                f"{str(self.data_file)!r}\nhint: indices are positions 0..{self.total - 1} in the data file"
            )
        self._loader.load(state)
        out = torch.empty(len(idx), dtype=torch.float32)
        by_len = sorted(range(len(idx)), key=lambda k: len(self._encoded["input_ids"][idx[k]]))
        for s in range(0, len(by_len), self.batch_size):
            ks = by_len[s : s + self.batch_size]
            rows = [idx[k] for k in ks]
            batch = _pad_batches(self._encoded, rows, len(rows), self._pad_id, self._device)[0]
            labels = self._label_all[rows].to(self._device)
            with self._amp():
                logits = self.model(**batch).logits.float()
            if self.metric == "accuracy":
                values = (logits.argmax(-1) == labels).float()
            else:
                values = -F.cross_entropy(logits, labels, reduction="none").clamp(min=0.0)
            out[torch.tensor(ks)] = values.cpu()
        return out

    def labelled_batches(self) -> list[dict[str, torch.Tensor]]:
        """The tokenized data as batches of model keyword arguments plus ``labels``.

        For training on the evaluation data (a learned soup's coefficients) with the same
        tokenization; batches are grouped by length, so shuffle them for optimisation.
        """
        return [{**b, "labels": y} for b, y in zip(self._batches, self._labels, strict=True)]

    @torch.inference_mode()
    def correct(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example correctness of ``state`` (bool, in the data file's order).

        For paired statistics between two candidates on the same examples (e.g. a paired
        bootstrap of an accuracy difference).
        """
        self._loader.load(state)
        hits = torch.empty(self.total, dtype=torch.bool)
        pos = 0
        for batch, labels in zip(self._batches, self._labels, strict=True):
            with self._amp():
                pred = self.model(**batch).logits.float().argmax(-1)
            idx = torch.tensor(self._order[pos : pos + len(labels)])
            hits[idx] = (pred == labels).cpu()
            pos += len(labels)
        return hits


def _read_texts(path: Path, text_column: str) -> list[str]:
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise EvaluationError(f"text file {str(path)!r} does not exist")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [t for t in texts if t]
        if not texts:
            raise EvaluationError(f"text file {str(path)!r} holds no non-empty line")
        return texts
    return [str(r[text_column]) for r in _read_records(path, [text_column])]


class HFCausalLMPerplexityEvaluator:
    """Negative perplexity of a causal language model on a text file (higher is better).

    Documents: each non-empty line of a ``.txt`` file, or the ``text_column`` of each record of
    a ``.csv`` / ``.tsv`` / ``.jsonl`` file. Each document is tokenized with the tokenizer's
    special tokens (e.g. Llama's BOS) and cut into consecutive windows of at most ``max_length``
    tokens; within a window every token after the first is predicted from the ones before it (no
    context is carried across windows). Then::

        perplexity = exp(sum of token NLLs / number of predicted tokens),  score = -perplexity

    ``evaluate`` always runs to completion: the score passes through ``exp``, whose rounding is
    not guaranteed monotone, so a bound could not promise the exact decision. It has no
    ``per_example``: perplexity is not a mean of bounded per-example scores, so the paired
    sequential test (which needs 0/1 correctness per example) does not apply.
    ``result.metrics`` holds ``perplexity``, ``nll`` (mean per token) and ``tokens``.

    Args:
        model_dir (`str | Path`): a local Hugging Face causal-LM folder.
        text_file (`str | Path`): ``.txt`` (one document per line), ``.csv``, ``.tsv``, ``.jsonl``.
        text_column (`str`): column holding the text (not used for ``.txt``).
        max_length (`int`): window length in tokens.
        batch_size (`int`): windows per forward pass.
        device (`str`): torch device.
        dtype (`str | torch.dtype`): the dtype the model's weights are cast to.
        autocast (`str | torch.dtype`, *optional*): mixed precision under `torch.autocast`
            (``"bfloat16"`` or ``"float16"``), as for `HFClassificationEvaluator`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        text_file: str | Path,
        *,
        text_column: str = "text",
        max_length: int = 512,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        autocast: str | torch.dtype | None = None,
    ) -> None:
        if max_length < 2 or batch_size < 1:
            raise EvaluationError(
                f"max_length must be >= 2 and batch_size >= 1, got {max_length} and {batch_size}"
            )
        self.model_dir, self.text_file = Path(model_dir), Path(text_file)
        self._amp = _autocast(device, autocast)
        self.model, tokenizer = _load_hf(
            "AutoModelForCausalLM", self.model_dir, device, _resolve_dtype(dtype)
        )
        windows: list[list[int]] = []
        for ids in tokenizer(_read_texts(self.text_file, text_column))["input_ids"]:
            windows += [ids[s : s + max_length] for s in range(0, len(ids), max_length)]
        windows = [w for w in windows if len(w) >= 2]  # a 1-token window predicts nothing
        if not windows:
            raise EvaluationError(
                f"text file {str(self.text_file)!r}: no document has 2 or more tokens, so there "
                "is nothing to predict"
            )
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        encoded = {"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]}
        # Padding sits at the right end and is masked out of the loss, so any id works for it.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._batches = _pad_batches(encoded, order, batch_size, pad, device)
        self.total = len(windows)
        self.tokens = sum(len(w) - 1 for w in windows)
        self._loader = _StateLoader(self.model, self.model_dir)

    def __repr__(self) -> str:
        return (
            f"HFCausalLMPerplexityEvaluator(model_dir={str(self.model_dir)!r}, "
            f"text_file={str(self.text_file)!r}, windows={self.total}, tokens={self.tokens})"
        )

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        """``-perplexity`` of ``state`` on the text file."""
        return self.evaluate(state).score

    @torch.inference_mode()
    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> EvalResult:
        """Evaluate ``state`` on every window (``need`` and ``strict`` do not stop it early).

        Args:
            state (`Mapping[str, torch.Tensor]`): candidate weights.
            need (`float`, *optional*): accepted for protocol compatibility.
            strict (`bool`): accepted for protocol compatibility.

        Returns:
            `EvalResult`: ``score = -perplexity``; always complete.

        Raises:
            EvaluationError: ``state`` does not fit the model (all problems listed).
        """
        self._loader.load(state)
        nll = 0.0
        for batch in self._batches:
            with self._amp():
                logits = self.model(**batch).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            target = batch["input_ids"][:, 1:]
            token_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            # Select rather than multiply by the mask: a padded position may hold inf, and inf * 0
            # is NaN.
            real = batch["attention_mask"][:, 1:].bool()
            nll += float(token_nll[real].sum(dtype=torch.float64))
        mean = nll / self.tokens
        ppl = math.exp(mean) if mean < 709.0 else math.inf  # exp overflows a float past ~709.78
        return EvalResult(
            -ppl,
            self.total,
            self.total,
            True,
            {"perplexity": ppl, "nll": mean, "tokens": float(self.tokens)},
        )
