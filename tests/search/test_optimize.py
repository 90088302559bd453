"""`soupkit optimize`: the search space, resumption after a kill, the written recipe, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optimize_toy as toy
import pytest
import torch
import yaml
from safetensors.torch import load_file

from soupkit.errors import ConfigError, UsageError

optuna = pytest.importorskip(
    "optuna", reason="needs the optimize extra: pip install 'soupkit[optimize]'"
)

from soupkit.cli import main  # noqa: E402
from soupkit.recipe.schema import load_recipe  # noqa: E402
from soupkit.search.recipe_search import explicit_per_model_defaults, load_space, optimize  # noqa: E402

HERE = Path(__file__).parent
TOY = str(HERE / "optimize_toy.py")


@pytest.fixture(scope="module")
def ings(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return toy.ingredients(tmp_path_factory.mktemp("ing"))


def trials_of(r: Any) -> list[tuple[int, str, float, dict[str, Any]]]:
    return [(t.number, t.state, t.score, t.params) for t in r.trials]


# --------------------------------------------------------------------------- the space


def test_space_ranges_gradients_conditionals_and_choices_become_recipes(ings: list[Path]) -> None:
    sp = load_space(
        {
            "merge_method": "linear",
            "models": [
                {
                    "model": str(ings[0]),
                    "parameters": {"weight": {"min": 0, "max": 1, "points": 3}},
                },
                {
                    "model": str(ings[1]),
                    "parameters": {"weight": [0.5, {"min": 0.1, "max": 2, "log": True}]},
                },
                {
                    "model": str(ings[2]),
                    "parameters": {
                        "weight": [
                            {"filter": "head", "value": {"choice": [0.25, 0.75]}},
                            {"value": 1.0},
                        ]
                    },
                },
            ],
            "parameters": {"normalize": {"choice": [True, False]}},
        }
    )
    assert [d.name for d in sp.dims] == [
        "parameters.normalize",
        "models[0].weight[0]",
        "models[0].weight[1]",
        "models[0].weight[2]",
        "models[1].weight[1]",
        "models[2].weight[0].value",
    ]
    params = {
        "parameters.normalize": False,
        "models[0].weight[0]": 0.1,
        "models[0].weight[1]": 0.2,
        "models[0].weight[2]": 0.3,
        "models[1].weight[1]": 1.5,
        "models[2].weight[0].value": 0.75,
    }
    data = sp.sample(optuna.trial.FixedTrial(params))
    assert data["parameters"] == {"normalize": False}
    assert [m["parameters"] for m in data["models"]] == [
        {"weight": [0.1, 0.2, 0.3]},
        {"weight": [0.5, 1.5]},
        {"weight": [{"filter": "head", "value": 0.75}, {"value": 1.0}]},
    ]
    assert sp.recipe(data).models[1].parameters["weight"] == [0.5, 1.5]


def test_method_choice_samples_a_parameter_only_for_the_methods_that_take_it(
    ings: list[Path],
) -> None:
    sp = load_space(
        {
            "merge_method": {"choice": ["linear", "ties"]},
            "base_model": str(ings[3]),
            "models": [{"model": str(p)} for p in ings[:2]],
            "parameters": {"density": {"min": 0.2, "max": 0.9}, "lambda": 1.0},
        }
    )
    lin = sp.sample(optuna.trial.FixedTrial({"merge_method": "linear"}))
    assert lin["merge_method"] == "linear" and "parameters" not in lin
    ties = sp.sample(optuna.trial.FixedTrial({"merge_method": "ties", "parameters.density": 0.4}))
    assert ties["parameters"] == {"density": 0.4, "lambda": 1.0}


def test_space_problems_are_reported_together_before_any_trial(ings: list[Path]) -> None:
    with pytest.raises(ConfigError) as e:
        load_space(
            {
                "merge_method": {"choice": ["linear", "ties"]},
                "models": [
                    {"model": str(ings[0]), "parameters": {"weight": {"min": 1, "max": 0}}},
                    {"model": str(ings[1]), "parameters": {"weight": {"min": 0, "maxx": 1}}},
                ],
                "parameters": {
                    "alpha": {"min": 0, "max": 1},
                    "density": {"min": 0, "max": 1, "log": True},
                },
            }
        )
    text = str(e.value)
    assert "models[0].weight: range min 1 is not below max 0" in text
    assert "models[1].weight: unknown range key 'maxx'; did you mean 'max'?" in text
    assert "parameters.alpha: none of the methods linear, ties takes parameter 'alpha'" in text
    assert "parameters.density: a log range needs min > 0, got 0" in text
    with pytest.raises(ConfigError, match=r"the range \[0, 1\] is not a whole number of steps 0.3"):
        load_space(
            {
                "merge_method": "linear",
                "models": [{"model": str(ings[0])}],
                "parameters": {"weight": {"min": 0, "max": 1, "step": 0.3}},
            }
        )
    with pytest.raises(ConfigError, match="nothing to search"):
        load_space({"merge_method": "linear", "models": [{"model": str(p)} for p in ings[:2]]})
    with pytest.raises(
        ConfigError, match="with merge_method linear and every range at its middle value"
    ):
        load_space(
            {
                "merge_method": "linear",
                "models": [{"model": str(ings[0]) + "-missing"}],
                "parameters": {"weight": {"min": 0, "max": 1}},
            }
        )


def test_a_space_whose_middle_is_refused_but_other_points_are_not_is_accepted(
    ings: list[Path],
) -> None:
    """{choice: [0, 1]} weights with normalize: all-zero trials fail, the space does not."""
    sp = load_space(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(p), "parameters": {"weight": {"choice": [0, 1]}}} for p in ings[:3]
            ],
            "parameters": {"normalize": True},
        }
    )
    assert len(sp.dims) == 3


def test_the_best_recipe_writes_the_per_model_defaults_mergekit_requires(ings: list[Path]) -> None:
    cfg = explicit_per_model_defaults(
        load_recipe(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(ings[0]),
                "models": [
                    {"model": str(ings[1])},
                    {"model": str(ings[2]), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    assert [m.parameters for m in cfg.models] == [{"weight": 1.0}, {"weight": 0.5}]
    both = load_recipe(
        {
            "merge_method": "linear",
            "parameters": {"weight": 0.3},
            "models": [{"model": str(ings[1])}, {"model": str(ings[2])}],
        }
    )
    assert [m.parameters for m in explicit_per_model_defaults(both).models] == [
        {},
        {},
    ]  # global wins


# --------------------------------------------------------------------------- the search


def test_search_of_20_per_layer_weights_resumes_after_a_kill_to_the_same_trials(
    tmp_path: Path, ings: list[Path]
) -> None:
    """Killed (SIGKILL, mid-evaluation) and run again, the study is trial for trial the study of
    an uninterrupted run: same parameters, scores, states; so the same best trial and recipe."""
    space = toy.space(ings)
    assert len(load_space(space).dims) == 20
    n = 16
    ref = optimize(
        space,
        toy.Accuracy("val"),
        tmp_path / "ref",
        trials=n,
        holdout_evaluator=toy.Accuracy("holdout"),
        seed=3,
        progress=False,
        plot=False,
    )
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import optimize_toy as toy
        from soupkit.search.recipe_search import optimize
        optimize({str(tmp_path / "space.yaml")!r}, toy.Accuracy("val", kill_at=int(sys.argv[1])), {str(tmp_path / "run")!r},
                 trials={n}, holdout_evaluator=toy.Accuracy("holdout"), seed=3, progress=False, plot=False,
                 cache={str(tmp_path / "scores.jsonl")!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", script, "11"], env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    study = optuna.load_study(
        study_name="soupkit-optimize", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    )
    states = [t.state.name for t in study.get_trials()]
    assert states[-1] == "RUNNING" and 5 <= len(states) < n and "FAIL" not in states
    assert not (tmp_path / "run" / "report.json").exists()  # nothing that looks finished
    again = subprocess.run(
        [sys.executable, "-c", script, "0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["study"]["adopted_running_trials"] == 1
    got = [(t["number"], t["state"], t["score"], t["params"]) for t in report["trials"]]
    assert got == trials_of(ref)
    assert (
        report["best"]["number"] == ref.best.number
        and report["best"]["holdout"] == ref.best.holdout
    )
    assert yaml.safe_load((tmp_path / "run" / "best-recipe.yaml").read_text()) == yaml.safe_load(
        (tmp_path / "ref" / "best-recipe.yaml").read_text()
    )
    assert any(t.state == "pruned" for t in ref.trials)  # early rejection was used as pruning


def test_best_recipe_runs_unchanged_in_merge_and_gives_the_evaluated_model_bit_for_bit(
    tmp_path: Path, ings: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, torch.Tensor]] = []

    class Recording(toy.Accuracy):
        def evaluate(self, state: Any, **kw: Any) -> Any:
            seen.append({k: v.clone() for k, v in state.items()})
            return super().evaluate(state, **kw)

    ev = Recording("val")
    r = optimize(
        toy.space(ings, points=2),
        ev,
        tmp_path / "opt",
        trials=6,
        prune=False,
        seed=1,
        progress=False,
    )
    assert r.model is not None and (r.model / "model.safetensors").is_file()
    written = load_file(str(r.model / "model.safetensors"))
    best_state = seen[[t.number for t in r.trials].index(r.best.number)]
    assert written.keys() == best_state.keys() and all(
        torch.equal(written[k], best_state[k]) for k in written
    )
    monkeypatch.chdir(tmp_path)
    assert (
        main(["merge", str(tmp_path / "opt" / "best-recipe.yaml"), "again", "--no-progress"]) == 0
    )
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], written[k]) for k in written)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        r.model / "model.safetensors"
    ).read_bytes()
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert report["trials_finished"] == 6 and len(report["top"]) == 5
    assert {p.name for p in r.plots} == {"history.png", "coefficients.png"}
    assert report["coefficients"]["layers"] == ["0", "1", "2", "3", "4", "other"]


def test_a_repeated_candidate_is_free_and_a_resumed_study_only_adds_trials(
    tmp_path: Path, ings: list[Path]
) -> None:
    space = {
        "merge_method": "linear",
        "models": [{"model": str(p)} for p in ings],
        "parameters": {"weight": {"choice": [0.5, 1.0]}},
    }  # one recipe only: weights normalised
    ev = toy.Accuracy("val")
    r = optimize(space, ev, tmp_path / "o", trials=4, progress=False, plot=False, write_model=False)
    assert r.evaluations <= 2 and r.evaluations + r.cache_hits == 4 and ev.calls == r.evaluations
    r2 = optimize(
        space, ev, tmp_path / "o", trials=6, progress=False, plot=False, write_model=False
    )
    assert len(r2.trials) == 6 and [t.number for t in r2.trials[:4]] == [0, 1, 2, 3]


def test_budget_study_mismatch_and_missing_optuna_are_clear_errors(
    tmp_path: Path, ings: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    space = toy.space(ings, points=1)
    with pytest.raises(UsageError, match="needs a budget"):
        optimize(space, toy.Accuracy("val"), tmp_path / "o")
    optimize(
        space,
        toy.Accuracy("val"),
        tmp_path / "o",
        trials=2,
        progress=False,
        plot=False,
        write_model=False,
    )
    with pytest.raises(UsageError, match=r"made with another setup \(seed: stored 0, now 1\)"):
        optimize(space, toy.Accuracy("val"), tmp_path / "o", trials=3, seed=1, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="holds no study"):
        optimize(space, toy.Accuracy("val"), tmp_path / "full", trials=2)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(UsageError, match=r"pip install 'soupkit\[optimize\]'"):
        optimize(space, toy.Accuracy("val"), tmp_path / "p", trials=2)


def test_cli_optimize_writes_the_outputs_and_exits_2_on_a_bad_space(
    tmp_path: Path,
    ings: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(toy.space(ings, points=2)))
    assert (
        main(
            [
                "optimize",
                "space.yaml",
                "--evaluator",
                f"{TOY}:val",
                "--holdout-evaluator",
                f"{TOY}:holdout",
                "--trials",
                "5",
                "--out",
                "opt",
                "--no-cache",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "validation    held-out" in out and "best of 5 finished trials" in out
    assert {
        "best-recipe.yaml",
        "report.json",
        "history.png",
        "coefficients.png",
        "model",
        "study.db",
    } <= {p.name for p in (tmp_path / "opt").iterdir()}
    (tmp_path / "bad.yaml").write_text(
        "merge_method: linear\nmodels: [{model: x, parameters: {weight: {min: 2, max: 1}}}]\n"
    )
    assert (
        main(["optimize", "bad.yaml", "--evaluator", f"{TOY}:val", "--trials", "5", "--out", "b"])
        == 2
    )
    assert "range min 2 is not below max 1" in capsys.readouterr().err
    assert main(["optimize", "space.yaml", "--evaluator", f"{TOY}:val", "--out", "b"]) == 2
    assert "give a budget" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["cmaes", "random"])
def test_every_sampler_runs_a_method_choice_with_density_and_is_deterministic(
    tmp_path: Path, ings: list[Path], sampler: str
) -> None:
    space = {
        "merge_method": {"choice": ["linear", "ties"]},
        "base_model": str(ings[3]),
        "models": [
            {"model": str(p), "parameters": {"weight": {"min": 0.1, "max": 1}}} for p in ings[:3]
        ],
        "parameters": {"density": {"min": 0.2, "max": 1.0}},
    }
    runs = [
        optimize(
            space,
            toy.Accuracy("val"),
            tmp_path / f"{sampler}{k}",
            trials=8,
            sampler=sampler,
            seed=2,
            progress=False,
            plot=False,
            write_model=False,
        )
        for k in range(2)
    ]
    assert trials_of(runs[0]) == trials_of(runs[1])
    methods_seen = {t.params["merge_method"] for t in runs[0].trials}
    assert methods_seen == {"linear", "ties"}
    for t in runs[0].trials:
        assert ("parameters.density" in t.params) == (t.params["merge_method"] == "ties")


def test_a_refused_point_fails_only_its_trial_with_the_reason(
    tmp_path: Path, ings: list[Path]
) -> None:
    # every weight on the {0, 0.5} grid: the all-zero point cannot be normalised
    space = {
        "merge_method": "linear",
        "parameters": {"normalize": True},
        "models": [
            {"model": str(p), "parameters": {"weight": {"choice": [0.5, 0.0]}}} for p in ings[:2]
        ],
    }
    r = optimize(
        space,
        toy.Accuracy("val"),
        None,
        storage=str(tmp_path / "s.db"),
        trials=6,
        sampler="random",
        seed=0,
        progress=False,
    )
    study = optuna.load_study(
        study_name="soupkit-optimize", storage=f"sqlite:///{tmp_path / 's.db'}"
    )
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert r.failed == len(failed) >= 1 and len(r.trials) == 6
    assert "weights sum to zero" in failed[0].user_attrs["error"]
    assert any("recorded as failed" in n for n in r.notes)


def test_a_new_study_starts_at_the_middle_of_every_range(tmp_path: Path, ings: list[Path]) -> None:
    space = {
        "merge_method": "linear",
        "parameters": {"normalize": True},
        "models": [
            {"model": str(p), "parameters": {"weight": {"min": 0, "max": 1.5, "step": 0.5}}}
            for p in ings
        ],
    }
    r = optimize(
        space,
        toy.Accuracy("val"),
        tmp_path / "o",
        trials=2,
        progress=False,
        plot=False,
        write_model=False,
    )
    assert r.trials[0].params == {
        f"models[{i}].weight": 1.0 for i in range(4)
    }  # 0.75 on the 0.5 grid
    off = optimize(
        space,
        toy.Accuracy("val"),
        tmp_path / "p",
        trials=1,
        start_at_middle=False,
        progress=False,
        plot=False,
        write_model=False,
    )
    assert off.trials[0].params != r.trials[0].params
