"""A persistent score cache: a re-run does not evaluate what it has already evaluated.

The cache is an append-only JSON-lines file (default ``~/.cache/soupkit/scores.jsonl``; the
folder follows ``$SOUPKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/soupkit``). Each line is one
record:

* ``{"kind": "score", "evaluator": ID, "subject": KEY, "score": ..., "complete": ..., ...}``:
  the result of evaluating *subject* with evaluator *ID*. The subject is a content hash: an
  ingredient's `checkpoint_digest` (SHA-256 of its safetensors files), or for a soup the hash of
  the recipe with every path replaced by its content digest. Renaming or moving a checkpoint
  keeps its scores; changing one byte invalidates them.
* ``{"kind": "examples", "evaluator": ID, "subject": KEY, "n": N, "values": [...]}``: per-example
  scores of *subject* (a `PerExampleEvaluator`'s ``per_example``), one entry per example of the
  evaluation set, ``null`` where the example was not evaluated (a paired sequential decision
  stops early). Records of one key are merged, so the known examples only grow.
* ``{"kind": "file", "key": "PATH|DEV|INODE|SIZE|MTIME_NS|CTIME_NS", "sha256": ...}``: a file's
  hash under a fast key (`soupkit.io.digest.HashCache.key`), so unchanged files are not
  re-hashed.

Early-stopped results are cached too: such a record holds an upper bound of the score that was
rejected against a threshold. It answers a later query only when the bound is rejected against
the *new* threshold as well (``not meets(bound, need, strict)``), which proves the full score is
rejected too; so a cached decision is always the decision a fresh evaluation would make.

Records are appended with one ``write`` each as soon as they exist, so an interrupted run keeps
what it computed; unreadable lines (e.g. a torn last line) are skipped. The last record for a
key wins.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import UsageError
from soupkit.evaluate.protocol import EvalResult, meets
from soupkit.io.digest import HashCache, cache_dir
from soupkit.search._state import evaluator_identity

__all__ = ["ScoreCache", "cache_identity", "default_cache_path", "open_cache"]

_VERSION = 1


def default_cache_path() -> Path:
    """``scores.jsonl`` in soupkit's cache folder (`soupkit.io.digest.cache_dir`:
    ``$SOUPKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/soupkit``, else ``~/.cache/soupkit``)."""
    return cache_dir() / "scores.jsonl"


def _float(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


class ScoreCache:
    """Scores by (evaluator identity, content key), persisted to a JSON-lines file.

    Args:
        path: the cache file; ``None`` keeps the cache in memory only (nothing persists).

    Attributes:
        hits: lookups answered from the cache.
        memo: the file-hash memo (persisted in the same file, and shared with the merges'
            cache of input digests, `soupkit.io.digest.HashCache`).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._scores: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._examples: dict[tuple[str, str], torch.Tensor] = {}
        self.hits = 0
        self.skipped_lines = 0
        files: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise UsageError(
                    f"{self.path}: cannot read the score cache ({e.strerror})\n"
                    "hint: choose another file with --cache, or --no-cache"
                ) from None
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    self.skipped_lines += 1
                    continue
                if not isinstance(rec, dict) or rec.get("v") != _VERSION:
                    self.skipped_lines += 1
                    continue
                if (
                    rec.get("kind") == "file"
                    and isinstance(rec.get("key"), str)
                    and isinstance(rec.get("sha256"), str)
                ):
                    files[rec["key"]] = rec["sha256"]
                elif rec.get("kind") == "examples" and self._valid_examples(rec):
                    self._merge_examples((rec["evaluator"], rec["subject"]), rec["values"])
                elif rec.get("kind") == "score" and self._valid(rec):
                    self._scores.setdefault((rec["evaluator"], rec["subject"]), []).append(rec)
                else:
                    self.skipped_lines += 1
        # the merges' cache of input digests too, unless nothing may persist
        self.memo = HashCache(
            HashCache.default_path() if self.path is not None else None, records=files
        )

    @staticmethod
    def _valid(rec: Mapping[str, Any]) -> bool:
        return (
            isinstance(rec.get("evaluator"), str)
            and isinstance(rec.get("subject"), str)
            and _float(rec.get("score")) is not None
            and isinstance(rec.get("complete"), bool)
            and (rec["complete"] or _float(rec.get("need")) is not None)
        )

    @staticmethod
    def _valid_examples(rec: Mapping[str, Any]) -> bool:
        values = rec.get("values")
        return (
            isinstance(rec.get("evaluator"), str)
            and isinstance(rec.get("subject"), str)
            and isinstance(values, list)
            and isinstance(rec.get("n"), int)
            and len(values) == rec["n"]
            and all(v is None or _float(v) is not None for v in values)
        )

    def _merge_examples(self, key: tuple[str, str], values: list[float | None]) -> None:
        new = torch.tensor(
            [math.nan if v is None else float(v) for v in values], dtype=torch.float64
        )
        old = self._examples.get(key)
        if old is not None and len(old) == len(new):
            new = torch.where(torch.isnan(new), old, new)
        self._examples[key] = new

    def examples(self, evaluator: str, subject: str, n: int) -> torch.Tensor:
        """Known per-example scores of ``subject`` (float64, length ``n``, NaN where unknown)."""
        got = self._examples.get((evaluator, subject))
        if got is None or len(got) != n:
            return torch.full((n,), math.nan, dtype=torch.float64)
        return got.clone()

    def examples_of(self, evaluator: str, subject: str) -> torch.Tensor | None:
        """Known per-example scores of ``subject`` whatever their number (NaN where unknown), or None."""
        got = self._examples.get((evaluator, subject))
        return None if got is None else got.clone()

    def store_examples(
        self, evaluator: str, subject: str, values: torch.Tensor, *, label: str = ""
    ) -> None:
        """Record per-example scores (NaN: not evaluated); a no-op if nothing new is known."""
        key = (evaluator, subject)
        vals = values.to(torch.float64)
        old = self._examples.get(key)
        if old is not None and len(old) == len(vals):
            if bool(
                torch.equal(
                    torch.isnan(torch.where(torch.isnan(vals), old, vals)), torch.isnan(old)
                )
            ):
                return  # nothing new
        listed = [None if math.isnan(v) else v for v in vals.tolist()]
        self._merge_examples(key, listed)
        self._append(
            {
                "kind": "examples",
                "evaluator": evaluator,
                "subject": subject,
                "label": label,
                "n": len(listed),
                "values": listed,
                "unix": int(time.time()),
            }
        )

    def _append(self, rec: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        line = (json.dumps({"v": _VERSION, **rec}, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write per record: concurrent runs do not interleave lines
            finally:
                os.close(fd)
        except OSError as e:
            raise UsageError(
                f"{self.path}: cannot write the score cache ({e.strerror})\n"
                "hint: choose another file with --cache, or --no-cache"
            ) from None

    def save_file_hashes(self) -> None:
        """Persist file hashes computed since the last call."""
        for key, digest in self.memo.new.items():
            self._append({"kind": "file", "key": key, "sha256": digest})
        self.memo.save()
        self.memo.new.clear()  # appended above, even if the shared file could not be written

    def lookup(
        self, evaluator: str, subject: str, *, need: float | None = None, strict: bool = False
    ) -> EvalResult | None:
        """A cached result that gives the same decision as a fresh evaluation, or None.

        A complete result always qualifies. An early-stopped one qualifies only when ``need``
        is given and its (upper-bound) score is rejected against it.
        """
        recs = self._scores.get((evaluator, subject), [])
        for rec in reversed(recs):
            if rec["complete"]:
                self.hits += 1
                return self._result(rec)
        if need is not None:
            for rec in reversed(recs):
                if not meets(float(rec["score"]), need, strict=strict):
                    self.hits += 1
                    return self._result(rec)
        return None

    @staticmethod
    def _result(rec: Mapping[str, Any]) -> EvalResult:
        metrics = rec.get("metrics")
        clean = (
            {str(k): float(v) for k, v in metrics.items() if _float(v) is not None}
            if isinstance(metrics, dict)
            else {}
        )
        return EvalResult(
            score=float(rec["score"]),
            examples=int(rec.get("examples") or 0),
            total=int(rec.get("total") or 0),
            complete=bool(rec["complete"]),
            metrics=clean,
        )

    def store(
        self,
        evaluator: str,
        subject: str,
        result: EvalResult,
        *,
        label: str = "",
        need: float | None = None,
        strict: bool = False,
    ) -> None:
        """Record ``result`` (and append it to the file right away)."""
        if not result.complete and need is None:
            return  # an early stop without a threshold answers nothing later
        rec: dict[str, Any] = {
            "kind": "score",
            "evaluator": evaluator,
            "subject": subject,
            "label": label,
            "score": result.score,
            "complete": result.complete,
            "examples": result.examples,
            "total": result.total,
            "metrics": {
                k: v
                for k, v in result.metrics.items()
                if not (isinstance(v, float) and math.isnan(v))
            },
            "unix": int(time.time()),
        }
        if not result.complete:
            rec["need"] = need
            rec["strict"] = strict
        self._scores.setdefault((evaluator, subject), []).append({"v": _VERSION, **rec})
        self._append(rec)


def open_cache(cache: ScoreCache | str | os.PathLike[str] | bool | None) -> ScoreCache:
    """``True`` -> the default file, a path -> that file, ``None``/``False`` -> memory only."""
    if isinstance(cache, ScoreCache):
        return cache
    if cache is True:
        return ScoreCache(default_cache_path())
    if cache is None or cache is False:
        return ScoreCache(None)
    return ScoreCache(cache)


def cache_identity(evaluator: object, given: str | None, store: ScoreCache) -> str:
    """An evaluator's identity in ``store``: derived strictly for a persistent cache (see
    `evaluator_identity`); for a memory-only cache any name unique to this object will do
    (nothing outlives the run)."""
    if store.path is not None:
        return evaluator_identity(evaluator, given)
    if given is not None:
        return given
    try:
        return evaluator_identity(evaluator)
    except UsageError:
        name = getattr(evaluator, "__qualname__", None) or type(evaluator).__qualname__
        mod = getattr(evaluator, "__module__", None) or type(evaluator).__module__
        return f"{mod}:{name}#{id(evaluator):x}"
