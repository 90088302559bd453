"""Hub ids (``owner/name[@revision]``) in recipes, the CLI and the Python API, resolved with
``huggingface_hub``: downloaded from a stand-in Hub on loopback (`hub_server.Hub`, ``HF_ENDPOINT``),
then merged again from the cache that ``huggingface_hub`` itself laid out, with
``HF_HUB_OFFLINE=1``: the same bytes. Only safetensors, the index and the carried files are
fetched. Every run is a subprocess with its own environment, because ``huggingface_hub`` reads
``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import soupkit
from soupkit.errors import UsageError
from soupkit.io.hub import parse_hub_ref
from soupkit.io.output import save_state_dict

from .eco_helpers import llama_config, llama_state
from .hub_server import Hub, Repo

pytest.importorskip("huggingface_hub")

SRC = Path(soupkit.__file__).resolve().parents[1]
CARRIED = {
    "config.json": json.dumps(llama_config(4)).encode(),
    "tokenizer_config.json": b'{"model_max_length": 64}',
    "generation_config.json": b'{"bos_token_id": 1}',
}
DECOYS = {
    "pytorch_model.bin": b"PICKLE" * 10,
    "modeling_evil.py": b"import os\n",
    "README.md": b"# card\n",
    "consolidated.safetensors": b"not fetched",
}


def model_files(
    tmp: Path, seed: int, *, shard: str = "5GB", carried: bool = True
) -> dict[str, bytes]:
    folder = tmp / f"w{seed}-{shard}"
    if not folder.exists():
        save_state_dict(llama_state(seed), folder, max_shard_size=shard)
    return {**Repo.from_folder(folder), **(CARRIED if carried else {})}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("hub-src")
    base, a, b, nosafe = Repo(), Repo(), Repo(), Repo()
    base.add_commit(model_files(tmp, 0), "main")
    a.add_commit({**model_files(tmp, 1, shard="20KB"), **DECOYS}, "main")
    b.add_commit(model_files(tmp, 3, carried=False), "v0")
    b.add_commit(model_files(tmp, 2, carried=False), "main", "v1")
    nosafe.add_commit({"pytorch_model.bin": b"x", **CARRIED}, "main")
    with Hub({"org/base": base, "org/tiny-a": a, "org/tiny-b": b, "org/pickles": nosafe}) as h:
        yield h


def env(home: Path, hub: Hub | None, *, offline: bool) -> dict[str, str]:
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        and k != "TRANSFORMERS_OFFLINE"
    }
    e |= {
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    e["HF_ENDPOINT"] = (
        hub.endpoint if hub is not None else "http://127.0.0.1:9"
    )  # port 9: nothing listens
    return e


def soupkit_cli(
    args: list[str], home: Path, hub: Hub | None, *, offline: bool, cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "soupkit.cli", *args],
        env=env(home, hub, offline=offline),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_recipe(tmp: Path, base_rev: str) -> Path:
    r = tmp / "hub.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": f"org/base@{base_rev}",
                "models": [
                    {"model": "org/tiny-a", "parameters": {"weight": 0.5}},
                    {"model": "org/tiny-b@v1", "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    return r


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "soupkit-report.json"
    }


def test_online_then_offline_from_the_cache_huggingface_hub_laid_out(
    tmp_path: Path, hub: Hub
) -> None:
    home = tmp_path / "hf"
    base_sha = hub.repos["org/base"].refs["main"]
    r = write_recipe(tmp_path, base_sha)
    hub.log.clear()
    online = soupkit_cli(
        ["merge", str(r), str(tmp_path / "online"), "--no-progress"],
        home,
        hub,
        offline=False,
        cwd=tmp_path,
    )
    assert online.returncode == 0, online.stderr
    shards_a = sorted(
        n
        for n in hub.repos["org/tiny-a"].commits[hub.repos["org/tiny-a"].refs["main"]]
        if n.startswith("model-")
    )
    assert len(shards_a) > 1
    # exactly the weights, the index and the carried files: no pickle, no code, no README, no extra copy
    assert hub.fetched() == sorted(
        [f"org/base:{n}" for n in ["model.safetensors", *CARRIED]]
        + [f"org/tiny-a:{n}" for n in ["model.safetensors.index.json", *shards_a, *CARRIED]]
        + ["org/tiny-b:model.safetensors"]
    )
    assert any(
        m == "GET" and p.startswith("/api/models/org/tiny-b/revision/v1") for m, p in hub.log
    )
    assert (
        home / "hub" / "models--org--tiny-b" / "refs" / "v1"
    ).is_file()  # laid out by huggingface_hub

    # again, network allowed: the cache is complete, so nothing is asked of the Hub
    hub.log.clear()
    again = soupkit_cli(
        ["merge", str(r), str(tmp_path / "again"), "--no-progress"],
        home,
        hub,
        offline=False,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert hub.log == []

    # offline, from the cache huggingface_hub wrote: the same bytes, and no request at all
    offline = soupkit_cli(
        ["merge", str(r), str(tmp_path / "offline"), "--no-progress"],
        home,
        None,
        offline=True,
        cwd=tmp_path,
    )
    assert offline.returncode == 0, offline.stderr
    assert hub.log == []
    assert (
        files_of(tmp_path / "online")
        == files_of(tmp_path / "offline")
        == files_of(tmp_path / "again")
    )

    # the same bytes as merging the very same files from local folders
    local = {}
    for repo, rev in [("org/base", "main"), ("org/tiny-a", "main"), ("org/tiny-b", "v1")]:
        folder = tmp_path / "local" / repo
        folder.mkdir(parents=True)
        rp = hub.repos[repo]
        for n, d in rp.commits[rp.refs[rev]].items():
            (folder / n).write_bytes(d)
        local[repo] = str(folder)
    res = soupkit.merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": local["org/base"],
            "models": [
                {"model": local["org/tiny-a"], "parameters": {"weight": 0.5}},
                {"model": local["org/tiny-b"], "parameters": {"weight": 0.5}},
            ],
        },
        tmp_path / "from-local",
        progress=False,
        model_card=False,
    )
    got = files_of(tmp_path / "offline")
    for name, data in files_of(res.out).items():
        assert got[name] == data, name

    # the report: resolved commits and the Hub's ETags (sha256 of the weights)
    rep = json.loads((tmp_path / "online" / "soupkit-report.json").read_text())
    base = rep["inputs"]["base"]
    assert base["label"] == f"org/base@{base_sha}"
    assert base["hub"]["repo_id"] == "org/base" and base["hub"]["commit"] == base_sha
    assert base["hub"]["revision"] == base_sha and base["hub"]["source"] == "downloaded"
    etags = {f["file"]: f["etag"] for f in base["hub"]["files"]}
    weights = hub.repos["org/base"].commits[base_sha]["model.safetensors"]
    assert (
        etags["model.safetensors"]
        == hashlib.sha256(weights).hexdigest()
        == base["files"][0]["sha256"]
    )
    assert set(etags) == {"model.safetensors", *CARRIED}
    tb = rep["inputs"]["models"][1]["hub"]
    assert (tb["revision"], tb["commit"]) == ("v1", hub.repos["org/tiny-b"].refs["v1"])
    rep_off = json.loads((tmp_path / "offline" / "soupkit-report.json").read_text())
    assert rep_off["inputs"]["base"]["hub"]["source"] == "cache"
    assert rep_off["inputs"]["base"]["hub"]["files"] == base["hub"]["files"]

    # the card: Hub ids for the model tree, the commits in the body
    card = (tmp_path / "online" / "README.md").read_text()
    assert "base_model:\n- org/base\n- org/tiny-a\n- org/tiny-b\n" in card
    assert f"- base: `org/base@{base_sha}` (Hub commit `{base_sha}`)" in card


def test_plan_and_python_api_with_a_tag(tmp_path: Path, hub: Hub) -> None:
    home = tmp_path / "hf"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/tiny-b@v0\n")
    p = soupkit_cli(["plan", str(recipe)], home, hub, offline=False, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    v0 = hub.repos["org/tiny-b"].refs["v0"]
    assert (
        f"org/tiny-b@v0: Hub model org/tiny-b at commit {v0}, downloaded into the Hugging Face cache"
        in p.stdout
    )
    code = (
        "import soupkit, sys; r = soupkit.merge({'merge_method': 'linear', 'models': [{'model': 'org/tiny-b@v0'}]}, "
        "sys.argv[1], progress=False); print(r.plan.models[0].hub.commit)"
    )
    api = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "api")],
        env=env(home, None, offline=True),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert api.returncode == 0, api.stderr
    assert api.stdout.strip() == v0
    from safetensors.torch import load_file

    out = load_file(tmp_path / "api" / "model.safetensors")
    assert all(
        bool((out[k] == v).all()) for k, v in llama_state(3).items()
    )  # v0's weights, not main's
    ins = soupkit_cli(["inspect", "org/tiny-b@v0"], home, None, offline=True, cwd=tmp_path)
    assert ins.returncode == 0, ins.stderr
    assert "org/tiny-b@v0: 39 tensors in 1 file(s)" in ins.stdout
    assert (
        f"note: org/tiny-b@v0: Hub model org/tiny-b at commit {v0}, from the Hugging Face cache"
        in ins.stdout
    )


def test_offline_and_not_cached(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/never-seen@v2\n")
    res = soupkit_cli(["validate", str(recipe)], tmp_path / "hf", None, offline=True, cwd=tmp_path)
    assert res.returncode == 2
    assert (
        "org/never-seen@v2: no such file or folder, and Hub model org/never-seen@v2 is not (completely) "
        "in the Hugging Face cache"
    ) in res.stderr
    assert "HF_HUB_OFFLINE is set, so it was not downloaded" in res.stderr
    assert (
        "hint: unset HF_HUB_OFFLINE to download it" in res.stderr and "Traceback" not in res.stderr
    )


def test_hub_errors_are_named(tmp_path: Path, hub: Hub) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n  - model: org/nope\n  - model: org/tiny-b@v9\n"
        "  - model: org/pickles\n"
    )
    res = soupkit_cli(["validate", str(recipe)], tmp_path / "hf", hub, offline=False, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    err = res.stderr
    assert (
        f"org/nope: no such file or folder, and no model org/nope on the Hub ({hub.endpoint})"
        in err
    )
    assert "org/tiny-b@v9: Hub model org/tiny-b has no revision 'v9'" in err
    assert (
        "org/pickles: Hub model org/pickles (commit " in err and "has no safetensors weights" in err
    )
    assert not any(p.endswith("pytorch_model.bin") for m, p in hub.log if m == "GET")
    assert "Traceback" not in err
    down = soupkit_cli(
        ["validate", str(recipe)], tmp_path / "hf2", None, offline=False, cwd=tmp_path
    )
    assert down.returncode == 2
    assert (
        "org/nope: no such file or folder; the Hub (http://127.0.0.1:9) could not be reached"
        in down.stderr
    )


def test_a_local_path_wins(tmp_path: Path, hub: Hub) -> None:
    folder = tmp_path / "org" / "tiny-a"
    save_state_dict(llama_state(7), folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/tiny-a\n")
    hub.log.clear()
    res = soupkit_cli(["plan", str(recipe)], tmp_path / "hf", hub, offline=False, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert hub.log == [] and "Hub model" not in res.stdout


def test_missing_extra_gives_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(UsageError) as e:
        soupkit.open_checkpoint("org/some-model")
    msg = str(e.value)
    assert msg.startswith(
        "org/some-model: no such file or folder; read as a Hub id, it needs the "
        "'huggingface_hub' package, which is not installed"
    )
    assert msg.endswith("\nhint: pip install 'soupkit[hub]'")


def test_parse_hub_ref() -> None:
    assert parse_hub_ref("org/name") == ("org/name", None)
    assert parse_hub_ref("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_ref("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in (
        "./org/name",
        "/abs/path",
        "name",
        "org/name/sub",
        "org/w.safetensors",
        "org/..",
        "../x",
        "~/m",
        "org/name@",
        "org/name@../x",
        "org/recipe.yaml",
    ):
        assert parse_hub_ref(not_an_id) is None, not_an_id
