"""An lm-evaluation-harness evaluator: score a causal LM's candidate weights on lm-eval tasks.

``LMEvalEvaluator(model_dir, ["my_task"], include_path="tasks/")`` builds the model and the
tokenizer once from a local Hugging Face folder; each call loads the candidate's tensors into
it (strictly: every tensor must fit) and runs ``lm_eval.simple_evaluate`` on the tasks. The
score is the mean over the tasks of one metric (``acc`` by default), higher is better.

Tasks may be lm-eval's own (their data must be in the Hugging Face datasets cache when offline)
or defined in local YAML files in ``include_path``, with local data files, so nothing touches
the network::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{label}}"
    metric_list: [{metric: acc}]

Needs the ``lm-eval`` extra (``pip install 'soupkit[lm-eval]'``). The cache identity covers
the settings, the task files in ``include_path`` (and the local data files they name) and the
model folder's config and tokenizer files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit._util.extras import require
from soupkit.errors import EvaluationError
from soupkit.evaluate.builtin import _load_hf, _resolve_dtype, _StateLoader
from soupkit.io.digest import sha256_file

__all__ = ["LMEvalEvaluator"]

_HASHED = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def _lm_eval() -> Any:
    feature = "the lm-eval evaluator (lm-evaluation-harness)"
    lm_eval = require("lm_eval", "lm-eval", feature, EvaluationError)
    require("lm_eval.evaluator", "lm-eval", feature, EvaluationError)
    return lm_eval


class LMEvalEvaluator:
    """Mean of an lm-eval metric over tasks (see the module docstring).

    Args:
        model_dir: a Hugging Face causal-LM folder (config, tokenizer; its weights are replaced by
            each candidate's).
        tasks: lm-eval task names.
        include_path: a folder of task YAML files (local tasks).
        metric: the metric to average (``acc``, ``acc_norm``, ``exact_match``, ...).
        limit: evaluate at most this many documents per task.
        num_fewshot: few-shot examples (default: the task's).
        batch_size: lm-eval's batch size.
        device: ``cpu`` / ``cuda``.
        dtype: the model's dtype.

    Raises:
        EvaluationError: lm-eval is missing, the model folder or a task cannot be loaded.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        tasks: Sequence[str],
        *,
        include_path: str | os.PathLike[str] | None = None,
        metric: str = "acc",
        limit: int | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        lm_eval = _lm_eval()
        HFLM = require("lm_eval.models.huggingface", "lm-eval", "the lm-eval evaluator").HFLM
        TaskManager = require("lm_eval.tasks", "lm-eval", "the lm-eval evaluator").TaskManager

        if not tasks:
            raise EvaluationError("LMEvalEvaluator needs at least one task name")
        self.model_dir, self.tasks, self.metric = Path(model_dir), list(tasks), metric
        self.include_path = Path(include_path).resolve() if include_path is not None else None
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size
        self.model, tokenizer = _load_hf(
            "AutoModelForCausalLM", self.model_dir, device, _resolve_dtype(dtype)
        )
        self._loader = _StateLoader(self.model, self.model_dir)
        local = {p.stem for p in self.include_path.rglob("*.yaml")} if self.include_path else set()
        # Only lm-eval's thousands of built-in task files when a task is not local: indexing them
        # takes seconds.
        self._tasks = TaskManager(
            include_path=str(self.include_path) if self.include_path else None,
            include_defaults=not set(self.tasks) <= local or not local,
        )
        unknown = [t for t in self.tasks if t not in self._tasks.all_tasks]
        if unknown:
            raise EvaluationError(
                f"lm-eval does not know the task(s) {', '.join(unknown)}"
                + (
                    f" (local tasks in {self.include_path}: {', '.join(sorted(local)) or 'none'})"
                    if self.include_path
                    else ""
                )
                + "\nhint: check the names (`task:` in the YAML), or give the folder of local task "
                "YAMLs (--lm-eval-include, include_path=)"
            )
        self._lm = HFLM(
            pretrained=self.model, tokenizer=tokenizer, batch_size=batch_size, device=device
        )
        # simple_evaluate asks git for the working directory's commit on every call (and prints
        # git's complaint outside a repository); a search calls it hundreds of times.
        lm_eval.evaluator.get_git_commit_hash = lambda: None
        self.cache_key = self._identity()

    def _identity(self) -> str:
        files: dict[str, str] = {}
        for name in _HASHED:
            if (self.model_dir / name).is_file():
                files[name] = sha256_file(self.model_dir / name)
        if self.include_path is not None:
            for f in sorted(self.include_path.rglob("*")):
                if f.is_file() and f.stat().st_size < 200_000_000:
                    files[str(f.relative_to(self.include_path))] = sha256_file(f)
                    if f.suffix in (".yaml", ".yml"):  # local data files the task names
                        for line in f.read_text(encoding="utf-8", errors="replace").split():
                            p = Path(line.strip("'\",{}[]"))
                            if p.is_absolute() and p.is_file() and p.stat().st_size < 200_000_000:
                                files[str(p)] = sha256_file(p)
        settings = {
            "tasks": self.tasks,
            "metric": self.metric,
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "files": files,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
        return f"lm-eval|{','.join(self.tasks)}|{self.metric}|{digest}"

    def __repr__(self) -> str:
        return f"LMEvalEvaluator(model_dir={str(self.model_dir)!r}, tasks={self.tasks}, metric={self.metric!r})"

    def results(self, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """lm-eval's per-task results for ``state``."""
        simple_evaluate = _lm_eval().simple_evaluate

        self._loader.load(state)
        out = simple_evaluate(
            model=self._lm,
            tasks=self.tasks,
            task_manager=self._tasks,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        if not out or "results" not in out:
            raise EvaluationError(f"lm-eval returned no results for tasks {self.tasks}")
        return dict(out["results"])

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        """Mean of ``metric`` over the tasks."""
        res = self.results(state)
        scores = []
        for task in self.tasks:
            got = res.get(task, {})
            key = next((k for k in got if k.split(",")[0] == self.metric), None)
            if key is None:
                have = sorted(
                    {
                        k.split(",")[0]
                        for k in got
                        if "," in k and not k.split(",")[0].endswith("_stderr")
                    }
                )
                raise EvaluationError(
                    f"lm-eval task {task!r} has no metric {self.metric!r} (it reports: "
                    f"{', '.join(have) or 'nothing'})\nhint: choose one of those as metric"
                )
            scores.append(float(got[key]))
        return sum(scores) / len(scores)
