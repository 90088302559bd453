"""soupkit: model soups and weight-space merging of fine-tuned checkpoints.

Uniform, weighted and checkpoint soups (Wortsman et al., ICML 2022) and the merging methods
that grew from them, streamed tensor by tensor from safetensors with bounded memory.
"""

import importlib
from typing import TYPE_CHECKING, Any

from soupkit._version import __version__
from soupkit.errors import (
    CheckpointFormatError,
    ConfigError,
    EvaluationError,
    MergeIOError,
    MethodInputError,
    NonFiniteError,
    OutputExistsError,
    PlanError,
    SoupError,
    UnknownMethodError,
    UnknownParameterError,
    UnsafeFormatError,
    UsageError,
)

# The public names below load on first use (PEP 562), so that `import soupkit` and the
# `soupkit` command load only what they use: `soupkit merge` never imports the search, the
# backends or the evaluators (benchmarks/README.md measures what this saves).
if TYPE_CHECKING:
    from soupkit.adapters.lora import (
        LoraResult,
        extract_lora,
        fold_lora,
        merge_loras,
        read_adapter,
    )
    from soupkit.api.checkpoint_soup import CheckpointSoup
    from soupkit.api.diagnostics import DiagnosisReport, diagnose
    from soupkit.api.merging import (
        MergeResult,
        find_checkpoints,
        merge,
        merge_state_dicts,
        plan,
        soup_checkpoints,
        uniform_soup,
    )
    from soupkit.api.multi import merge_many, wise_ft
    from soupkit.api.task_vectors import TaskVector
    from soupkit.backends import LocalBackend, RayBackend, RemoteEvaluator
    from soupkit.engine.malloc import tune_allocator
    from soupkit.io.checkpoint import open_checkpoint
    from soupkit.io.names import KeyMap
    from soupkit.planning.plan import MergePlan
    from soupkit.recipe.schema import MergeConfig, load_recipe
    from soupkit.search import (
        GreedySoupResult,
        LearnedSoupResult,
        OptimizeResult,
        SweepResult,
        greedy_soup,
        learned_soup,
        optimize,
        recalibrate_bn,
        sweep,
    )

_LAZY: dict[str, str] = {  # public name -> the module that defines it
    "CheckpointSoup": "soupkit.api.checkpoint_soup",
    "DiagnosisReport": "soupkit.api.diagnostics",
    "GreedySoupResult": "soupkit.search",
    "KeyMap": "soupkit.io.names",
    "LearnedSoupResult": "soupkit.search",
    "LocalBackend": "soupkit.backends",
    "LoraResult": "soupkit.adapters.lora",
    "MergeConfig": "soupkit.recipe.schema",
    "MergePlan": "soupkit.planning.plan",
    "MergeResult": "soupkit.api.merging",
    "OptimizeResult": "soupkit.search",
    "RayBackend": "soupkit.backends",
    "RemoteEvaluator": "soupkit.backends",
    "SweepResult": "soupkit.search",
    "TaskVector": "soupkit.api.task_vectors",
    "diagnose": "soupkit.api.diagnostics",
    "extract_lora": "soupkit.adapters.lora",
    "find_checkpoints": "soupkit.api.merging",
    "fold_lora": "soupkit.adapters.lora",
    "greedy_soup": "soupkit.search",
    "learned_soup": "soupkit.search",
    "load_recipe": "soupkit.recipe.schema",
    "merge": "soupkit.api.merging",
    "merge_loras": "soupkit.adapters.lora",
    "merge_many": "soupkit.api.multi",
    "merge_state_dicts": "soupkit.api.merging",
    "open_checkpoint": "soupkit.io.checkpoint",
    "optimize": "soupkit.search",
    "plan": "soupkit.api.merging",
    "read_adapter": "soupkit.adapters.lora",
    "recalibrate_bn": "soupkit.search",
    "soup_checkpoints": "soupkit.api.merging",
    "sweep": "soupkit.search",
    "tune_allocator": "soupkit.engine.malloc",
    "uniform_soup": "soupkit.api.merging",
    "wise_ft": "soupkit.api.multi",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'soupkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({n for n in globals() if n.startswith("_")} | set(__all__))


__all__ = [
    "CheckpointFormatError",
    "CheckpointSoup",
    "ConfigError",
    "DiagnosisReport",
    "EvaluationError",
    "GreedySoupResult",
    "KeyMap",
    "LearnedSoupResult",
    "LocalBackend",
    "LoraResult",
    "MergeConfig",
    "MergeIOError",
    "MergePlan",
    "MergeResult",
    "MethodInputError",
    "NonFiniteError",
    "OptimizeResult",
    "OutputExistsError",
    "PlanError",
    "RayBackend",
    "RemoteEvaluator",
    "SoupError",
    "SweepResult",
    "TaskVector",
    "UnknownMethodError",
    "UnknownParameterError",
    "UnsafeFormatError",
    "UsageError",
    "__version__",
    "diagnose",
    "extract_lora",
    "find_checkpoints",
    "fold_lora",
    "greedy_soup",
    "learned_soup",
    "load_recipe",
    "merge",
    "merge_loras",
    "merge_many",
    "merge_state_dicts",
    "open_checkpoint",
    "optimize",
    "plan",
    "read_adapter",
    "recalibrate_bn",
    "soup_checkpoints",
    "sweep",
    "tune_allocator",
    "uniform_soup",
    "wise_ft",
]
