"""Candidates of an evaluation job: where the weights are, named by paths (never tensors).

* `Ingredient`: one checkpoint alone (greedy soup's ingredient scores, the held-out best single).
* `UniformSoup`: the uniform average of checkpoints, built with greedy soup's float32 running
  sum (`soupkit.methods.linear.RunningSum`), so it equals the engine's uniform soup bit for bit.
* `RecipeMerge`: any recipe run by the engine into memory (a sweep's grid point), exactly as
  the local sweep does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from soupkit.errors import UsageError

__all__ = ["Candidate", "Ingredient", "RecipeMerge", "UniformSoup"]


@dataclass(frozen=True)
class Ingredient:
    """One checkpoint alone.

    Attributes:
        path (`str`): the checkpoint (file or folder), absolute, readable from every worker.
        digest (`str`, *optional*): its content digest; with it, a worker asked for the same
            checkpoint again in a row (batches of a sequential test) keeps the weights it read.
    """

    path: str
    digest: str | None = None


@dataclass(frozen=True)
class UniformSoup:
    """The uniform average of ``paths``, summed in this order in float32 (greedy soup's candidate).

    Non-float tensors come from the first path; the result is cast to the first path's dtypes.

    Attributes:
        paths (`tuple[str, ...]`): the ingredients, absolute, in recipe order (best first).
        digests (`tuple[str, ...]`): their content digests; a worker keeps the running sum of
            the last prefix it built under these, so trying ``soup + next`` after ``soup`` reads
            one checkpoint, not all of them.
    """

    paths: tuple[str, ...]
    digests: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.paths or len(self.paths) != len(self.digests):
            raise UsageError(
                f"UniformSoup needs one digest per path, got {len(self.paths)} paths and "
                f"{len(self.digests)} digests"
            )


@dataclass(frozen=True)
class RecipeMerge:
    """A recipe merged by the engine into memory.

    Attributes:
        recipe (`dict`): the recipe as JSON-ready data (``MergeConfig.model_dump(mode="json")``)
            with absolute model paths.
    """

    recipe: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Any) -> RecipeMerge:
        """From a `MergeConfig`, with every model path made absolute (as this process resolves
        it), so the worker reads the same files whatever its working directory."""
        data = cfg.model_dump(mode="json", exclude_none=True)
        resolve = getattr(cfg, "resolve_model_path", lambda p: p)

        def fix(path: str) -> str:
            return os.path.abspath(str(resolve(path)))

        for m in data.get("models") or []:
            m["model"] = fix(m["model"])
        for sl in data.get("slices") or []:
            for src in sl.get("sources", []):
                src["model"] = fix(src["model"])
            if sl.get("base_model"):
                sl["base_model"] = fix(sl["base_model"])
        if data.get("base_model"):
            data["base_model"] = fix(data["base_model"])
        if data.get("tokenizer_source") not in (None, "base"):
            data["tokenizer_source"] = fix(data["tokenizer_source"])
        if not data.get("models"):
            data.pop("models", None)
        return cls(data)


Candidate = Ingredient | UniformSoup | RecipeMerge
