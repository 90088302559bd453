"""What a merge method is: a pure tensor function plus a frozen parameter model.

Two kinds keep the arithmetic honest:

- ``kind="tensors"``: ``fn(tensors, p, *, base, rng) -> Tensor`` gets the models' tensors (and
  the base tensor when the method uses one) and returns the merged tensor.
- ``kind="task_vector"``: ``fn(deltas, p, *, rng) -> Tensor`` gets ``deltas[i] = theta_i - base``
  and returns the merged delta; the engine adds it back to the base.

Every tensor a method sees is float32 and every method is free of I/O: it never learns a file
name, a tensor name, a device or a recipe. The engine resolves per-tensor parameter values
before the call, so ``p`` holds plain numbers.

A method that trims by magnitude over *all* tensors of a model at once (TIES with
``trim_scope: global``) declares ``global_trim``: a function of its parameters returning the
per-model densities to trim to (or None). The engine then runs a streaming pre-pass that finds
each model's exact global magnitude cut (`MagnitudeCut`) and passes the cuts for the tensor as
``trim=`` to the method; the method itself stays a pure function of its tensors.

A method whose only whole-tensor step is such a magnitude trim (TIES) declares ``tensor_trim``:
a function of its parameters returning the per-model densities of its per-tensor trim (1 = no
trim). Given the cuts as ``trim=``, the method is elementwise, so the engine computes each
model's exact per-tensor cut in a streaming pre-pass (`soupkit.tensor_trim`) and runs the method
on chunks, with bounded memory; the cuts equal those of `soupkit.methods._ops.topk_cut`.

Exact mode (``compute: exact``, see `soupkit.methods._exact`): the engine hands the method
whole tensors in the recipe's dtype (not float32) and calls ``exact`` instead of ``fn`` when the
method declares one: mergekit 0.1.5's arithmetic op for op. A method whose ``fn`` already is
dtype-generic and mergekit's declares none. ``exact_check`` says (at plan time) why a tensor's
parameters have no mergekit counterpart (e.g. TIES's global trim), so exact mode refuses them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from soupkit.methods._philox import CounterRNG

__all__ = [
    "ExactCheckFn",
    "GlobalTrimFn",
    "MagnitudeCut",
    "MethodFn",
    "MethodSpec",
    "Params",
    "TensorTrimFn",
]

MethodFn = Callable[..., torch.Tensor]
Kind = Literal["tensors", "task_vector"]


@dataclass(frozen=True)
class MagnitudeCut:
    """Which entries of one model's task vector survive a magnitude trim, in one tensor.

    An entry survives when ``|delta| > threshold``; of the entries with ``|delta| == threshold``
    the first ``ties`` in flat (row-major) order survive, or all of them when ``ties`` is None.
    ``threshold = inf`` with ``ties = 0`` keeps nothing. The global pre-pass computes these so
    that exactly ``int(density * N)`` entries survive over all N entries of the model.
    """

    threshold: float
    ties: int | None = None


GlobalTrimFn = Callable[["Params"], "tuple[float, ...] | None"]
ExactCheckFn = Callable[["Params"], "str | None"]
TensorTrimFn = Callable[["Params"], "tuple[float, ...]"]


class Params(BaseModel):
    """Base of every method's parameter model: frozen, unknown keys rejected.

    A subclass lists its *per-model* parameters in ``per_model`` (name -> default value); the
    field for each holds one value per input model, in recipe order. Every other field is a
    global parameter.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_model: ClassVar[Mapping[str, Any]] = {}


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: the function and everything the engine must know about it.

    Attributes:
        name: the recipe name (`merge_method:`), lower case.
        fn: the pure tensor function.
        params: its parameter model (a `Params` subclass).
        kind: ``"tensors"`` or ``"task_vector"`` (see the module docstring).
        paper: link to the paper that defines the method.
        summary: one line for ``soupkit methods``.
        needs_base: the recipe must name a ``base_model``.
        optional_base: the method uses the base when the recipe names one and works without
            it (mergekit's ``BasePolicy.OPTIONAL``: ``nuslerp``, ``multislerp``); it gets
            ``base=None`` when there is none.
        base_as_input: the base is one more input, not an anchor (mergekit's ``karcher`` averages
            every input it is given, base included): the engine lists it among ``tensors`` in
            mergekit's order (where the recipe lists it, else after the models) and passes
            ``base=None``.
        elementwise: output element j depends only on input elements j, so the engine may run
            the method on chunks of a tensor (bounded memory). False for methods with a
            per-tensor statistic (top-k thresholds, norms, angles).
        stochastic: the method draws random numbers; the engine passes its random source,
            seeded from (recipe seed, tensor name): a `CounterRNG` (Philox4x32-10, see
            `soupkit.methods._philox`), or a ``torch.Generator`` that stands for its seed.
        work_per_input: float32 working tensors per input (of the tensor's size) the method
            holds at its peak, copies included; the plan's memory estimate uses it (2 fits
            most methods; those that stack and mask their inputs hold more).
        min_models: fewest input models (not counting the base) the method accepts.
        max_models: most input models, or None for no limit.
        global_trim: for methods that can trim each model's task vector by magnitude over all
            tensors at once: returns the per-model densities when the tensor's parameters ask
            for that (else None); the engine then passes ``trim=`` cuts (see `MagnitudeCut`).
        tensor_trim: for methods that are elementwise once each model's magnitude cut is known:
            returns the per-model densities of the per-tensor trim (1 = none) when the tensor's
            parameters ask for a per-tensor trim, else all 1 (the cut comes from
            ``global_trim`` or there is none). The engine then always passes ``trim=``.
        exact: mergekit 0.1.5's arithmetic for exact mode (same signature as ``fn``), when
            ``fn`` is not already that; None: exact mode calls ``fn``.
        exact_check: for exact mode: the reason a tensor's parameters cannot be computed as
            mergekit does (None when they can).
        exact_out_dtype: for exact mode without ``out_dtype``: the dtype mergekit 0.1.5 writes
            for bfloat16 / float16 inputs when the method's arithmetic promotes them (a float32
            mask or scale: ``arcee_fusion``, ``ramplus_tl``); None: the recipe's dtype.
    """

    name: str
    fn: MethodFn
    params: type[Params]
    kind: Kind
    paper: str
    summary: str
    needs_base: bool = False
    optional_base: bool = False
    base_as_input: bool = False
    elementwise: bool = True
    stochastic: bool = False
    work_per_input: int = 2
    min_models: int = 1
    max_models: int | None = None
    aliases: tuple[str, ...] = field(default=())
    global_trim: GlobalTrimFn | None = None
    tensor_trim: TensorTrimFn | None = None
    exact: MethodFn | None = None
    exact_check: ExactCheckFn | None = None
    exact_out_dtype: str | None = None

    @property
    def streams_whole_tensors(self) -> bool:
        """The engine hands this method whole tensors (not chunks): neither elementwise nor
        elementwise once its per-tensor magnitude cuts are known (``tensor_trim``)."""
        return not self.elementwise and self.tensor_trim is None

    @property
    def per_model_names(self) -> tuple[str, ...]:
        return tuple(self.params.per_model)

    @property
    def global_names(self) -> tuple[str, ...]:
        """Recipe names of the global parameters (a field's alias when it has one: ``lambda``)."""
        return tuple(
            f.alias or n
            for n, f in self.params.model_fields.items()
            if n not in self.params.per_model
        )

    def call(
        self,
        tensors: Sequence[torch.Tensor],
        p: Params,
        *,
        base: torch.Tensor | None = None,
        rng: CounterRNG | torch.Generator | None = None,
        trim: Sequence[MagnitudeCut | None] | None = None,
        exact: bool = False,
    ) -> torch.Tensor:
        """Run the method on float32 tensors and return the merged float32 tensor (with
        ``exact``: mergekit's arithmetic on tensors of any float dtype, result in that dtype).

        For task-vector methods ``tensors`` are the models' tensors: the deltas against
        ``base`` are formed here (in place: a method owns, and may overwrite, the tensors it
        gets), and the merged delta is added back to ``base``. ``trim`` (magnitude cuts, one
        per model) is passed on only when given.
        """
        extra: dict[str, Any] = {} if trim is None else {"trim": trim}
        fn = self.exact if (exact and self.exact is not None) else self.fn
        if self.kind == "task_vector":
            if base is None:
                raise ValueError(f"method {self.name!r} needs a base tensor")
            deltas = [t.sub_(base) for t in tensors]
            merged = fn(deltas, p, rng=rng, **extra)
            return merged.add_(base)
        return fn(tensors, p, base=base, rng=rng, **extra)
