"""``adapter_config.json`` is an input: every field of PEFT's ``LoraConfig`` is classified here.

`LORA_FIELDS` says, for each field of the ``LoraConfig`` of the pinned PEFT (0.21.2), whether
soupkit applies it (``supported``), whether it cannot change the folded weights
(``no_effect``: training, initialisation or loading options), or whether soupkit refuses an
adapter that sets it (``refused``, with PEFT's own name for the feature and the reason). A test
enumerates ``dataclasses.fields(peft.LoraConfig)`` against this table, so a field added by a
newer PEFT fails a test instead of being ignored; a key that is not in the table makes
`validate_adapter_config` refuse the adapter.

Validation is explicit and collects every problem into one `ConfigError` naming the file and the
field: wrong types (``fan_in_fan_out: "no"`` is a type error, not true), non-finite or out-of-range
numbers (``lora_alpha: NaN``), and ``rank_pattern`` / ``alpha_pattern`` keys that are too long, too
many, or regular expressions soupkit cannot match in bounded time (see `soupkit._util.safe_regex`;
PEFT matches a key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``, and soupkit gives the same
answer without backtracking). The limits are the module constants below (SECURITY.md,
"Adapter configs").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from soupkit._util.safe_regex import MAX_PATTERN_CHARS, UnsafePatternError, safe_match
from soupkit.errors import ConfigError, UsageError

__all__ = [
    "LORA_FIELDS",
    "MAX_PATTERN_KEYS",
    "MAX_RANK",
    "AdapterSettings",
    "FieldRule",
    "clip",
    "pattern_key",
    "validate_adapter_config",
]

MAX_RANK = 1 << 20
MAX_PATTERN_KEYS = 10_000
MAX_NAME_CHARS = 1000  # module names matched against pattern keys


@dataclass(frozen=True)
class FieldRule:
    """How soupkit treats one ``LoraConfig`` field.

    Attributes:
        handling: ``supported`` (read and applied), ``no_effect`` (cannot change the folded
            weights) or ``refused`` (an adapter that sets it is refused).
        feature: PEFT's name of the feature (for refusals).
        why: the reason, shown in errors and docs.
    """

    handling: Literal["supported", "no_effect", "refused"]
    feature: str
    why: str


def _s(why: str) -> FieldRule:
    return FieldRule("supported", "", why)


def _n(why: str) -> FieldRule:
    return FieldRule("no_effect", "", why)


def _r(feature: str, why: str) -> FieldRule:
    return FieldRule("refused", feature, why)


_MERGE = "its merged weight is not W + scale * B @ A"
LORA_FIELDS: dict[str, FieldRule] = {
    "task_type": _n("metadata (which head PeftModel wraps)"),
    "peft_type": _s("must be LORA; other PEFT types are refused"),
    "auto_mapping": _n("metadata"),
    "peft_version": _n("metadata"),
    "base_model_name_or_path": _n("metadata (the base is given explicitly)"),
    "revision": _n("metadata"),
    "inference_mode": _n("training switch"),
    "r": _s("rank; checked against the factors' shapes"),
    "target_modules": _n("which modules were adapted; the saved factors say it exactly"),
    "exclude_modules": _n("which modules were adapted; the saved factors say it exactly"),
    "lora_alpha": _s("scale = lora_alpha / r"),
    "lora_dropout": _n("training only"),
    "fan_in_fan_out": _s("the factors are transposed (GPT-2's Conv1D)"),
    "bias": _s("'all' / 'lora_only': the trained biases are stored whole and replace the base's"),
    "use_rslora": _s("scale = lora_alpha / sqrt(r)"),
    "modules_to_save": _s("stored whole; they replace the base's tensors"),
    "init_lora_weights": _s(
        "True, False, 'gaussian', 'eva', 'orthogonal' only initialise the factors; "
        "the initialisations that change the base weights or the layer are refused"
    ),
    "layers_to_transform": _n("which layers were adapted; the saved factors say it exactly"),
    "layers_pattern": _n("which layers were adapted; the saved factors say it exactly"),
    "rank_pattern": _s("per-module r, keys matched as PEFT matches them"),
    "alpha_pattern": _s("per-module lora_alpha, keys matched as PEFT matches them"),
    "megatron_config": _r("Megatron parallel layers", "the layers are split across devices"),
    "megatron_core": _n("the Megatron module name; only used with megatron_config"),
    "trainable_token_indices": _r(
        "trainable tokens",
        "the embedding rows are stored as a separate token adapter, not as LoRA factors",
    ),
    "loftq_config": _n(
        "initialisation only (LoftQ itself is refused through init_lora_weights='loftq')"
    ),
    "eva_config": _n("initialisation only (EVA initialises A; the base is unchanged)"),
    "corda_config": _n(
        "initialisation only (CorDA itself is refused through init_lora_weights='corda')"
    ),
    "lora_ga_config": _n(
        "initialisation only (LoRA-GA itself is refused through init_lora_weights='lora_ga')"
    ),
    "use_dora": _r("DoRA", "its magnitude vector rescales the whole weight; " + _MERGE),
    "velora_config": _r("VeLoRA", "a LoRA variant layer soupkit does not implement"),
    "alora_invocation_tokens": _r(
        "aLoRA",
        'PEFT itself refuses to merge it ("aLoRA does not support '
        'merging"): the adapter acts only after its invocation tokens',
    ),
    "use_qalora": _r("QALoRA", "its A factor acts on pooled input groups; " + _MERGE),
    "qalora_group_size": _n("only used with use_qalora"),
    "monteclora_config": _r("MonteCLoRA", "a LoRA variant layer soupkit does not implement"),
    "layer_replication": _r("layer replication", "the adapted model has more layers than the base"),
    "runtime_config": _n("runtime options (offloading)"),
    "lora_bias": _s("lora_B.bias * scale is added to the base bias"),
    "target_parameters": _r(
        "LoRA on parameters",
        "the factors act on nn.Parameter tensors (MoE experts) with their own layout",
    ),
    "use_bdlora": _r("BD-LoRA", "block-diagonal factors; " + _MERGE),
    "arrow_config": _r("Arrow routing", "the output mixes several adapters per token"),
    "kasa_config": _r("KaSA", "a LoRA variant layer soupkit does not implement"),
    "ensure_weight_tying": _r(
        "weight tying of adapted layers", "soupkit does not tie adapted tensors"
    ),
}

_INIT_PLAIN = {True, False, "gaussian", "eva", "orthogonal"}
# init_lora_weights values that change the base weights (the saved adapter then applies to the
# residual model) or select a LoRA variant
_INIT_REFUSED = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "loftq": "LoftQ",
    "lora_ga": "LoRA-GA",
    "mica": "MiCA",
}


@dataclass(frozen=True)
class AdapterSettings:
    """The fields of a validated ``adapter_config.json`` that change the fold."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    lora_bias: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def clip(v: Any, limit: int = 60) -> str:
    """``repr(v)``, cut to ``limit`` characters (file contents never make a message long)."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_patterns(name: str, value: Any, rank: bool, errors: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(
            f"{name}: expected an object {{module pattern: {'rank' if rank else 'alpha'}}}, "
            f"got {type(value).__name__} {clip(value)}"
        )
        return {}
    if len(value) > MAX_PATTERN_KEYS:
        errors.append(f"{name}: {len(value):,} keys, more than the limit of {MAX_PATTERN_KEYS:,}")
        return {}
    out: dict[str, Any] = {}
    for key, v in value.items():
        if len(key) > MAX_PATTERN_CHARS:
            errors.append(
                f"{name}: a key of {len(key):,} characters, more than the limit of {MAX_PATTERN_CHARS}"
            )
            continue
        if rank and not (_is_int(v) and 1 <= v <= MAX_RANK):
            errors.append(
                f"{name}[{clip(key)}]: expected a whole number 1..{MAX_RANK}, got {clip(v)}"
            )
            continue
        if not rank and not _is_number(v):
            errors.append(f"{name}[{clip(key)}]: expected a finite number, got {clip(v)}")
            continue
        try:
            safe_match(rf"(.*\.)?({key})$", "")
        except UnsafePatternError as e:
            errors.append(
                f"{name}[{clip(key)}]: PEFT matches the key as a regular expression, and soupkit "
                f"refuses this one: {e}"
            )
            continue
        out[key] = float(v) if not rank else v
    return out


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", [], {})


def validate_adapter_config(cfg: Mapping[str, Any], source: str) -> AdapterSettings:
    """Check ``adapter_config.json`` (parsed) field by field against `LORA_FIELDS`.

    Args:
        cfg: the parsed JSON object.
        source: the file, for messages.

    Returns:
        The settings that change the fold.

    Raises:
        ConfigError: wrong types or values, unknown fields, unsafe pattern keys (all at once).
        UsageError: another PEFT type, or a LoRA feature soupkit refuses (named as PEFT names it).
    """
    errors: list[str] = []
    peft_type = cfg.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise ConfigError([f"peft_type: expected a string, got {clip(peft_type)}"], source=source)
    if peft_type.upper() != "LORA":
        raise UsageError(
            f"{source}: a {clip(peft_type)[1:-1]} adapter; soupkit folds and merges LoRA "
            "adapters only\nhint: use PEFT's merge_and_unload() for other adapter types"
        )
    unknown = [k for k in cfg if k not in LORA_FIELDS]
    errors += [
        f"{clip(k)}: not a field of PEFT's LoraConfig that soupkit knows (a newer PEFT?); soupkit "
        "cannot tell whether it changes the folded weights"
        for k in unknown[:20]
    ]
    r = cfg.get("r", 8)
    if not (_is_int(r) and 1 <= r <= MAX_RANK):
        errors.append(f"r: expected a whole number 1..{MAX_RANK}, got {clip(r)}")
    alpha = cfg.get("lora_alpha", 8)
    if not _is_number(alpha):
        errors.append(f"lora_alpha: expected a finite number, got {clip(alpha)}")
    for key in (
        "fan_in_fan_out",
        "use_rslora",
        "use_dora",
        "lora_bias",
        "inference_mode",
        "use_qalora",
        "ensure_weight_tying",
    ):
        if key in cfg and not isinstance(cfg[key], bool):
            errors.append(f"{key}: expected true or false, got {clip(cfg[key])}")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        errors.append(f"bias: expected 'none', 'all' or 'lora_only', got {clip(cfg.get('bias'))}")
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        v = cfg.get(key)
        if not (
            v is None
            or isinstance(v, str)
            or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        ):
            errors.append(f"{key}: expected a string or a list of strings, got {clip(v)}")
    v = cfg.get("modules_to_save")
    if not (v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
        errors.append(f"modules_to_save: expected a list of module names, got {clip(v)}")
    v = cfg.get("layers_to_transform")
    if not (v is None or _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))):
        errors.append(
            f"layers_to_transform: expected a layer index or a list of them, got {clip(v)}"
        )
    init = cfg.get("init_lora_weights", True)
    init_refused = None
    # PEFT compares "gaussian" case-insensitively, the others exactly
    if isinstance(init, bool) or (
        isinstance(init, str) and (init in _INIT_PLAIN or init.lower() == "gaussian")
    ):
        pass
    elif isinstance(init, str) and (
        init.lower() in _INIT_REFUSED or init.startswith(("pissa_niter_", "corda"))
    ):
        init_refused = _INIT_REFUSED[next(k for k in _INIT_REFUSED if init.lower().startswith(k))]
    else:
        errors.append(
            f"init_lora_weights: expected true, false or one of PEFT's initialisations, got {clip(init)}"
        )
    rank_pattern = _check_patterns("rank_pattern", cfg.get("rank_pattern"), True, errors)
    alpha_pattern = _check_patterns("alpha_pattern", cfg.get("alpha_pattern"), False, errors)
    if errors:
        raise ConfigError(errors, source=source)
    refused = [
        (k, rule)
        for k, rule in LORA_FIELDS.items()
        if rule.handling == "refused" and k in cfg and _is_set(cfg[k])
    ]
    lines = [f"{rule.feature} ({k}: {clip(cfg[k])}): {rule.why}" for k, rule in refused]
    if init_refused is not None:
        lines.append(
            f"{init_refused} (init_lora_weights: {init!r}): this initialisation changes the base "
            "weights (or the layer), so the saved factors apply to PEFT's residual model, not "
            "to the base; save the adapter with PEFT's path_initial_model_for_weight_conversion "
            "to get a plain LoRA of the base"
        )
    if lines:
        raise UsageError(
            f"{source}: soupkit cannot fold this adapter exactly, so it refuses it:\n"
            + "\n".join(f"  - {x}" for x in lines)
            + "\nhint: use PEFT's merge_and_unload() where PEFT supports merging it"
        )
    return AdapterSettings(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        lora_bias=bool(cfg.get("lora_bias", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def pattern_key(keys: list[str], module: str) -> str | None:
    """PEFT's get_pattern_key: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``,
    matched without backtracking (`soupkit._util.safe_regex`); None when none matches.

    Raises:
        UsageError: a module name longer than `MAX_NAME_CHARS`.
    """
    if not keys:
        return None
    if len(module) > MAX_NAME_CHARS:
        raise UsageError(
            f"module name of {len(module):,} characters (limit {MAX_NAME_CHARS}) cannot be "
            "matched against rank_pattern / alpha_pattern"
        )
    for key in keys:
        if safe_match(rf"(.*\.)?({key})$", module):
            return key
    return None
