"""mergekit recipes in soupkit: parsing (gradients, filters, slices), unsupported keys refused by
name, slice planning (layer renumbering, pre/post weights, config.json), tokenizer_source, and
the Hugging Face folder a merge writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import soupkit
from soupkit.errors import ConfigError, PlanError
from soupkit.io.card import hub_id

from .eco_helpers import llama_config, llama_state, write_llama


def test_recipe_with_gradients_filters_and_slices_parses() -> None:
    cfg = soupkit.load_recipe("""
merge_method: linear
slices:
  - sources:
      - model: ./a
        layer_range: [0, 16]
        parameters:
          weight: [0.0, 0.5, 1.0]
      - model: ./b
        layer_range: [0, 16]
        parameters:
          weight:
            - filter: self_attn
              value: 0.7
            - value: 0.3
    parameters: {normalize: true}
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
""")
    assert cfg.models == [] and cfg.slices is not None and len(cfg.slices[0].sources) == 2
    assert cfg.slices[0].sources[0].layer_range == (0, 16)
    assert cfg.slices[0].sources[0].parameters["weight"] == [0.0, 0.5, 1.0]
    cond = cfg.slices[0].sources[1].parameters["weight"]
    assert isinstance(cond, list) and cond[0].filter == "self_attn" and cond[1].value == 0.3  # type: ignore[union-attr]
    # the recipe a merge records round-trips: no `models: []` beside the slices
    again = soupkit.load_recipe(cfg.to_yaml())
    assert again == cfg and "models" not in yaml.safe_load(cfg.to_yaml())


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"modules": {}},
            "mergekit key 'modules' (per-module recipes) is not supported by soupkit yet; see docs/mergekit.md",
        ),
        ({"tokenizer": {"source": "union"}}, "mergekit key 'tokenizer'"),
        (
            {"tokenizer_source": "union"},
            "tokenizer_source: 'union' (merging vocabularies) is not supported",
        ),
    ],
)
def test_unsupported_mergekit_keys_are_refused_by_name(
    extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        soupkit.load_recipe({"merge_method": "linear", "models": [{"model": "a"}], **extra})
    assert message in str(e.value)


def test_slice_keys_are_checked() -> None:
    base = {"merge_method": "passthrough"}
    with pytest.raises(
        ConfigError, match="residual_weight: mergekit key 'residual_weight' is not supported"
    ):
        soupkit.load_recipe(
            {
                **base,
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}], "residual_weight": 0.5}
                ],
            }
        )
    with pytest.raises(ConfigError, match=r"layer_rang: unknown key; did you mean 'layer_range'\?"):
        soupkit.load_recipe(
            {**base, "slices": [{"sources": [{"model": "a", "layer_rang": [0, 1]}]}]}
        )
    with pytest.raises(ConfigError, match="give exactly one of `models:`"):
        soupkit.load_recipe(base)
    with pytest.raises(ConfigError, match="give exactly one of `models:`"):
        soupkit.load_recipe(
            {
                **base,
                "models": [{"model": "a"}],
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
            }
        )


def _two_models(tmp_path: Path) -> tuple[Path, Path]:
    return (
        write_llama(tmp_path / "a", llama_state(1), tokenizer=True),
        write_llama(tmp_path / "b", llama_state(2)),
    )


def test_passthrough_slices_renumber_layers(tmp_path: Path) -> None:
    a, b = _two_models(tmp_path)
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
            {"sources": [{"model": str(a), "layer_range": [3, 4]}]},
        ],
    }
    p = soupkit.plan(recipe)
    assert p.config_updates == {"num_hidden_layers": 7}
    assert any("slice 1: output layers 3..5 <- " in n and "layers 1..3" in n for n in p.notes)
    soupkit.merge(recipe, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    rest = "self_attn.q_proj.weight"
    for k, (src, layer) in enumerate(
        [(sa, 0), (sa, 1), (sa, 2), (sb, 1), (sb, 2), (sb, 3), (sa, 3)]
    ):
        assert torch.equal(out[f"model.layers.{k}.{rest}"], src[f"model.layers.{layer}.{rest}"])
    # pre weights from the first slice's model, post weights from the last slice's
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], sa["lm_head.weight"])
    assert len([n for n in out if n.endswith(rest)]) == 7
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 7
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_sliced_recipe_says_what_its_global_prepass_reads(tmp_path: Path) -> None:
    """A sliced TIES recipe with a global trim notes the pre-pass's extra reads, as the same
    recipe over whole models does (the slices planner once left the note out)."""
    a, b = _two_models(tmp_path)
    c = write_llama(tmp_path / "c", llama_state(3))
    params = {"density": 0.5, "trim_scope": "global"}
    whole = soupkit.plan(
        {
            "merge_method": "ties",
            "base_model": str(a),
            "models": [{"model": str(b)}, {"model": str(c)}],
            "parameters": params,
        }
    )
    sliced = soupkit.plan(
        {
            "merge_method": "ties",
            "base_model": str(a),
            "slices": [{"sources": [{"model": str(m), "layer_range": [0, 4]} for m in (a, b, c)]}],
            "parameters": params,
        }
    )
    note = [n for n in whole.notes if "pre-pass" in n]
    assert len(note) == 1 and [n for n in sliced.notes if "pre-pass" in n] == note


def test_merge_many_updates_a_sliced_models_config_like_merge(tmp_path: Path) -> None:
    # merge_many writes the files beside the weights with soupkit.merge's own code: the carried
    # config.json gets the sliced layer count, not the source model's
    from soupkit.api.multi import merge_many

    a, b = _two_models(tmp_path)
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
        ],
    }
    (res,) = merge_many(
        [soupkit.plan(recipe)], [tmp_path / "many"], progress=False, hash_inputs=False
    )
    soupkit.merge(recipe, tmp_path / "one", progress=False, hash_inputs=False)
    assert json.loads((res.out / "config.json").read_text())["num_hidden_layers"] == 6
    assert (res.out / "config.json").read_bytes() == (tmp_path / "one" / "config.json").read_bytes()
    assert (res.out / "model.safetensors").read_bytes() == (
        tmp_path / "one" / "model.safetensors"
    ).read_bytes()


def test_post_weights_come_from_the_last_slice(tmp_path: Path) -> None:
    a, b = _two_models(tmp_path)
    out = soupkit.plan(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(b), "layer_range": [2, 4]}]},
            ],
        }
    )
    src = {j.name: j.inputs[0] for j in out.jobs}
    assert src["model.embed_tokens.weight"].file.parent == a  # type: ignore[union-attr]
    assert src["lm_head.weight"].file.parent == b and src["model.norm.weight"].file.parent == b  # type: ignore[union-attr]
    assert src["model.layers.3.mlp.up_proj.weight"].name == "model.layers.3.mlp.up_proj.weight"


def test_sliced_model_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    a, b = _two_models(tmp_path)
    soupkit.merge(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 4]}]},
                {"sources": [{"model": str(b), "layer_range": [2, 4]}]},
            ],
        },
        tmp_path / "out",
        progress=False,
    )
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert m.config.num_hidden_layers == 6 and len(m.model.layers) == 6
    with torch.inference_mode():
        logits = m(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_layer_types_are_rebuilt(tmp_path: Path) -> None:
    types = ["sliding_attention", "full_attention"] * 2
    a = write_llama(tmp_path / "a", llama_state(1), config=llama_config(4, layer_types=types))
    p = soupkit.plan(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [1, 4]}]},
                {"sources": [{"model": str(a), "layer_range": [1, 2]}]},
            ],
        }
    )
    assert p.config_updates == {
        "num_hidden_layers": 4,
        "layer_types": [types[1], types[2], types[3], types[1]],
    }


def test_passthrough_of_one_model_with_scale(tmp_path: Path) -> None:
    a, _ = _two_models(tmp_path)
    soupkit.merge(
        {
            "merge_method": "passthrough",
            "models": [
                {
                    "model": str(a),
                    "parameters": {"scale": [{"filter": "lm_head", "value": 0.5}, {"value": 1.0}]},
                }
            ],
        },
        tmp_path / "out",
        progress=False,
    )
    out, src = (
        load_file(str(tmp_path / "out" / "model.safetensors")),
        load_file(str(a / "model.safetensors")),
    )
    assert torch.equal(out["lm_head.weight"], src["lm_head.weight"] * 0.5)
    assert all(torch.equal(out[k], src[k]) for k in src if k != "lm_head.weight")


def test_passthrough_of_a_model_without_layers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"0.weight": torch.randn(3, 2), "0.bias": torch.randn(3), "steps": torch.tensor([7])}
    save_file(sd, str(tmp_path / "mlp.safetensors"))
    p = soupkit.plan(
        {"merge_method": "passthrough", "models": [{"model": str(tmp_path / "mlp.safetensors")}]}
    )
    assert sorted(j.name for j in p.jobs) == sorted(sd) and p.config_updates == {}
    with pytest.raises(ConfigError, match="has no numbered layers"):
        soupkit.plan(
            {
                "merge_method": "passthrough",
                "slices": [
                    {
                        "sources": [
                            {"model": str(tmp_path / "mlp.safetensors"), "layer_range": [0, 1]}
                        ]
                    }
                ],
            }
        )


def test_slice_errors_are_reported_together(tmp_path: Path) -> None:
    a, b = _two_models(tmp_path)
    with pytest.raises(ConfigError) as e:
        soupkit.plan(
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": str(a), "layer_range": [0, 6]},
                            {"model": str(b), "layer_range": [0, 4]},
                        ]
                    },
                    {"sources": [{"model": str(a), "layer_range": [2, 2]}]},
                ],
            }
        )
    msg = str(e.value)
    assert f"but {a} has 4 layer(s) (0..3); the end is exclusive" in msg
    assert "slices[0]: its sources span different numbers of layers (6, 4)" in msg
    assert "slices[1].sources[0].layer_range: [2, 2] is empty" in msg
    with pytest.raises(ConfigError, match="takes at most 1 source"):
        soupkit.plan(
            {
                "merge_method": "passthrough",
                "slices": [
                    {
                        "sources": [
                            {"model": str(a), "layer_range": [0, 2]},
                            {"model": str(b), "layer_range": [0, 2]},
                        ]
                    }
                ],
            }
        )
    with pytest.raises(ConfigError, match="the base model .* is not one of its sources"):
        soupkit.plan(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(a),
                "slices": [{"sources": [{"model": str(b), "layer_range": [0, 2]}]}],
            }
        )
    with pytest.raises(PlanError, match="no such file or folder"):
        soupkit.plan(
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": str(tmp_path / "nope"), "layer_range": [0, 2]}]}],
            }
        )


def test_task_vector_method_over_slices_uses_the_base_source_as_base(tmp_path: Path) -> None:
    base = llama_state(0)
    paths = [write_llama(tmp_path / "base", base)] + [
        write_llama(tmp_path / f"ft{i}", llama_state(i, base=base)) for i in (1, 2)
    ]
    src = [str(x) for x in paths]
    p = soupkit.plan(
        {
            "merge_method": "task_arithmetic",
            "base_model": src[0],
            "slices": [
                {
                    "sources": [
                        {"model": s, "layer_range": [0, 2], "parameters": {"weight": 0.5}}
                        for s in src
                    ]
                }
            ],
        }
    )
    job = next(j for j in p.jobs if j.name == "model.layers.1.mlp.up_proj.weight")
    assert len(job.inputs) == 2 and job.base is not None and job.base.file.parent == paths[0]  # type: ignore[union-attr]
    assert job.params.weight == (0.5, 0.5)  # type: ignore[union-attr]
    assert p.config_updates == {"num_hidden_layers": 2}


def test_tokenizer_source_is_verified(tmp_path: Path) -> None:
    a, b = _two_models(tmp_path)  # only a has a tokenizer
    r = {"merge_method": "linear", "models": [{"model": str(b)}, {"model": str(a)}]}
    assert soupkit.plan({**r, "tokenizer_source": str(a)}).carry_from == a
    assert soupkit.plan({**r, "base_model": str(a), "tokenizer_source": "base"}).carry_from == a
    with pytest.raises(
        ConfigError, match="tokenizer_source: 'base' but the recipe has no `base_model:`"
    ):
        soupkit.plan({**r, "tokenizer_source": "base"})
    with pytest.raises(ConfigError, match="has no tokenizer or config files"):
        soupkit.plan({**r, "tokenizer_source": str(tmp_path / "missing")})
    soupkit.merge({**r, "tokenizer_source": str(a)}, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()


def test_hub_ids_for_the_model_card() -> None:
    assert hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert (
        hub_id("/home/me/.cache/huggingface/hub/models--org--tiny-m/snapshots/0123abcd")
        == "org/tiny-m"
    )
    for local in ("./ft-a", "/data/ft", "ft-a", "runs/a/b", "../x/y", "a/model.safetensors"):
        assert hub_id(local) is None, local


def test_merged_folder_loads_in_transformers_with_card_and_report(
    tmp_path: Path, llamas: list[Path]
) -> None:
    transformers = pytest.importorskip("transformers")
    hub_like = tmp_path / "org" / "tiny-ft"
    write_llama(hub_like, llama_state(7))
    models = [*llamas, hub_like]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        rel = [str(m.relative_to(tmp_path)) for m in models]  # "m0", ..., "org/tiny-ft"
        soupkit.merge(
            {"merge_method": "linear", "models": [{"model": m} for m in rel]},
            "out",
            progress=False,
            max_shard_size="20KB",
        )
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and (
        out / "generation_config.json"
    ).is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2").input_ids == [4, 5] and model.generation_config.eos_token_id == 2
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # every input of the soup, not only the first; local paths are not Hub ids
    assert front["base_model"] == ["org/tiny-ft"] and front["tags"][:3] == [
        "merge",
        "soupkit",
        "linear",
    ]
    assert all(f"- `{m}`" in card for m in rel)
    report = json.loads((out / "soupkit-report.json").read_text())
    assert (
        report["recipe"]["merge_method"] == "linear"
        and report["soupkit_version"] == soupkit.__version__
    )
    assert all(len(f["sha256"]) == 64 for m in report["inputs"]["models"] for f in m["files"])
    assert all(len(o["sha256"]) == 64 for o in report["outputs"])
