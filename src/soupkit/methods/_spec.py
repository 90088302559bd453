"""What a merge method is: a pure tensor function plus a frozen parameter model.

Two kinds keep the arithmetic honest:

- ``kind="tensors"``: ``fn(tensors, p, *, base, rng) -> Tensor`` gets the models' tensors (and
  the base tensor when the method uses one) and returns the merged tensor.
- ``kind="task_vector"``: ``fn(deltas, p, *, rng) -> Tensor`` gets ``deltas[i] = theta_i - base``
  and returns the merged delta; the engine adds it back to the base.

Every tensor a method sees is float32 and every method is free of I/O: it never learns a file
name, a tensor name, a device or a recipe. The engine resolves per-tensor parameter values
before the call, so ``p`` holds plain numbers.

A method that needs a statistic of a whole tensor (or of all tensors of a model) before it can
stream, such as TIES's top-k magnitude threshold, declares it as a `Prepass` on its spec: what
to accumulate over the chunks of the deltas, and how the statistic is handed out, piece by piece,
to the method, which is then elementwise. The engine runs any such declaration generically
(`soupkit.engine.prepass`); the method stays a pure function of its tensors, and adding one
touches only its own module.

Exact mode (``compute: exact``, see `soupkit.methods._exact`): the engine hands the method
whole tensors in the recipe's dtype (not float32) and calls ``exact`` instead of ``fn`` when the
method declares one: mergekit 0.1.5's arithmetic op for op. A method whose ``fn`` already is
dtype-generic and mergekit's declares none. ``exact_check`` says (at plan time) why a tensor's
parameters have no mergekit counterpart (e.g. TIES's global trim), so exact mode refuses them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict

from soupkit.methods._philox import CounterRNG

__all__ = [
    "Accumulator",
    "CountedStat",
    "ExactCheckFn",
    "MethodFn",
    "MethodSpec",
    "Params",
    "Prepass",
    "Scope",
    "TensorStat",
]

MethodFn = Callable[..., torch.Tensor]
Kind = Literal["tensors", "task_vector"]


ExactCheckFn = Callable[["Params"], "str | None"]
Scope = Literal["tensor", "global"]


class TensorStat(Protocol):
    """A finished statistic of one tensor, handed to the method piece by piece."""

    def piece(self, xs: Sequence[torch.Tensor], base: torch.Tensor | None) -> Any:
        """The method's ``stat=`` argument for the next piece (pieces come in flat order), from
        the piece's model tensors ``xs`` and ``base`` (read only): float32, or their stored
        dtype when a native kernel computes the piece (convert with ``.float()``)."""
        ...


@runtime_checkable
class CountedStat(TensorStat, Protocol):
    """A `TensorStat` whose hand-out splits into a count of each piece, which changes nothing
    (so the engine counts a unit's pieces on several threads) and a cheap hand-out in flat
    order from those counts; ``piece(xs, base)`` is ``piece_counted(count(xs, base))``."""

    def count(
        self,
        xs: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        equal: Callable[[torch.Tensor, torch.Tensor, float], int] | None = None,
    ) -> Any:
        """What the piece's hand-out needs, counted (``equal(x, base, t)``: how many entries
        have ``|x - base| == t``; None: torch counts)."""
        ...

    def piece_counted(self, counts: Any) -> Any:
        """The method's ``stat=`` argument for the next piece (flat order), from its count."""
        ...


class Accumulator(Protocol):
    """Accumulates a statistic over chunks of the deltas, in passes (pure tensor code).

    The engine calls, for each pass ``step`` the accumulator `wants`: `add` for every chunk of
    every tensor in scope (``part``: the tensor's position in the scope, name order; 0 for a
    per-tensor scope), then `end_pass`. Compute threads each count into a `fork`, added back
    with `join` (the result must not depend on how chunks were shared). `result` gives the
    statistic of one tensor.
    """

    @property
    def models(self) -> tuple[int, ...]:
        """The models whose deltas are accumulated (empty: nothing to read)."""
        ...

    def wants(self, step: int) -> bool: ...

    def add(self, step: int, part: int, observed: Mapping[int, torch.Tensor]) -> None:
        """Accumulate one chunk: ``observed[i]`` is `Prepass.observe` of model i's delta."""
        ...

    def end_pass(self, step: int) -> None: ...

    def fork(self) -> Any: ...

    def join(self, part: Any) -> None: ...

    def result(self, part: int) -> TensorStat: ...


@dataclass(frozen=True)
class Prepass:
    """A statistic a method needs before streaming: declared on its spec, run by the engine.

    Attributes:
        scope: for a tensor's parameters: ``"tensor"`` (a statistic of that tensor),
            ``"global"`` (one statistic over every tensor whose parameters say global, in name
            order), or None (these parameters need none: the method is then elementwise and
            gets ``stat=None``).
        start: a new `Accumulator`, from the parameters and the number of entries in scope.
        passes: for the parameters, the most passes over the deltas the accumulator asks for
            (a per-tensor scope reads the tensor that many times before merging it).
        observe: what of a float32 delta chunk is accumulated (it may overwrite the chunk,
            which is scratch); accumulators with the same ``observe`` share one computation.
        check: for ``global`` scope, at plan time: the problem (or None) with the (tensor
            name, parameters) of every tensor in scope, e.g. parameters that must agree.
        note: what ``soupkit plan`` says about a global pre-pass (``{n}``: tensors in scope).
    """

    scope: Callable[[Any], Scope | None]
    start: Callable[[Any, int], Accumulator]
    passes: Callable[[Any], int]
    observe: Callable[[torch.Tensor], torch.Tensor]
    check: Callable[[Sequence[tuple[str, Any]]], str | None] | None = None
    note: str = ""


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
        prepass: a statistic the method needs before it can stream (see `Prepass`); given
            it as ``stat=``, the method is elementwise.
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
    prepass: Prepass | None = None
    exact: MethodFn | None = None
    exact_check: ExactCheckFn | None = None
    exact_out_dtype: str | None = None

    @property
    def streams_whole_tensors(self) -> bool:
        """The engine hands this method whole tensors (not chunks): neither elementwise nor
        elementwise once its pre-pass statistic is known (``prepass``)."""
        return not self.elementwise and self.prepass is None

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
        stat: Any = None,
        exact: bool = False,
    ) -> torch.Tensor:
        """Run the method on float32 tensors and return the merged float32 tensor (with
        ``exact``: mergekit's arithmetic on tensors of any float dtype, result in that dtype).

        For task-vector methods ``tensors`` are the models' tensors: the deltas against
        ``base`` are formed here (in place: a method owns, and may overwrite, the tensors it
        gets), and the merged delta is added back to ``base``. ``stat`` (the piece's pre-pass
        statistic) is passed on only when given.
        """
        extra: dict[str, Any] = {} if stat is None else {"stat": stat}
        fn = self.exact if (exact and self.exact is not None) else self.fn
        if self.kind == "task_vector":
            if base is None:
                raise ValueError(f"method {self.name!r} needs a base tensor")
            deltas = [t.sub_(base) for t in tensors]
            merged = fn(deltas, p, rng=rng, **extra)
            return merged.add_(base)
        return fn(tensors, p, base=base, rng=rng, **extra)
