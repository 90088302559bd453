"""Learned soup (Wortsman et al., "Model soups", ICML 2022, Section 3.3 and Appendix): mixing
coefficients trained by gradient descent on held-out labelled data, without holding the
ingredients in memory.

The soup is ``theta_s = sum_k alpha_{k,s} * theta_{k,s}`` for every tensor ``s``, with
``alpha_{:,s} = softmax(beta_{:,s} / T)``: one logit per model (``per_tensor=False``,
``beta_{k,s} = beta_k``) or one per model and tensor (``per_tensor=True``), and an optional fixed
temperature ``T``. The logits start at 0 (the uniform soup) and are trained with AdamW on
``loss_fn(model, batch)``.

**Bounded memory.** The reference implementation keeps all K ingredients in memory so that
autograd can differentiate through the mixture. soupkit does not: by the chain rule,

    dL/d alpha_{k,s} = < dL/d theta_s , theta_{k,s} >

the inner product of the parameter gradient at the current mixture with that ingredient's
tensor. Each step makes two streaming passes over the ingredients, one tensor at a time: the
first writes the mixture into the model's parameters, the second (after ``loss.backward()``)
accumulates the inner products; the small softmax is then differentiated by autograd. Peak
memory is one model, its gradients, and one tensor per ingredient, whatever K is (the operating
system's page cache keeps re-reads cheap when the ingredients fit in RAM).

Mixing runs on the CPU in float32 in the `linear` method's order (``t_0 * a_0``, then
``+= t_k * a_k`` left to right), so the written soup, the engine's `linear` merge with weights
``alpha`` and ``normalize: false`` (per tensor for ``per_tensor=True``), equals the mixture in
the model bit for bit when the model's dtype is float32.

Tensors that get no gradient (buffers such as BatchNorm statistics, frozen parameters) are
mixed with their model's coefficients (``per_tensor=False``) or keep the initial, uniform ones
(``per_tensor=True``); recalibrate BatchNorm afterwards (`recalibrate_bn`). Integer tensors come
from the first checkpoint.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from soupkit import kernels
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.progress import progress_bar
from soupkit.api.merging import MergeResult, linear_recipe, plan
from soupkit.errors import UsageError
from soupkit.evaluate.protocol import Evaluator, run_evaluator
from soupkit.io.checkpoint import Checkpoint
from soupkit.io.header import TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.methods.linear import RunningSum
from soupkit.recipe.schema import MergeConfig, load_recipe
from soupkit.search import report_plot
from soupkit.search._output import finish_search

__all__ = [
    "LearnedSoupResult",
    "StreamingMixture",
    "classification_loss",
    "learned_recipe",
    "learned_soup",
]

PLOT_NAME = "learned-soup.png"
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def classification_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of a classifier on one batch (the built-in learned-soup loss).

    Batches may be ``(inputs, labels)`` (``model(inputs)`` returns logits, or an object with
    ``.logits``) or a mapping of model keyword arguments with a ``labels`` entry (Hugging Face
    style). Inputs are moved to the model's device.
    """
    device = next(model.parameters()).device
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise UsageError(
                "classification_loss: a dictionary batch needs a 'labels' entry; got keys "
                f"{sorted(batch)}\nhint: name the label tensor 'labels' or pass your own loss_fn"
            )
        labels = batch["labels"].to(device)
        out = model(
            **{
                k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()
                if k != "labels"
            }
        )
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, labels = batch
        inputs = inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs
        labels = labels.to(device)
        out = model(inputs)
    else:
        raise UsageError(
            f"classification_loss: cannot read a batch of type {type(batch).__name__}\n"
            "hint: yield (inputs, labels) or a dict with 'labels', or pass your own loss_fn"
        )
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits.float(), labels)


@dataclass
class _Slot:
    """One tensor of the model and the checkpoint names that hold it (tied weights: several)."""

    names: tuple[str, ...]
    target: torch.Tensor
    infos: list[TensorInfo]  # one per ingredient, from the first name of the group the files hold
    is_float: bool
    learnable: bool
    column: int = -1


class StreamingMixture:
    """K checkpoints mixed into ``model`` with softmax coefficients, streamed from the files.

    Args:
        checkpoints: the ingredients (files or folders of one architecture).
        model: a module whose state dict names match the checkpoints' tensor names.
        per_tensor: one coefficient per model and tensor (else one per model).
        temperature: softmax temperature ``T``.

    Attributes:
        logits: the trainable logits, shape ``[K]`` or ``[K, S]`` for S float tensors.
        labels: the ingredients as given.
        checkpoints: the opened checkpoints.

    Raises:
        UsageError: the model and the checkpoints do not match (every difference listed).
        PlanError: the checkpoints cannot be averaged.
    """

    def __init__(
        self,
        checkpoints: Sequence[str | os.PathLike[str]],
        model: torch.nn.Module,
        *,
        per_tensor: bool = False,
        temperature: float = 1.0,
    ) -> None:
        if temperature <= 0:
            raise UsageError(f"temperature must be positive, got {temperature}")
        self.labels = [str(c) for c in checkpoints]
        if len(self.labels) < 2:
            raise UsageError(f"a learned soup mixes at least 2 checkpoints, got {len(self.labels)}")
        self.checkpoints: list[Checkpoint] = list(plan(linear_recipe(self.labels)).models)
        self.model = model
        self.per_tensor = per_tensor
        self.temperature = float(temperature)
        self.slots = self._match(model)
        float_slots = [s for s in self.slots if s.is_float]
        for i, s in enumerate(float_slots):
            s.column = i
        k = len(self.checkpoints)
        shape = (k, len(float_slots)) if per_tensor else (k,)
        self.logits = torch.zeros(shape, dtype=torch.float32, requires_grad=True)
        self.reader = TensorReader()
        # the mixture's sums on the native kernels where they apply (same bytes), else torch
        self._ops = kernels.running_sum_ops()

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> StreamingMixture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _match(self, model: torch.nn.Module) -> list[_Slot]:
        state = model.state_dict(keep_vars=True)
        params = {id(p) for p in model.parameters() if p.requires_grad}
        groups: dict[int, list[str]] = {}
        for name, t in state.items():
            groups.setdefault(id(t), []).append(name)
        ref = self.checkpoints[0].tensors
        problems: list[str] = []
        slots: list[_Slot] = []
        covered: set[str] = set()
        for key, names in groups.items():
            held = [n for n in names if n in ref]
            if not held:
                problems.append(f"model tensor {names[0]!r} is in no checkpoint")
                continue
            covered |= set(held)
            t = state[names[0]]
            info = ref[held[0]]
            if tuple(t.shape) != info.shape:
                problems.append(
                    f"{held[0]!r}: the model has shape {list(t.shape)}, the checkpoints {list(info.shape)}"
                )
                continue
            if t.is_floating_point() != info.is_float:
                problems.append(
                    f"{held[0]!r}: the model's dtype is {t.dtype}, the checkpoints' {info.dtype}"
                )
                continue
            slots.append(
                _Slot(
                    tuple(held),
                    t,
                    [c.tensors[held[0]] for c in self.checkpoints],
                    info.is_float,
                    key in params and info.is_float,
                )
            )
        extra = [n for n in ref if n not in covered]
        if extra:
            problems.append(
                f"{len(extra)} checkpoint tensor(s) are not in the model: "
                + ", ".join(repr(n) for n in extra[:8])
                + (" ..." if len(extra) > 8 else "")
            )
        if problems:
            raise UsageError(
                "the model does not match the checkpoints:\n"
                + "\n".join(f"  - {p}" for p in problems[:30])
                + "\nhint: build the model with the checkpoints' architecture and tensor names"
            )
        if not any(s.learnable for s in slots):
            raise UsageError(
                "the model has no trainable parameter that the checkpoints hold\n"
                "hint: make sure the parameters require gradients"
            )
        return slots

    def coefficients(self) -> torch.Tensor:
        """The current coefficients ``softmax(logits / T)`` over models (detached)."""
        with torch.no_grad():
            return torch.softmax(self.logits / self.temperature, dim=0)

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self.reader.read(info).reshape(info.shape).to(torch.float32)

    def _weights(self, alpha: torch.Tensor, slot: _Slot) -> torch.Tensor:
        return alpha[:, slot.column] if self.per_tensor else alpha

    def load(self, alpha: torch.Tensor | None = None) -> None:
        """Write the mixture with coefficients ``alpha`` (default: current) into the model.

        Streams every ingredient once, one tensor at a time.
        """
        a = (self.coefficients() if alpha is None else alpha).to(torch.float32)
        with torch.no_grad():
            for slot in self.slots:
                if not slot.is_float:
                    slot.target.copy_(self.reader.read(slot.infos[0]).reshape(slot.target.shape))
                    continue
                w = self._weights(a, slot)
                # `linear`'s operations (RunningSum), on a fresh product (the read may be shared)
                acc = RunningSum.scaled(self._raw(slot.infos[0]), w[0], self._ops)
                for info, wk in zip(slot.infos[1:], w[1:]):
                    RunningSum.step_any(acc, self._raw(info), wk, self._ops)
                slot.target.copy_(acc)
                del acc

    def _raw(self, info: TensorInfo) -> torch.Tensor:
        """Tensor ``info`` as stored (the running sum converts it)."""
        return self.reader.read(info).reshape(info.shape)

    def alpha_gradient(self) -> torch.Tensor:
        """``dL/dalpha`` from the gradients now in the model (after ``loss.backward()``).

        Returns:
            ``[K]`` (per model) or ``[K, S]`` (per tensor), float64.
        """
        k = len(self.checkpoints)
        s = self.logits.shape[1] if self.per_tensor else 0
        g_alpha = torch.zeros((k, s) if self.per_tensor else (k,), dtype=torch.float64)
        for slot in self.slots:
            if not slot.learnable or slot.target.grad is None:
                continue
            g = slot.target.grad.detach().to("cpu", torch.float32).reshape(-1)
            for j, info in enumerate(slot.infos):
                dot = torch.dot(g, self._read(info).reshape(-1)).to(torch.float64)
                if self.per_tensor:
                    g_alpha[j, slot.column] += dot
                else:
                    g_alpha[j] += dot
        return g_alpha

    def gradient(self, loss_fn: LossFn, batch: Any) -> tuple[float, torch.Tensor]:
        """Loss and ``dL/dlogits`` at the current logits, for one batch.

        Loads the mixture, runs ``loss_fn(model, batch).backward()``, streams the inner products
        and backpropagates them through the softmax.

        Returns:
            ``(loss, gradient)``; the gradient has the shape of ``logits``.
        """
        self.load()
        self.model.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UsageError(
                f"loss_fn returned {type(loss).__name__}"
                f"{' of shape ' + str(list(loss.shape)) if isinstance(loss, torch.Tensor) else ''}; "
                "expected a scalar tensor\nhint: return e.g. F.cross_entropy(logits, labels)"
            )
        if not torch.isfinite(loss.detach()):
            raise UsageError(
                f"the loss is {loss.item()} at coefficients {self.coefficients().tolist()}\n"
                "hint: lower the learning rate or check the data"
            )
        torch.autograd.backward([loss])
        g_alpha = self.alpha_gradient()
        logits = self.logits.detach().requires_grad_(True)
        alpha = torch.softmax(logits / self.temperature, dim=0)
        (grad,) = torch.autograd.grad(alpha, logits, g_alpha.to(torch.float32))
        self.model.zero_grad(set_to_none=True)
        return float(loss.detach()), grad

    def recipe(self) -> MergeConfig:
        """The `linear` recipe of the current coefficients (see `learned_recipe`)."""
        return learned_recipe(
            self.labels, self.coefficients(), self.slots if self.per_tensor else None
        )

    def state(self) -> dict[str, torch.Tensor]:
        """The model's current tensors under every checkpoint name (tied names share one)."""
        return {n: s.target.detach() for s in self.slots for n in s.names}


def learned_recipe(
    labels: Sequence[str], alpha: torch.Tensor, slots: Sequence[_Slot] | None = None
) -> MergeConfig:
    """A `linear` recipe (``normalize: false``) with the learned coefficients as weights.

    Per-tensor coefficients become one ``{match: NAME, value: w}`` entry per tensor (names
    glob-escaped), so the engine applies exactly the learned weight to each tensor.
    """
    models: list[dict[str, Any]] = []
    for k, lab in enumerate(labels):
        if slots is None:
            weight: Any = float(alpha[k])
        else:
            weight = [
                {"match": glob.escape(n), "value": float(alpha[k, s.column])}
                for s in slots
                if s.is_float
                for n in s.names
            ]
        models.append({"model": lab, "parameters": {"weight": weight}})
    return load_recipe(
        {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    )


@dataclass(frozen=True)
class LearnedSoupResult:
    """What `learned_soup` learned.

    Attributes:
        ingredients: the checkpoints, as given.
        coefficients: ``[K]`` per model, or ``[K][S]`` per model and tensor.
        tensor_names: for per-tensor coefficients, the tensor of each column.
        losses: the training loss at every step (before that step's update).
        coefficient_history: per step (and after the last), each model's coefficient (per-tensor:
            its mean over tensors).
        recipe: the `linear` recipe that reproduces the soup.
        score: the evaluator's score of the learned soup; ``uniform_score`` of the uniform soup
            it started from (when an evaluator was given).
        out, merge, plot: the written folder, the engine's result, the PNG.
    """

    ingredients: list[str]
    coefficients: list[float] | list[list[float]]
    tensor_names: list[str] | None
    losses: list[float]
    coefficient_history: list[list[float]]
    steps: int
    lr: float
    temperature: float
    per_tensor: bool
    recipe: MergeConfig
    score: float | None = None
    uniform_score: float | None = None
    out: Path | None = None
    merge: MergeResult | None = field(default=None, repr=False)
    plot: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record written under ``"learned"`` in ``soupkit-report.json``."""
        return {
            "paper": "https://arxiv.org/abs/2203.05482",
            "ingredients": list(self.ingredients),
            "per_tensor": self.per_tensor,
            "temperature": self.temperature,
            "steps": self.steps,
            "lr": self.lr,
            "coefficients": self.coefficients,
            "tensor_names": self.tensor_names,
            "losses": self.losses,
            "coefficient_history": self.coefficient_history,
            "score": self.score,
            "uniform_score": self.uniform_score,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise UsageError(
                "the learned-soup data yielded no batch\nhint: give held-out labelled batches"
            )
        if iter(data) is data:
            raise UsageError(
                "the learned-soup data is a one-shot iterator and ran out before the last step\n"
                "hint: pass a re-iterable (a list or a DataLoader) or fewer steps"
            )


def learned_soup(
    checkpoints: Sequence[str | os.PathLike[str]],
    data: Iterable[Any],
    out: str | os.PathLike[str] | None = None,
    *,
    model: torch.nn.Module | None = None,
    model_fn: Callable[[], torch.nn.Module] | None = None,
    loss_fn: LossFn = classification_loss,
    steps: int = 100,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    per_tensor: bool = False,
    temperature: float = 1.0,
    evaluator: Evaluator | None = None,
    recalibrate_bn_data: Iterable[Any] | None = None,
    force: bool = False,
    progress: bool | None = None,
    plot: bool = True,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    report_extra: Mapping[str, Any] | None = None,
) -> LearnedSoupResult:
    """Learn mixing coefficients of ``checkpoints`` on held-out labelled ``data`` (see module docs).

    Args:
        checkpoints: the ingredients (at least 2).
        data: held-out labelled batches, re-iterable (a list or a DataLoader); cycled for
            ``steps`` steps.
        out: write the learned soup here (with report and plot).
        model: the architecture, with parameters named like the checkpoints' tensors; it ends up
            holding the learned soup. Its own weights are overwritten.
        model_fn: builds the model instead (exactly one of ``model`` / ``model_fn``).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default `classification_loss`.
        steps: optimisation steps (one batch each).
        lr: AdamW learning rate on the logits.
        weight_decay: AdamW weight decay on the logits (pulls towards the uniform soup).
        per_tensor: one coefficient per model and tensor, else one per model.
        temperature: softmax temperature.
        evaluator: if given, score the learned soup and the uniform soup it started from.
        recalibrate_bn_data: if given, recompute BatchNorm statistics of the learned soup on
            these batches before writing (see `recalibrate_bn`).
        force: replace a non-empty ``out``.
        progress: show a progress bar (default: when stderr is a terminal).
        plot: write the PNG plot (needs matplotlib).
        max_shard_size: largest output shard.
        report_extra: more entries for the report.

    Returns:
        A `LearnedSoupResult`; the model holds the learned soup.
    """
    t0 = time.perf_counter()
    if (model is None) == (model_fn is None):
        raise UsageError("give exactly one of model= and model_fn=")
    if steps < 0 or lr <= 0:
        raise UsageError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    net = model if model is not None else model_fn()  # type: ignore[misc]
    with StreamingMixture(checkpoints, net, per_tensor=per_tensor, temperature=temperature) as mix:
        uniform_score = None
        if evaluator is not None:
            mix.load()
            uniform_score = run_evaluator(
                evaluator, mix.state(), label="uniform soup (learned-soup start)"
            ).score
        opt = torch.optim.AdamW([mix.logits], lr=lr, weight_decay=weight_decay)
        losses: list[float] = []
        history: list[list[float]] = [_summary(mix.coefficients(), per_tensor)]
        batches = _cycle(data)
        bar = progress_bar(steps, progress, "learned soup")
        try:
            for _ in range(steps):
                loss, grad = mix.gradient(loss_fn, next(batches))
                mix.logits.grad = grad
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss)
                history.append(_summary(mix.coefficients(), per_tensor))
                bar.set_postfix(loss=f"{loss:.4g}")
                bar.update(1)
        finally:
            bar.close()
        mix.load()
        alpha = mix.coefficients()
        score = None
        if evaluator is not None:
            score = run_evaluator(evaluator, mix.state(), label="learned soup").score
        recipe = mix.recipe()
        float_slots = [s for s in mix.slots if s.is_float]
        result = LearnedSoupResult(
            ingredients=list(mix.labels),
            coefficients=alpha.tolist(),
            tensor_names=[s.names[0] for s in float_slots] if per_tensor else None,
            losses=losses,
            coefficient_history=history,
            steps=steps,
            lr=lr,
            temperature=float(temperature),
            per_tensor=per_tensor,
            recipe=recipe,
            score=score,
            uniform_score=uniform_score,
        )
    return finish_search(
        result,
        out,
        lambda: plan(result.recipe, max_shard_size=max_shard_size),
        "learned",
        report_plot.learned_plot,
        PLOT_NAME,
        t0=t0,
        force=force,
        progress=progress,
        plot=plot,
        max_shard_size=max_shard_size,
        report_extra=report_extra,
        recalibrate=(net, recalibrate_bn_data) if recalibrate_bn_data is not None else None,
    )


def _summary(alpha: torch.Tensor, per_tensor: bool) -> list[float]:
    return (alpha.mean(dim=1) if per_tensor else alpha).tolist()
