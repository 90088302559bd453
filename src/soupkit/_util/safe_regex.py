"""Regular expressions from untrusted files, matched in time linear in the text.

PEFT matches the keys of ``rank_pattern`` / ``alpha_pattern`` in ``adapter_config.json`` with
``re.match(rf"(.*\\.)?({key})$", module_name)``. Python's backtracking engine takes time
exponential in the name's length on keys such as ``(a|aa)+$X`` (42 s for a 42-character name),
so an adapter config could hang soupkit. Here the pattern is parsed by Python's own parser (same
syntax, same meaning) and run as a Thompson NFA (a Pike VM without captures): time
O(len(text) * len(program)), no backtracking. A match exists exactly when a backtracking search
would find one, so the answer equals ``re.match``'s for every pattern accepted here.

Refused with `UnsafePatternError`: what an NFA cannot express (backreferences, lookarounds,
conditional, atomic and possessive groups), inline flags, counted repeats above
`MAX_REPEAT_COUNT`, patterns longer than `MAX_PATTERN_CHARS` or programs longer than
`MAX_PROGRAM`. Patterns without repeats or alternation (plain module names, the usual keys) go
to `re` directly: they cannot backtrack more than O(len(text) * len(pattern)).
"""

from __future__ import annotations

import functools
import re
import re._constants as _c  # type: ignore[import-not-found]  # the parser's opcodes (3.11+)
import re._parser as _p  # type: ignore[import-not-found]  # private: typeshed has no stubs
from collections.abc import Callable
from typing import Any

__all__ = [
    "MAX_PATTERN_CHARS",
    "MAX_PROGRAM",
    "MAX_REPEAT_COUNT",
    "UnsafePatternError",
    "safe_match",
]

MAX_PATTERN_CHARS = 1000
MAX_REPEAT_COUNT = 100
MAX_PROGRAM = 5000

_CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)
_NFA_ONLY = {_c.MAX_REPEAT, _c.MIN_REPEAT, _c.BRANCH}


class UnsafePatternError(ValueError):
    """A pattern that soupkit will not run (a construct an NFA cannot express, or too large)."""


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORY: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: _is_word,
    _c.CATEGORY_NOT_WORD: lambda ch: not _is_word(ch),
}


def _literal(code: int) -> Callable[[str], bool]:
    return lambda ch: ord(ch) == code


def _range(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda ch: lo <= ord(ch) <= hi


def _class(items: list[tuple[Any, Any]]) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            tests.append(_literal(av))
        elif op is _c.RANGE:
            tests.append(_range(av[0], av[1]))
        elif op is _c.CATEGORY and av in _CATEGORY:
            tests.append(_CATEGORY[av])
        else:
            raise UnsafePatternError(f"unsupported character class item {op}")
    return lambda ch: any(t(ch) for t in tests) != negate


class _Compiler:
    def __init__(self) -> None:
        self.prog: list[tuple[Any, ...]] = []

    def emit(self, *ins: Any) -> int:
        if len(self.prog) >= MAX_PROGRAM:
            raise UnsafePatternError(f"too complex (more than {MAX_PROGRAM} NFA states)")
        self.prog.append(ins)
        return len(self.prog) - 1

    def seq(self, items: Any) -> None:
        for op, av in items:
            self.node(op, av)

    def node(self, op: Any, av: Any) -> None:
        if op is _c.LITERAL:
            self.emit(_CHAR, lambda ch, v=av: ord(ch) == v)
        elif op is _c.NOT_LITERAL:
            self.emit(_CHAR, lambda ch, v=av: ord(ch) != v)
        elif op is _c.ANY:
            self.emit(_CHAR, lambda ch: ch != "\n")
        elif op is _c.IN:
            self.emit(_CHAR, _class(av))
        elif op is _c.AT:
            if av not in (
                _c.AT_BEGINNING,
                _c.AT_BEGINNING_STRING,
                _c.AT_END,
                _c.AT_END_STRING,
                _c.AT_BOUNDARY,
                _c.AT_NON_BOUNDARY,
            ):
                raise UnsafePatternError(f"unsupported anchor {av}")
            self.emit(_ASSERT, av)
        elif op is _c.SUBPATTERN:
            _group, add, delete, sub = av
            if add or delete:
                raise UnsafePatternError("inline flags are not supported")
            self.seq(sub)
        elif op is _c.BRANCH:
            alts = av[1]
            jumps = []
            for i, alt in enumerate(alts):
                if i < len(alts) - 1:
                    split = self.emit(_SPLIT, None, None)
                    self.prog[split] = (_SPLIT, split + 1, None)
                    self.seq(alt)
                    jumps.append(self.emit(_JMP, None))
                    self.prog[split] = (_SPLIT, split + 1, len(self.prog))
                else:
                    self.seq(alt)
            for j in jumps:
                self.prog[j] = (_JMP, len(self.prog))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # lazy or greedy: the same set of matches
            lo, hi, sub = av
            if lo > MAX_REPEAT_COUNT or (hi is not _c.MAXREPEAT and hi > MAX_REPEAT_COUNT):
                raise UnsafePatternError(
                    f"counted repeats above {{{MAX_REPEAT_COUNT}}} are not supported"
                )
            for _ in range(lo):
                self.seq(sub)
            if hi is _c.MAXREPEAT:
                split = self.emit(_SPLIT, None, None)
                self.seq(sub)
                self.emit(_JMP, split)
                self.prog[split] = (_SPLIT, split + 1, len(self.prog))
            else:
                splits = []
                for _ in range(hi - lo):
                    splits.append(self.emit(_SPLIT, None, None))
                    self.seq(sub)
                for s in splits:
                    self.prog[s] = (_SPLIT, s + 1, len(self.prog))
        else:
            raise UnsafePatternError(
                f"{str(op).lower()} (backreferences, lookarounds, atomic or "
                "possessive groups) cannot be matched safely"
            )


def _holds(kind: Any, text: str, pos: int) -> bool:
    n = len(text)
    if kind is _c.AT_BEGINNING or kind is _c.AT_BEGINNING_STRING:
        return pos == 0
    if kind is _c.AT_END:
        return pos == n or (pos == n - 1 and text[-1] == "\n")
    if kind is _c.AT_END_STRING:
        return pos == n
    before = pos > 0 and _is_word(text[pos - 1])
    after = pos < n and _is_word(text[pos])
    return (before != after) if kind is _c.AT_BOUNDARY else (before == after)


def _uses_nfa(items: Any) -> bool:
    for op, av in items:
        if op in _NFA_ONLY:
            return True
        if op is _c.SUBPATTERN and _uses_nfa(av[3]):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> tuple[tuple[Any, ...], ...] | re.Pattern[str]:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafePatternError(f"longer than {MAX_PATTERN_CHARS} characters")
    try:
        parsed = _p.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise UnsafePatternError(f"not a valid regular expression ({e})") from None
    if parsed.state.flags & ~_c.SRE_FLAG_UNICODE:
        raise UnsafePatternError("inline flags are not supported")
    comp = _Compiler()
    comp.seq(parsed)  # validates every construct, even on the `re` path below
    if not _uses_nfa(parsed):
        return re.compile(pattern)
    comp.emit(_MATCH)
    return tuple(comp.prog)


def safe_match(pattern: str, text: str) -> bool:
    """``bool(re.match(pattern, text))``, in time linear in ``len(text)``.

    Raises:
        UnsafePatternError: the pattern uses a construct soupkit does not run (see the module
            docstring), or is too large.
    """
    prog = _compile(pattern)
    if isinstance(prog, re.Pattern):
        return prog.match(text) is not None
    clist: list[int] = []
    _add(prog, 0, text, 0, set(), clist)
    for pos in range(len(text) + 1):
        nlist: list[int] = []
        seen: set[int] = set()
        for pc in clist:
            ins = prog[pc]
            if ins[0] == _MATCH:
                return True
            if pos < len(text) and ins[1](text[pos]):
                _add(prog, pc + 1, text, pos + 1, seen, nlist)
        if not nlist and pos < len(text):
            return False
        clist = nlist
    return any(prog[pc][0] == _MATCH for pc in clist)


def _add(
    prog: tuple[tuple[Any, ...], ...],
    start: int,
    text: str,
    pos: int,
    seen: set[int],
    out: list[int],
) -> None:
    """The states reachable from ``start`` at ``pos`` without reading a character."""
    stack = [start]
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        ins = prog[pc]
        if ins[0] == _JMP:
            stack.append(ins[1])
        elif ins[0] == _SPLIT:
            stack.append(ins[2])
            stack.append(ins[1])
        elif ins[0] == _ASSERT:
            if _holds(ins[1], text, pos):
                stack.append(pc + 1)
        else:
            out.append(pc)
