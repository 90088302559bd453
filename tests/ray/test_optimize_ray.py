"""`soupkit.optimize` on a local Ray instance gives the study of a local run (same ``parallel``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip(
    "ray", reason="needs the ray extra: pip install 'soupkit[ray]' (make test installs it)"
)
if not hasattr(
    ray, "remote"
):  # tests/ray/ itself, found as a namespace package: ray is not installed
    pytest.skip(
        "needs the ray extra: pip install 'soupkit[ray]' (make test installs it)",
        allow_module_level=True,
    )
pytest.importorskip("optuna", reason="needs the optimize extra: pip install 'soupkit[optimize]'")

from soupkit import RayBackend, RemoteEvaluator  # noqa: E402
from soupkit.search.recipe_search import optimize  # noqa: E402

SEARCH = Path(__file__).parent.parent / "search"
sys.path.insert(0, str(SEARCH))
import optimize_toy as toy  # noqa: E402

pytestmark = pytest.mark.ray
TOY = str(SEARCH / "optimize_toy.py")


@pytest.fixture(scope="module")
def backend() -> Iterator[RayBackend]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayBackend(num_cpus=0.5, max_workers=2, max_retries=1) as be:
            yield be
    finally:
        ray.shutdown()


def test_optimize_on_ray_equals_the_local_search(tmp_path: Path, backend: RayBackend) -> None:
    paths = toy.ingredients(tmp_path / "ing")
    space = toy.space(paths)  # 4 models x 5 per-layer weights = 20 parameters

    def run(where: str, be: RayBackend | None) -> dict:
        r = optimize(
            space,
            RemoteEvaluator.from_spec(f"{TOY}:val"),
            tmp_path / where,
            trials=10,
            parallel=2,
            holdout_evaluator=RemoteEvaluator.from_spec(f"{TOY}:holdout"),
            seed=5,
            backend=be,
            progress=False,
            plot=False,
        )
        return {
            "trials": [(t.number, t.state, t.score, t.params) for t in r.trials],
            "top": [(t.number, t.score, t.holdout) for t in r.top],
            "distributed": r.distributed,
            "model": (r.model / "model.safetensors").read_bytes() if r.model else b"",
        }

    local, on_ray = run("local", None), run("ray", backend)
    assert on_ray["trials"] == local["trials"] and on_ray["top"] == local["top"]
    assert on_ray["model"] == local["model"]
    d = on_ray["distributed"]
    assert (
        d is not None and d["backend"] == "ray" and d["jobs"] >= 10 and local["distributed"] is None
    )
