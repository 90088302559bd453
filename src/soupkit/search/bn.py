"""BatchNorm recalibration: recompute running statistics of a soup on data.

Averaging weights averages BatchNorm's running mean and variance too, and those averages do not
describe the activations of the averaged network. Convolutional soups therefore recompute them
with a pass over training-like data (as SWA does, Izmailov et al., 2018; model soups Appendix).

`recalibrate_bn` is `torch.optim.swa_utils.update_bn` with three differences: it runs without
autograd, it also accepts dictionary batches (``model(**batch)`` without a ``labels`` entry), and
it can stop after ``max_batches``. `write_recalibrated` merges a plan in memory, recalibrates it
in the user's model and writes the result atomically, carrying config/tokenizer files like the
engine does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit.api.merging import MergeResult, run_merge_plan
from soupkit.engine import MemorySink, run_plan
from soupkit.errors import UsageError
from soupkit.io.checkpoint import in_memory_checkpoint
from soupkit.planning.plan import MergePlan, make_plan
from soupkit.recipe.schema import load_recipe

__all__ = ["bn_buffer_names", "recalibrate_bn", "write_recalibrated"]


def _forward(model: torch.nn.Module, batch: Any, device: torch.device | str | None) -> None:
    if isinstance(batch, Mapping):
        inputs = {
            k: (v.to(device) if device is not None and isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()
            if k not in ("labels", "label")
        }
        model(**inputs)
        return
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if device is not None and isinstance(batch, torch.Tensor):
        batch = batch.to(device)
    model(batch)


def recalibrate_bn(
    model: torch.nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> int:
    """Reset every BatchNorm layer's running statistics and recompute them on ``loader``.

    Each layer's statistics become the plain average over the batches (momentum ``None``
    during the pass, restored afterwards); the model is run in train mode without gradients and
    left in the mode it was in. Same result as `torch.optim.swa_utils.update_bn`.

    Args:
        model: the network (holding the soup's weights).
        loader: batches: a tensor, a ``(inputs, targets)`` tuple/list (the first item is used),
            or a mapping of model keyword arguments (``labels`` is dropped).
        device: move inputs to this device first.
        max_batches: stop after this many batches.

    Returns:
        The number of batches used (0 if the model has no BatchNorm layer).

    Raises:
        UsageError: the loader yielded no batch.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not layers:
        return 0
    momenta = {}
    for m in layers:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None
    was_training = model.training
    model.train()
    n = 0
    try:
        with torch.no_grad():
            for batch in loader:
                if max_batches is not None and n >= max_batches:
                    break
                _forward(model, batch, device)
                n += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    if n == 0:
        raise UsageError(
            "BatchNorm recalibration got no batch from the data loader\n"
            "hint: give a loader over (a sample of) the training data"
        )
    return n


def bn_buffer_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of every BatchNorm running statistic (mean, var, batch count)."""
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(m, b, None) is not None:
                    names.append(f"{prefix}.{b}" if prefix else b)
    return names


def write_recalibrated(
    p: MergePlan,
    out: str | os.PathLike[str],
    model: torch.nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    force: bool = False,
    progress: bool | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    extra_report: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> MergeResult:
    """Merge ``p`` in memory, recalibrate BatchNorm in ``model``, and write the result to ``out``.

    Every tensor is the merge's, bit for bit, except the BatchNorm running statistics, which
    are the recalibrated ones (cast to the merge's dtype). The report records the merge's recipe
    under ``"soup_recipe"`` and the recalibration under ``"bn_recalibration"``.

    Raises:
        UsageError: the model's tensors do not match the merge's (all differences listed).
    """
    sink = MemorySink(p)
    run_plan(p, sink)
    state = sink.tensors
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UsageError(
            "the model for BatchNorm recalibration does not match the soup:\n"
            + (f"  missing from the soup: {', '.join(missing[:10])}\n" if missing else "")
            + (f"  not in the model: {', '.join(unexpected[:10])}\n" if unexpected else "")
            + "hint: give the architecture the checkpoints were trained with"
        )
    model.load_state_dict(state, strict=True)
    batches = recalibrate_bn(model, loader, device=device, max_batches=max_batches)
    names = bn_buffer_names(model)
    after = model.state_dict()
    for n in names:
        state[n] = after[n].detach().to("cpu", state[n].dtype).clone()
    carry = p.carry_from
    cfg = load_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": "<recalibrated soup>"}],
            **({"tokenizer_source": str(carry)} if carry is not None else {}),
        }
    )
    one = make_plan(
        cfg, [in_memory_checkpoint(state, "recalibrated soup")], None, max_shard_size=max_shard_size
    )
    report = {
        "soup_recipe": p.config.model_dump(mode="json", exclude_none=True),
        "bn_recalibration": {
            "batches": batches,
            "tensors": names,
            "note": "every other tensor is the soup recipe's merge, bit for bit",
        },
        **dict(extra_report or {}),
    }
    return run_merge_plan(
        one,
        Path(out),
        force=force,
        progress=progress,
        model_card=False,
        extra_report=report,
        extra_files=extra_files,
    )
