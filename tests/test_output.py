"""The one output-folder writer (`soupkit.io.output`): what every model folder soupkit writes
goes through, whoever writes it (merges, multi-output merges, LoRA, state dicts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toymodels import tiny_state, write_model

import soupkit
from soupkit.errors import OutputExistsError, UsageError
from soupkit.io.carry import first_carried, updated_config
from soupkit.io.checkpoint import open_checkpoint
from soupkit.io.output import (
    REPORT_NAME,
    OutputWriter,
    ShardFiles,
    json_bytes,
    run_fingerprint,
    save_state_dict,
)
from soupkit.io.writer import OutputTensor, layout_shards


def _shards(state: dict[str, torch.Tensor], limit: int) -> list:  # type: ignore[type-arg]
    outs = [OutputTensor(n, "F32", tuple(t.shape)) for n, t in state.items()]
    return layout_shards(outs, limit)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"w{i}": torch.randn(4, 5, generator=g) for i in range(5)}


def test_writer_writes_shards_index_files_and_report_then_appears(tmp_path: Path) -> None:
    state = _state()
    shards = _shards(state, 200)
    assert len(shards) > 1
    src = write_model(tmp_path / "src", {"x": torch.zeros(1)})
    dest = tmp_path / "out"
    with OutputWriter(dest) as out:
        hashes = out.write_tensors(shards, lambda o: state[o.name])
        out.record_index()
        carried = out.carry(first_carried([None, src]))
        card = out.write_card("# card\n")
        out.write("extra.txt", b"x")
        out.write_report({"outputs": hashes, "others": out.others})
        assert not dest.exists()  # nothing appears before the block ends
    files = {p.name for p in dest.iterdir()}
    assert files == {
        *hashes,
        "model.safetensors.index.json",
        "config.json",
        "tokenizer_config.json",
        "README.md",
        "extra.txt",
        REPORT_NAME,
    }
    for name, sha in {**hashes, **out.others}.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == sha
    assert list(out.others) == [
        "model.safetensors.index.json",
        "config.json",
        "tokenizer_config.json",
        "README.md",
        "extra.txt",
    ]
    assert carried == {k: out.others[k] for k in ("config.json", "tokenizer_config.json")}
    assert card == hashlib.sha256(b"# card\n").hexdigest()
    report = (dest / REPORT_NAME).read_bytes()
    assert report == json_bytes({"outputs": hashes, "others": out.others})
    loaded: dict[str, torch.Tensor] = {}
    for name in hashes:
        loaded.update(load_file(str(dest / name)))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    state = _state()

    def produce(o: OutputTensor) -> torch.Tensor:
        if o.name == "w3":
            raise RuntimeError("boom")
        return state[o.name]

    with pytest.raises(RuntimeError, match="boom"), OutputWriter(tmp_path / "out") as out:
        out.write_tensors(_shards(state, 200), produce)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_output_inputs_and_bad_extra_names(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", tiny_state(0))
    ck = open_checkpoint(model)
    with pytest.raises(UsageError, match="holds input"):
        OutputWriter(tmp_path, inputs=[ck], force=True)
    with pytest.raises(UsageError, match="inside the input model folder"):
        OutputWriter(model / "sub", inputs=[ck])
    with pytest.raises(UsageError, match="where the config and tokenizer files come from"):
        OutputWriter(tmp_path / "c", carry_from=tmp_path / "c" / "deeper")
    with pytest.raises(OutputExistsError):
        OutputWriter(model)
    for bad in ("../x", REPORT_NAME, "README.md", "a/b"):
        with pytest.raises(UsageError, match="plain file name"):
            OutputWriter(tmp_path / "o", extra_names=[bad])
    assert (model / "model.safetensors").is_file()


def test_shard_files_skip_finished_shards_and_resume_journal(tmp_path: Path) -> None:
    """A resumable writer keeps its partial folder on failure; the next run verifies the
    finished shards by sha256 and writes only the rest, with the same bytes."""
    state = _state()
    shards = _shards(state, 200)
    key = run_fingerprint(tmp_path / "out", {"what": 1}, shards)
    with pytest.raises(KeyboardInterrupt), OutputWriter(tmp_path / "out", fingerprint=key) as out:
        done, journal = out.resume(shards)
        assert done == {} and journal is not None
        files = ShardFiles(out.tmp, shards, journal=journal)
        for o in shards[0].tensors:
            files.write(o, state[o.name].reshape(-1), 0)
        raise KeyboardInterrupt
    with OutputWriter(tmp_path / "out", fingerprint=key) as out:
        done, journal = out.resume(shards)
        assert list(done) == [shards[0].filename]
        files = ShardFiles(out.tmp, shards, done=done, journal=journal)
        assert files.skip == {o.name for o in shards[0].tensors}
        for s in shards[1:]:
            for o in s.tensors:
                files.write(o, state[o.name].reshape(-1), 0)
        files.close()
    with OutputWriter(tmp_path / "ref") as out:
        ref = out.write_tensors(shards, lambda o: state[o.name])
    assert files.hashes == ref
    for name in ref:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_fingerprint_depends_on_every_part(tmp_path: Path) -> None:
    shards = _shards(_state(), 200)
    a = run_fingerprint(tmp_path / "o", {"recipe": 1}, shards)
    assert a == run_fingerprint(tmp_path / "o", {"recipe": 1}, shards)
    assert a != run_fingerprint(tmp_path / "p", {"recipe": 1}, shards)
    assert a != run_fingerprint(tmp_path / "o", {"recipe": 2}, shards)
    assert a != run_fingerprint(tmp_path / "o", {"recipe": 1}, shards[:1])


def test_config_rewrite_dtype_and_updates() -> None:
    data = json.dumps({"torch_dtype": "float32", "n_layers": 4}).encode()
    got = json.loads(updated_config(Path("c"), data, {"n_layers": 2}, "bfloat16"))
    assert got == {"torch_dtype": "bfloat16", "n_layers": 2}
    assert updated_config(Path("c"), data, {}, "float32") == data  # nothing to change: as is
    newer = json.dumps({"dtype": "float32"}).encode()
    assert json.loads(updated_config(Path("c"), newer, {}, "float16")) == {
        "dtype": "float16",
        "torch_dtype": "float16",
    }


def test_save_state_dict_refuses_bad_extra_name_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="plain file name"):
        save_state_dict({"a": torch.zeros(2)}, tmp_path / "o", extra_files={"../x": b""})
    assert list(tmp_path.iterdir()) == []


def test_lora_output_may_not_be_an_input(tmp_path: Path) -> None:
    """The LoRA writers share the merges' rule: an output never replaces or holds an input."""
    base = write_model(tmp_path / "base", tiny_state(0))
    ft_state = {
        k: (v + 0.01 * torch.ones_like(v) if v.is_floating_point() else v)
        for k, v in tiny_state(0).items()
    }
    ft = write_model(tmp_path / "ft", ft_state)
    soupkit.extract_lora(ft, base, tmp_path / "ad", rank=2, progress=False)
    before = (base / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="holds input"):
        soupkit.fold_lora(tmp_path / "ad", base, base, force=True, progress=False)
    with pytest.raises(UsageError, match="holds input"):
        soupkit.fold_lora(tmp_path / "ad", base, tmp_path / "ad", force=True, progress=False)
    with pytest.raises(UsageError, match="holds input"):
        soupkit.extract_lora(ft, base, ft, rank=2, force=True, progress=False)
    assert (base / "model.safetensors").read_bytes() == before
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
