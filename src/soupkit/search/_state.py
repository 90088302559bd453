"""Shared plumbing of the search algorithms: read one ingredient, hash it, name an evaluator.

* `read_state` loads one checkpoint into memory tensor by tensor through `soupkit.io` (public
  API; the greedy workers read their ingredients with their own `TensorReader`).
* `checkpoint_digest` is the *content* identity of a checkpoint (what score caches key on): the
  SHA-256 of the SHA-256s of its safetensors files, in storage order. Hashing reads every byte
  once; `soupkit.io.digest.HashCache` remembers a file's hash under a fast key (path, device,
  inode, size, modification and change times) so an unchanged file is not hashed again.
* `evaluator_identity` names an evaluator for the cache, or refuses when it cannot do so safely.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator

import torch

from soupkit.errors import UsageError
from soupkit.evaluate.identity import own_cache_key, source_digest
from soupkit.io.checkpoint import Checkpoint
from soupkit.io.digest import HashCache
from soupkit.io.reader import TensorReader

__all__ = [
    "checkpoint_digest",
    "evaluator_identity",
    "iter_tensors",
    "read_state",
]


def iter_tensors(ck: Checkpoint, reader: TensorReader) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of ``ck`` in storage order, one freshly read tensor at a time."""
    for name, info in ck.tensors.items():
        yield name, reader.read(info).reshape(info.shape)


def read_state(ck: Checkpoint, reader: TensorReader | None = None) -> dict[str, torch.Tensor]:
    """The whole state dict of one checkpoint, in its stored dtypes (one model in memory).

    Args:
        ck: the checkpoint (see `soupkit.open_checkpoint`).
        reader: an open `TensorReader` to reuse (default: a new one, closed afterwards).
    """
    if reader is not None:
        return dict(iter_tensors(ck, reader))
    with TensorReader() as r:
        return dict(iter_tensors(ck, r))


def checkpoint_digest(
    ck: Checkpoint, memo: HashCache | None = None, on_bytes: Callable[[int], None] | None = None
) -> str:
    """Content identity of a checkpoint: SHA-256 over ``"<sha256 of file>\\n"`` for each file.

    Files are taken in storage order (the order of the shard index), so the same bytes in the
    same layout give the same digest wherever the folder lives. In-memory checkpoints are hashed
    from their tensors (name, dtype, shape and bytes).
    """
    h = hashlib.sha256(b"soupkit-checkpoint-v1\n")
    if ck.path is None:
        for name, info in ck.tensors.items():
            assert info.data is not None
            h.update(f"{name}|{info.dtype}|{list(info.shape)}\n".encode())
            flat = info.data.detach().to("cpu").contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        return h.hexdigest()
    m = memo if memo is not None else HashCache(None)
    for f in ck.files:
        h.update(f"{m.sha256(f, on_bytes)}\n".encode())
    return h.hexdigest()


def evaluator_identity(evaluator: object, given: str | None = None) -> str:
    """A stable name for an evaluator, used as part of every cache key.

    In order: ``given`` (the caller's ``evaluator_id``); the evaluator's ``cache_key`` attribute
    (a string, or a method returning one); for a plain module-level function, its qualified name
    plus a hash of its module's source file (so editing the evaluator invalidates its scores).

    Raises:
        UsageError: the evaluator is an object, a closure or a partial whose results may depend
            on state soupkit cannot see (a data path, a captured variable), so caching it under a
            derived name could return another evaluator's scores.
    """
    if given is not None:
        return given
    key = own_cache_key(evaluator)
    if key:
        return key
    if (
        inspect.isfunction(evaluator)
        and not evaluator.__closure__
        and evaluator.__name__ != "<lambda>"
    ):
        name = f"{evaluator.__module__}:{evaluator.__qualname__}"
        src = source_digest(evaluator)
        return f"{name}@{src}" if src else name
    raise UsageError(
        f"cannot cache scores of evaluator {evaluator!r}: it is not a plain module-level function, "
        "so its scores may depend on state soupkit cannot see (a data file, a captured variable)\n"
        "hint: pass evaluator_id='a name that changes when its data changes', give the evaluator "
        "a `cache_key` attribute, or turn the cache off (cache=None / --no-cache)"
    )
