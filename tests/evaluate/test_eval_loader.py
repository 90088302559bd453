from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from soupkit.errors import EvaluationError
from soupkit.evaluate import load_evaluator


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # load_evaluator puts the working directory on sys.path; keep that out of other tests.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


def _module(tmp_path: Path, body: str) -> str:
    name = f"user_eval_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return name


SCORE = """
    def score(state):
        return float(state["w"].sum())

    class Scorer:
        def __call__(self, state):
            return 1.0

    evaluator = Scorer()
    threshold = 0.5
"""


def test_module_function_from_current_directory(tmp_path: Path) -> None:
    fn = load_evaluator(f"{_module(tmp_path, SCORE)}:score")
    assert fn({"w": torch.ones(3)}) == 3.0


def test_file_path_and_dotted_attribute(tmp_path: Path) -> None:
    sub = tmp_path / "evals"
    sub.mkdir()
    (sub / "helper_mod.py").write_text("FACTOR = 10\n")
    (sub / "my_eval.py").write_text(
        "import helper_mod\n"  # a sibling of the file is importable, as with `python file.py`
        "class Box:\n    @staticmethod\n    def score(state):\n"
        "        return helper_mod.FACTOR * float(state['w'][0])\n"
    )
    fn = load_evaluator("evals/my_eval.py:Box.score")
    assert fn({"w": torch.tensor([0.25])}) == 2.5


def test_instance_is_accepted(tmp_path: Path) -> None:
    assert load_evaluator(f"{_module(tmp_path, SCORE)}:evaluator")({}) == 1.0


def test_spec_without_colon() -> None:
    with pytest.raises(
        EvaluationError, match=r"expected 'package.module:name' or 'path/to/file.py:name'"
    ):
        load_evaluator("my_eval.score")


def test_missing_module() -> None:
    with pytest.raises(
        EvaluationError, match=r"(?s)no module named 'no_such_module_xyz'.*\nhint: run soupkit"
    ):
        load_evaluator("no_such_module_xyz:score")


def test_module_whose_dependency_is_missing(tmp_path: Path) -> None:
    name = _module(tmp_path, "import not_installed_dep_xyz\n")
    with pytest.raises(
        EvaluationError, match=r"imports 'not_installed_dep_xyz', which is not installed"
    ):
        load_evaluator(f"{name}:score")


def test_module_that_raises_on_import(tmp_path: Path) -> None:
    name = _module(tmp_path, "raise ValueError('val.csv not found')\n")
    with pytest.raises(EvaluationError, match=r"raised ValueError: val.csv not found"):
        load_evaluator(f"{name}:score")


def test_file_that_raises_on_import(tmp_path: Path) -> None:
    (tmp_path / "bad_file.py").write_text("1 / 0\n")
    with pytest.raises(EvaluationError, match=r"running 'bad_file.py' raised ZeroDivisionError"):
        load_evaluator("bad_file.py:score")


def test_missing_file() -> None:
    with pytest.raises(EvaluationError, match=r"file 'nowhere/eval.py' does not exist"):
        load_evaluator("nowhere/eval.py:score")


def test_missing_attribute_suggests_close_names(tmp_path: Path) -> None:
    name = _module(tmp_path, SCORE)
    with pytest.raises(
        EvaluationError, match=r"has no attribute 'scor'\nhint: did you mean 'score'"
    ):
        load_evaluator(f"{name}:scor")


def test_class_is_refused_with_a_hint(tmp_path: Path) -> None:
    name = _module(tmp_path, SCORE)
    with pytest.raises(
        EvaluationError, match=r"(?s)'Scorer' is a class.*evaluator = Scorer\(\.\.\.\)"
    ):
        load_evaluator(f"{name}:Scorer")


def test_non_callable_is_refused(tmp_path: Path) -> None:
    name = _module(tmp_path, SCORE)
    with pytest.raises(EvaluationError, match=r"'threshold' is a float, which is not callable"):
        load_evaluator(f"{name}:threshold")
