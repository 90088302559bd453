"""soupkit: model soups and weight-space merging of fine-tuned checkpoints.

Uniform, weighted and checkpoint soups (Wortsman et al., ICML 2022) and the merging methods
that grew from them, streamed tensor by tensor from safetensors with bounded memory.
"""

from soupkit._version import __version__
from soupkit.adapters.lora import LoraResult, extract_lora, fold_lora, merge_loras, read_adapter
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
