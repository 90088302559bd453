"""Task vectors as lazy values: add, negate, scale, analogies; evaluated tensor by tensor.

    tau = theta_finetuned - theta_base                       TaskVector.from_checkpoints(ft, base)
    tau_a + tau_b,  -tau,  0.5 * tau,  tau_a - tau_b + tau_c  (analogy)
    theta = theta_target + scale * tau                       tau.apply_to(target, out_dir, scale=...)

Ilharco et al., "Editing models with task arithmetic", ICLR 2023, https://arxiv.org/abs/2212.04089.

A `TaskVector` never holds tensors. It is a linear combination ``sum_j c_j * theta_j`` of
checkpoints (files, folders or in-memory state dicts) whose coefficients sum to zero; the
algebra only combines coefficients (the same checkpoint, even under another path, is one term,
and terms that cancel disappear). Applying it compiles to the `task_arithmetic` recipe

    base_model: target;  models: [theta_j with weight c_j];  parameters: {lambda: scale}

which equals ``target + scale * sum_j c_j (theta_j - target)`` = ``target + scale * tau``
because the coefficients sum to zero; the target's own term drops out. The streaming engine
runs it tensor by tensor with bounded memory, so `apply_to` is bit for bit
``soupkit.merge(tau.to_recipe(target, scale=...))``. `state_dict` evaluates the delta itself
(float32, tensor by tensor, for small models): ``sum_j c_j * theta_j`` left to right.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, Union

import torch

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit.api.merging import MergeResult, run_merge_plan
from soupkit.engine import MemorySink, run_plan
from soupkit.errors import UsageError
from soupkit.io.checkpoint import Checkpoint, in_memory_checkpoint, open_checkpoint
from soupkit.io.reader import TensorReader
from soupkit.planning.plan import MergePlan, make_plan
from soupkit.recipe.schema import MergeConfig

__all__ = ["ModelLike", "TaskVector"]

ModelLike = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class _Source:
    """One checkpoint a task vector refers to."""

    key: tuple[Any, ...]
    label: str
    checkpoint: Checkpoint
    path: str | None  # as given, for recipes; None for an in-memory state dict
    state: Mapping[str, torch.Tensor] | None = None  # keeps an in-memory state dict alive


def _source(model: ModelLike | _Source, allow_pickle: bool = False) -> _Source:
    if isinstance(model, _Source):
        return model
    if isinstance(model, Mapping):
        label = f"<state_dict {id(model):#x}>"
        return _Source(
            ("memory", id(model)), label, in_memory_checkpoint(model, label), None, model
        )
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError(
            f"a task vector's model is a path or a state dict, got {type(model).__name__}"
        )
    kwargs: dict[str, Any] = {"allow_pickle": True} if allow_pickle else {}
    ck = open_checkpoint(model, **kwargs)
    # The same files under another name (symlink, hard link, "./x" vs "x") are one term.
    key = ("files", *sorted((st.st_dev, st.st_ino) for st in (os.stat(f) for f in ck.files)))
    return _Source(key, str(model), ck, str(model))


def _is_scalar(x: object) -> TypeGuard[numbers.Real]:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class TaskVector:
    """A lazy task vector: a zero-sum linear combination of checkpoints (see the module docs).

    Build one with `from_checkpoints`, combine with ``+``, ``-``, unary ``-``, ``*`` and ``/`` by
    a number, or `analogy`; then `apply_to` a model (streaming, to a folder),
    `apply_to_state_dict` (in memory), `to_recipe`, or `state_dict` (the delta itself).

    Example::

        math = TaskVector.from_checkpoints("ft-math", "base")
        toxic = TaskVector.from_checkpoints("ft-toxic", "base")
        (math - 0.5 * toxic).apply_to("base", "out/edited", scale=0.8)
    """

    __slots__ = ("_terms",)

    def __init__(self, terms: Mapping[tuple[Any, ...], tuple[_Source, float]]) -> None:
        self._terms = {k: (s, c) for k, (s, c) in terms.items() if c != 0}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoints(
        cls, finetuned: ModelLike, base: ModelLike, *, allow_pickle: bool = False
    ) -> TaskVector:
        """``finetuned - base``; each is a checkpoint path (file or folder) or a state dict.

        Headers are read and validated now; tensors are read only when the vector is applied.
        """
        ft, b = _source(finetuned, allow_pickle), _source(base, allow_pickle)
        return cls({ft.key: (ft, 1.0)}) + cls({b.key: (b, -1.0)})

    @staticmethod
    def analogy(a: TaskVector, b: TaskVector, c: TaskVector) -> TaskVector:
        """``a - b + c`` ("a is to b as c is to ?", Ilharco et al. section 5)."""
        return a - b + c

    # ------------------------------------------------------------------ algebra

    def _combine(self, other: TaskVector, sign: float) -> TaskVector:
        terms = dict(self._terms)
        for k, (s, c) in other._terms.items():
            prev = terms.get(k)
            terms[k] = (s, (prev[1] if prev else 0.0) + sign * c)
        return TaskVector(terms)

    def __add__(self, other: object) -> TaskVector:
        if isinstance(other, TaskVector):
            return self._combine(other, 1.0)
        if _is_scalar(other) and other == 0:  # so that sum(vectors) works
            return self
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other: object) -> TaskVector:
        if isinstance(other, TaskVector):
            return self._combine(other, -1.0)
        return NotImplemented

    def __neg__(self) -> TaskVector:
        return TaskVector({k: (s, -c) for k, (s, c) in self._terms.items()})

    def __mul__(self, k: object) -> TaskVector:
        if not _is_scalar(k):
            return NotImplemented
        return TaskVector({key: (s, c * float(k)) for key, (s, c) in self._terms.items()})

    __rmul__ = __mul__

    def __truediv__(self, k: object) -> TaskVector:
        if not _is_scalar(k):
            return NotImplemented
        if k == 0:
            raise ZeroDivisionError("task vector divided by zero")
        return self.__mul__(1.0 / float(k))

    @property
    def terms(self) -> list[tuple[str, float]]:
        """``(label, coefficient)`` of every checkpoint the vector combines, in first-use order."""
        return [(s.label, c) for s, c in self._terms.values()]

    def __repr__(self) -> str:
        parts = [f"{'-' if c < 0 else '+'} {abs(c):g}*{s.label}" for s, c in self._terms.values()]
        return f"TaskVector({' '.join(parts).lstrip('+ ') or '0'})"

    # ------------------------------------------------------------------ evaluation

    def _compile(
        self, target: _Source, scale: float, out_dtype: str | None
    ) -> tuple[MergeConfig, list[Checkpoint], Checkpoint]:
        if not _is_scalar(scale):
            raise UsageError(f"scale must be a number, got {type(scale).__name__}")
        entries = [(s, c) for s, c in self._terms.values() if s.key != target.key]
        if not entries:
            raise UsageError(
                "this task vector is zero (its terms cancel out); applying it would "
                "only copy the model\nhint: check the signs of the combination"
            )
        data: dict[str, Any] = {
            "merge_method": "task_arithmetic",
            "base_model": target.path if target.path is not None else target.label,
            "models": [
                {
                    "model": s.path if s.path is not None else s.label,
                    "parameters": {"weight": float(c)},
                }
                for s, c in entries
            ],
            "parameters": {"lambda": float(scale)},
        }
        if out_dtype is not None:
            data["out_dtype"] = out_dtype
        return (
            MergeConfig.model_validate(data),
            [s.checkpoint for s, _ in entries],
            target.checkpoint,
        )

    def to_recipe(
        self, target: str | os.PathLike[str], *, scale: float = 1.0, out_dtype: str | None = None
    ) -> MergeConfig:
        """The `task_arithmetic` recipe that applies this vector to ``target`` (paths only).

        Raises:
            UsageError: a term is an in-memory state dict (a recipe names files).
        """
        mem = [s.label for s, _ in self._terms.values() if s.path is None]
        if mem:
            raise UsageError(
                f"terms {', '.join(mem)} are in-memory state dicts, which a recipe "
                "cannot name\nhint: use apply_to / apply_to_state_dict instead"
            )
        cfg, _, _ = self._compile(_source(target), scale, out_dtype)
        return cfg

    def plan(
        self,
        target: ModelLike,
        *,
        scale: float = 1.0,
        out_dtype: str | None = None,
        **plan_options: Any,
    ) -> MergePlan:
        """The merge plan of ``target + scale * self`` (headers only; a dry run)."""
        cfg, models, base = self._compile(_source(target), scale, out_dtype)
        return make_plan(cfg, models, base, **plan_options)

    def apply_to(
        self,
        target: ModelLike,
        out_dir: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        out_dtype: str | None = None,
        max_shard_size: int | str = MAX_SHARD_SIZE,
        **merge_options: Any,
    ) -> MergeResult:
        """Write ``target + scale * self`` to ``out_dir`` (streaming, tensor by tensor).

        Args:
            target: the model to edit (usually the base the vectors were taken from).
            out_dir: the output folder.
            scale: the paper's lambda.
            out_dtype: output dtype (default: the target's).
            max_shard_size: largest output shard.
            **merge_options: passed to `soupkit.api.merging.run_merge_plan` (``force``, ``progress``, ...).
        """
        p = self.plan(target, scale=scale, out_dtype=out_dtype, max_shard_size=max_shard_size)
        return run_merge_plan(p, out_dir, **merge_options)

    def apply_to_state_dict(
        self, target: ModelLike, *, scale: float = 1.0, out_dtype: str | None = None
    ) -> dict[str, torch.Tensor]:
        """``target + scale * self`` as an in-memory state dict (same bytes as `apply_to`)."""
        p = self.plan(target, scale=scale, out_dtype=out_dtype)
        sink = MemorySink(p)
        run_plan(p, sink)
        return sink.tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The task vector itself, ``sum_j c_j * theta_j`` in float32, for each float tensor.

        Reads one tensor of every term at a time; the result is as large as one model in
        float32, so this is for small models. Integer buffers are left out.
        """
        terms = list(self._terms.values())
        if not terms:
            return {}
        ref = terms[0][0]
        # A plan with the first term as "base" checks names and shapes; dtype: float32 lets
        # terms of different dtypes combine (every term is read as float32 anyway).
        cfg = MergeConfig.model_validate(
            {
                "merge_method": "task_arithmetic",
                "base_model": ref.label,
                "dtype": "float32",
                "models": [{"model": s.label} for s, _ in terms[1:]],
            }
        )
        p = make_plan(cfg, [s.checkpoint for s, _ in terms[1:]], ref.checkpoint)
        coeffs = [torch.tensor(c, dtype=torch.float32) for _, c in terms]
        out: dict[str, torch.Tensor] = {}
        with TensorReader() as reader, torch.inference_mode():
            for job in p.jobs:
                if job.is_copy or job.base is None:
                    continue
                infos = [job.base, *job.inputs][: len(terms)]
                acc = reader.read(infos[0]).to(torch.float32) * coeffs[0]
                for info, c in zip(infos[1:], coeffs[1:]):
                    acc += reader.read(info).to(torch.float32) * c
                out[job.name] = acc.view(job.shape)
        return out
