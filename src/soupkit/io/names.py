"""Tensor names from other ecosystems: prefix stripping, regex renaming, in-memory inputs.

Checkpoints of one architecture often disagree only in how their tensors are *named*:

- PyTorch Lightning saves ``LightningModule.state_dict()``, so a network held as
  ``self.model`` comes out as ``model.encoder.layer.0...`` (the ``state_dict`` nesting of the
  ``.ckpt`` file itself is unwrapped by `soupkit.io.pickle_ckpt`);
- ``DistributedDataParallel`` / ``DataParallel`` wrap the network as ``module``, so timm and
  open_clip training scripts often save ``module.visual.conv1.weight``;
- ``torch.compile`` adds ``_orig_mod.``.

A `KeyMap` renames the tensors of every input *at plan level*, from headers only, before the
planner compares models: ``--strip-prefix model.`` removes a leading ``model.`` from every
name that has it, and ``--rename 'REGEX=>REPLACEMENT'`` applies ``re.sub`` (Python syntax,
``\\1`` for groups) to every name. Rules apply in the order given, strips first. Names that a
rule does not match are kept as they are, so one map serves inputs with and without the
prefix. Two tensors of one checkpoint that end up with the same name are an error, never a
silent overwrite.

`as_state_dict` accepts what a training loop has in hand (an ``nn.Module``, a state dict, a
Lightning-style ``{"state_dict": ...}`` mapping) and returns a plain name -> tensor mapping
(`soupkit.io.output.save_state_dict` writes one as a safetensors folder).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soupkit.errors import CheckpointFormatError, UsageError
from soupkit.io.checkpoint import Checkpoint

__all__ = [
    "COMMON_PREFIXES",
    "KeyMap",
    "RenameRule",
    "as_state_dict",
    "prefix_fix",
    "prefix_hint",
    "rename_checkpoint",
]

# Wrappers that training code adds in front of every tensor name (see the module docstring).
COMMON_PREFIXES = (
    "module.",
    "model.",
    "_orig_mod.",
    "base_model.model.",
    "state_dict.",
    "net.",
    "network.",
)
_ARROW = "=>"


@dataclass(frozen=True)
class RenameRule:
    """One renaming rule: ``pattern.sub(replacement, name)``.

    Attributes:
        pattern: the compiled regular expression.
        replacement: the replacement (``re.sub`` syntax, ``\\1`` for groups).
        text: the rule as the user wrote it (for reports).
    """

    pattern: re.Pattern[str]
    replacement: str
    text: str

    @classmethod
    def parse(cls, text: str) -> RenameRule:
        """Parse ``'REGEX=>REPLACEMENT'``.

        Raises:
            UsageError: no ``=>``, an empty pattern, an invalid regex, or a bad group reference.
        """
        if _ARROW not in text:
            raise UsageError(
                f"--rename {text!r}: expected 'REGEX=>REPLACEMENT', e.g. '^module\\.=>'\n"
                "hint: the replacement may be empty to delete what the regex matches"
            )
        pat, repl = text.split(_ARROW, 1)
        if not pat:
            raise UsageError(f"--rename {text!r}: the regex before '=>' is empty")
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise UsageError(f"--rename {text!r}: invalid regular expression ({e})") from None
        try:
            rx.sub(repl, "")  # group references are checked when used; a dry run catches '\9'
            rx.sub(repl, pat)
        except (re.error, IndexError) as e:
            raise UsageError(
                f"--rename {text!r}: invalid replacement ({e})\n"
                f"hint: the regex has {rx.groups} group(s); refer to them as \\1 .. \\{rx.groups}"
            ) from None
        return cls(rx, repl, text)

    @classmethod
    def strip(cls, prefix: str) -> RenameRule:
        """The rule that removes a leading ``prefix`` (literally, not as a regex)."""
        if not prefix:
            raise UsageError("--strip-prefix: the prefix is empty")
        return cls(re.compile("^" + re.escape(prefix)), "", f"strip prefix {prefix!r}")

    def __call__(self, name: str) -> str:
        try:
            return self.pattern.sub(self.replacement, name)
        except (re.error, IndexError) as e:
            raise UsageError(f"--rename {self.text!r}: cannot apply to {name!r} ({e})") from None


@dataclass(frozen=True)
class KeyMap:
    """An ordered list of `RenameRule` applied to every input tensor name.

    Build one with `KeyMap.build` (``strip_prefix=["model."]``, ``rename=["^enc=>encoder"]``).
    An empty map is falsy and renames nothing.
    """

    rules: tuple[RenameRule, ...] = ()

    @classmethod
    def build(
        cls,
        strip_prefix: Iterable[str] | str | None = None,
        rename: Iterable[str] | str | None = None,
    ) -> KeyMap:
        """Prefix strips first (in order), then regex renames (in order).

        Args:
            strip_prefix: prefixes to remove where present (e.g. ``"module."``).
            rename: ``'REGEX=>REPLACEMENT'`` rules.
        """
        strips = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix or ())
        renames = [rename] if isinstance(rename, str) else list(rename or ())
        return cls(
            tuple([RenameRule.strip(p) for p in strips] + [RenameRule.parse(r) for r in renames])
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __call__(self, name: str) -> str:
        for rule in self.rules:
            name = rule(name)
        return name

    def describe(self) -> list[str]:
        """The rules as written, for plans and reports."""
        return [r.text for r in self.rules]

    def rename_all(self, names: Iterable[str], label: str = "checkpoint") -> dict[str, str]:
        """Map every name; returns ``{new: old}`` in the original order.

        Raises:
            CheckpointFormatError: two names map to one (lists every collision), or a name
                becomes empty.
        """
        out: dict[str, str] = {}
        problems: list[str] = []
        for old in names:
            new = self(old)
            if not new:
                problems.append(f"{old!r} becomes an empty name")
            elif new in out:
                problems.append(f"{out[new]!r} and {old!r} both become {new!r}")
            else:
                out[new] = old
        if problems:
            shown = problems[:10] + (
                [f"... and {len(problems) - 10} more"] if len(problems) > 10 else []
            )
            raise CheckpointFormatError(
                f"{label}: renaming with {self.describe()} makes tensor names collide:\n"
                + "\n".join(f"  - {p}" for p in shown)
                + "\nhint: anchor the regex (e.g. '^module\\.=>') or strip a longer prefix"
            )
        return out


def rename_checkpoint(ck: Checkpoint, key_map: KeyMap | None) -> Checkpoint:
    """``ck`` with its tensors renamed by ``key_map`` (headers only; no data is read).

    Returns ``ck`` itself when the map is empty or changes no name; otherwise a copy whose
    notes say how many tensors were renamed.
    """
    if not key_map:
        return ck
    mapping = key_map.rename_all(ck.tensors, ck.label)
    changed = sum(1 for new, old in mapping.items() if new != old)
    if not changed:
        return ck
    tensors = {new: dataclasses.replace(ck.tensors[old], name=new) for new, old in mapping.items()}
    note = f"{ck.label}: renamed {changed} of {len(tensors)} tensor(s) with {', '.join(key_map.describe())}"
    return dataclasses.replace(ck, tensors=tensors, notes=(*ck.notes, note))


def prefix_hint(expected: Iterable[str], got: Iterable[str]) -> str | None:
    """A ``--strip-prefix`` suggestion when ``got`` are ``expected`` names behind a common prefix.

    Returns e.g. ``"--strip-prefix model."`` or None when no single prefix explains it.
    """
    exp = set(expected)
    names = list(got)
    if not exp or not names:
        return None
    for pre in dict.fromkeys([*COMMON_PREFIXES, *_leading_segments(names)]):
        stripped = {n[len(pre) :] if n.startswith(pre) else n for n in names}
        if stripped != set(names) and len(stripped & exp) >= max(1, len(exp) // 2):
            return f"--strip-prefix {pre}"
    return None


def prefix_fix(name_sets: Sequence[Iterable[str]]) -> list[str] | None:
    """The ``--strip-prefix`` values that make every set of tensor names equal, or None.

    Used when models' names differ: if the only difference is a wrapper prefix (``module.``,
    ``model.``, ...), the planner says so and names the flag instead of listing every tensor.
    The strips are applied as `KeyMap` applies them (to every name that has the prefix, in
    every input), one prefix or two (e.g. ``module.`` on one input and ``_orig_mod.`` on
    another); None when no such strip makes the sets equal.
    """
    sets = [list(dict.fromkeys(s)) for s in name_sets]
    if len(sets) < 2 or all(set(x) == set(sets[0]) for x in sets[1:]):
        return None
    cands = list(
        dict.fromkeys([*COMMON_PREFIXES, *(p for s in sets for p in _leading_segments(s))])
    )

    def works(prefixes: list[str]) -> bool:
        km = KeyMap.build(strip_prefix=prefixes)
        mapped = []
        for s in sets:
            m = {km(n) for n in s}
            if len(m) != len(s) or "" in m:  # two names would collide: not a fix
                return False
            mapped.append(m)
        return all(m == mapped[0] for m in mapped[1:])

    for p in cands:
        if works([p]):
            return [p]
    for p in cands:
        for q in cands:
            if p != q and works([p, q]):
                return [p, q]
    return None


def _leading_segments(names: Sequence[str]) -> list[str]:
    firsts = {n.split(".", 1)[0] + "." for n in names if "." in n}
    return sorted(firsts) if len(firsts) == 1 else []


def as_state_dict(obj: Any, label: str = "input") -> dict[str, torch.Tensor]:
    """A plain name -> tensor dict from what a Python caller has.

    Args:
        obj: a ``torch.nn.Module`` (its ``state_dict()``: parameters and persistent buffers),
            a mapping of names to tensors, or a Lightning-style mapping with a
            ``"state_dict"`` entry.
        label: how errors name it.

    Raises:
        CheckpointFormatError: anything else, or entries that are not tensors.
    """
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        inner = obj.get("state_dict")
        if isinstance(inner, Mapping):  # a Lightning checkpoint dict: the tensors are in there
            obj = inner
        bad = [
            f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)
        ]
        if bad:
            raise CheckpointFormatError(
                f"{label}: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not tensors: "
                f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}\n"
                "hint: pass model.state_dict() or the nn.Module itself"
            )
        return {str(k): v for k, v in obj.items()}
    raise CheckpointFormatError(
        f"{label}: got a {type(obj).__name__}, expected an nn.Module or a state dict (name -> tensor)"
    )
