"""Checkpoints as people have them: sharded safetensors, Hugging Face model directories and
memory-mapped ``.bin`` state dicts as inputs; read key by key, identified by every file read."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mergeflow.checkpoint as checkpoint
from mergeflow import cli, hfdir
from mergeflow.checkpoint import CheckpointError, ModelDirectoryReader, open_checkpoint, read_state_dict
from mergeflow.engine import merge_checkpoints, open_checkpoint_set
from mergeflow.errors import OutputError
from mergeflow.hashing import cached_sha256, fileset_digest, sha256_file
from mergeflow.writer import SafetensorsWriter
from tests import reference

transformers = pytest.importorskip("transformers")


def tiny_llama_config(**overrides: object) -> object:
    settings: dict[str, object] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def save_model_dirs(root: Path, tasks: int = 2, dtype: torch.dtype = torch.float32, **save: object) -> list[Path]:
    """θ0 and ``tasks`` perturbed fine-tunes of a tiny random Llama, saved with ``save_pretrained``."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config()).to(dtype)
    dirs = []
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for index in range(tasks + 1):
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                noise = 0.0 if index == 0 else 0.05 * torch.randn(tensor.shape, generator=generator)
                tensor.copy_((base[key].double() + noise).to(dtype))
        target = root / ("base" if index == 0 else f"task{index}")
        model.save_pretrained(target, **save)
        dirs.append(target)
    return dirs


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_model_dirs(tmp_path_factory.mktemp("sharded"), max_shard_size="20KB")


def _age_tree(root: Path) -> None:
    past = time.time_ns() - 120 * 10**9
    for path in root.rglob("*"):
        os.utime(path, ns=(past, past))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    import mergeflow.hashing as hashing

    monkeypatch.setattr(hashing, "_now_ns", lambda: time.time_ns() + 60 * 10**9)
    return tmp_path / "cache"


# --- inputs ---------------------------------------------------------------------------------------


def test_sharded_directory_and_its_index_read_every_key(sharded: list[Path]) -> None:
    base = sharded[0]
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 1, "the fixture should be sharded"
    expected: dict[str, torch.Tensor] = {}
    for shard in shards:
        expected.update(load_file(str(shard)))
    for given in (base, base / "model.safetensors.index.json"):
        with open_checkpoint(given) as reader:
            assert isinstance(reader, ModelDirectoryReader) and reader.path == given
            assert sorted(reader.keys()) == sorted(expected)
            for key, tensor in expected.items():
                assert reader.meta(key).shape == tuple(tensor.shape)
                assert torch.equal(reader.load(key), tensor)
    with open_checkpoint(base) as reader:  # the directory: shards, index and companion files
        names = [f.relative_to(base).as_posix() for f in reader.files]
        assert names == sorted(names)
        assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(names)
        assert {s.name for s in shards} <= set(names)
    with open_checkpoint(base / "model.safetensors.index.json") as reader:  # the index alone: no companions
        assert {f.name for f in reader.files} == {s.name for s in shards} | {"model.safetensors.index.json"}


def test_a_key_is_read_from_its_own_shard_only(sharded: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays at one tensor: loading a key reads that key's bytes from its shard, nothing else."""
    reads: list[tuple[str, str]] = []
    real = checkpoint.SafetensorsReader.load

    def counting(self: checkpoint.SafetensorsReader, key: str) -> torch.Tensor:
        reads.append((self.path.name, key))
        return real(self, key)

    monkeypatch.setattr(checkpoint.SafetensorsReader, "load", counting)
    index = json.loads((sharded[0] / "model.safetensors.index.json").read_text())["weight_map"]
    with open_checkpoint(sharded[0]) as reader:
        assert reads == []  # opening reads headers only
        for key in sorted(reader.keys()):
            reader.load(key)
            assert reads[-1] == (index[key], key)
    assert len(reads) == len(index)


def test_single_file_model_directory(tmp_path: Path) -> None:
    (base,) = save_model_dirs(tmp_path, tasks=0)
    assert (base / "model.safetensors").exists() and not (base / "model.safetensors.index.json").exists()
    with open_checkpoint(base) as reader:
        assert {f.name for f in reader.files} == {"config.json", "generation_config.json", "model.safetensors"}
        expected = load_file(str(base / "model.safetensors"))
        assert {k: reader.load(k) for k in reader.keys()}.keys() == expected.keys()


def test_bin_model_directory_is_memory_mapped(sharded: list[Path], tmp_path: Path, monkeypatch) -> None:
    """``pytorch_model-*.bin`` shards with their index, as older transformers wrote them."""
    base = tmp_path / "bin"
    base.mkdir()
    shutil.copy(sharded[0] / "config.json", base / "config.json")
    weight_map = {}
    for number, shard in enumerate(sorted(sharded[0].glob("model-*.safetensors")), 1):
        name = f"pytorch_model-{number:05d}-of-00006.bin"
        tensors = load_file(str(shard))
        torch.save(tensors, base / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    calls: list[dict[str, object]] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", spy)
    state = read_state_dict(base)
    reference: dict[str, torch.Tensor] = {}
    for shard in sorted(base.glob("pytorch_model-*.bin")):
        reference.update(real_load(shard, weights_only=True))
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert calls and all(c["mmap"] is True and c["weights_only"] is True for c in calls)


def test_zip_pickle_is_memory_mapped_even_when_named_safetensors(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "odd.safetensors"
    torch.save({"w": torch.arange(6.0)}, path)
    seen: list[object] = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda f, **kw: seen.append((f, kw["mmap"])) or real_load(f, **kw))
    assert torch.equal(read_state_dict(path)["w"], torch.arange(6.0))
    ((source, mapped),) = seen
    assert mapped is (not isinstance(source, str) or not source.endswith(".safetensors"))
    if os.path.exists("/proc/self/fd"):
        assert mapped and isinstance(source, str) and source.startswith("/proc/self/fd/")


def _copy_base(sharded: list[Path], tmp_path: Path) -> tuple[Path, Path, dict]:
    base = tmp_path / "base"
    shutil.copytree(sharded[0], base)
    index_path = base / "model.safetensors.index.json"
    return base, index_path, json.loads(index_path.read_text())


def _one_line_error(given: Path, pattern: str) -> None:
    with pytest.raises(CheckpointError, match=pattern) as caught:
        open_checkpoint(given)
    assert "\n" not in str(caught.value)


def test_index_naming_a_missing_shard(sharded: list[Path], tmp_path: Path) -> None:
    base, _, _ = _copy_base(sharded, tmp_path)
    (base / "model-00002-of-00006.safetensors").unlink()
    _one_line_error(base, r"names shard 'model-00002-of-00006\.safetensors', which does not exist")


def test_key_in_two_shards(sharded: list[Path], tmp_path: Path) -> None:
    base, _, index = _copy_base(sharded, tmp_path)
    key, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    tensors = load_file(str(base / other))
    tensors[key] = load_file(str(base / shard))[key]
    save_file(tensors, str(base / other))
    _one_line_error(base, rf"key '{key}' is in two shards")


def test_index_maps_key_to_shard_that_lacks_it(sharded: list[Path], tmp_path: Path) -> None:
    base, index_path, index = _copy_base(sharded, tmp_path)
    key, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][key] = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index_path.write_text(json.dumps(index))
    _one_line_error(base, rf"maps key '{key}' to shard .*, which does not hold it")
    index["weight_map"]["no.such.key"] = shard
    del index["weight_map"][key]
    index_path.write_text(json.dumps(index))
    _one_line_error(base, r"maps key 'no\.such\.key' to shard .*, which does not hold it")


def test_shard_key_missing_from_index(sharded: list[Path], tmp_path: Path) -> None:
    base, index_path, index = _copy_base(sharded, tmp_path)
    key = next(iter(index["weight_map"]))
    del index["weight_map"][key]
    index_path.write_text(json.dumps(index))
    _one_line_error(base, rf"holds key '{key}', which the index does not list")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', r"repeats key 'a'"),
        ('{"weight_map": {"a": "../x.safetensors"}}', r"not a file name inside the index's directory"),
        ('{"weight_map": {"a": 3}}', r"maps to a number"),
        ('{"metadata": {}}', r"no 'weight_map'"),
        ('{"weight_map": {', r"not JSON"),
    ],
)
def test_malformed_index_is_one_line(tmp_path: Path, text: str, pattern: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    _one_line_error(index, r"not a valid shard index: .*" + pattern)


def test_malformed_shard_header_is_refused(sharded: list[Path], tmp_path: Path) -> None:
    base, _, _ = _copy_base(sharded, tmp_path)
    shard = base / "model-00003-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    _one_line_error(base, r"model-00003-of-00006\.safetensors: not a valid safetensors file: .*truncated")


def test_identity_covers_every_file_and_each_is_cached(sharded: list[Path], tmp_path: Path, cache_dir: Path) -> None:
    base, _, _ = _copy_base(sharded, tmp_path)
    task = tmp_path / "task1"
    shutil.copytree(sharded[1], task)
    _age_tree(tmp_path)
    checkpoints = open_checkpoint_set(base, [task])
    try:
        expected = fileset_digest(
            [(f.relative_to(base).as_posix(), sha256_file(f)) for f in checkpoints.pretrained.files]
        )
        assert checkpoints.pretrained_sha256 == expected
        for f in checkpoints.pretrained.files:  # each shard has its own cache entry
            assert cached_sha256(f) == sha256_file(f)
    finally:
        checkpoints.close()
    # a change to any file the directory is read from changes its identity
    config = base / "config.json"
    config.write_text(config.read_text() + "\n")
    again = open_checkpoint_set(base, [task])
    try:
        assert again.pretrained_sha256 != expected
    finally:
        again.close()


def test_verify_unchanged_covers_every_shard(sharded: list[Path], tmp_path: Path) -> None:
    base, _, _ = _copy_base(sharded, tmp_path)
    checkpoints = open_checkpoint_set(base, [sharded[1]])
    try:
        checkpoints.verify_unchanged()
        shard = base / "model-00004-of-00006.safetensors"
        os.utime(shard, ns=(0, 0))
        with pytest.raises(CheckpointError, match=r"changed while being merged \(model-00004-of-00006"):
            checkpoints.verify_unchanged()
    finally:
        checkpoints.close()


# --- outputs --------------------------------------------------------------------------------------


def _state(directory: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(directory)


def _load_hf(directory: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "cart"])
def test_merge_into_hf_directory_loads_with_from_pretrained(sharded: list[Path], tmp_path: Path, method: str) -> None:
    base, *tuned = sharded
    out = tmp_path / "merged"
    params = {"scaling": 0.4} if method == "task_arithmetic" else {"scaling": 1.5, "rank_ratio": 0.25}
    result = merge_checkpoints(
        method, base, tuned, out, params, precision="float64", output_format="hf", shard_size="30KB",
        command="mergeflow merge ...",
    )  # fmt: skip
    assert result.outputs == [out] and not result.skipped
    theta0, thetas = _state(base), [_state(t) for t in tuned]
    if method == "task_arithmetic":
        expected = reference.task_arithmetic(theta0, thetas, 0.4)
    else:
        expected = reference.cart(theta0, thetas, 1.5, 0.25)
    loaded = _load_hf(out)
    assert loaded.keys() == expected.keys()
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected[key], rtol=0, atol=1e-6)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    for shard in shards:  # the same provenance in every shard as in a single-file output
        with open_checkpoint(out / shard) as reader:
            meta = reader.metadata
        assert (
            meta["mergeflow.method"] == method
            and meta["mergeflow.fingerprint"] == index["metadata"]["mergeflow.fingerprint"]
        )
        assert json.loads(meta["mergeflow.inputs"])["pretrained"]["sha256"] == result.inputs["pretrained"]["sha256"]
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "base_model": [str(p) for p in sharded],
        "base_model_relation": "merge",
        "tags": ["merge", "mergeflow"],
    }
    assert f"`{method}`" in card and "mergeflow merge ..." in card
    assert result.inputs["finetuned"][0]["sha256"] in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    # up to date: skipped; a different shard size is a different output
    again = merge_checkpoints(method, base, tuned, out, params, precision="float64", output_format="hf",
                              shard_size="30KB")  # fmt: skip
    assert again.skipped
    resharded = merge_checkpoints(method, base, tuned, out, params, precision="float64", output_format="hf",
                                  shard_size="1MB")  # fmt: skip
    assert not resharded.skipped
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() == expected.keys()
    assert len(list(out.glob("*.safetensors"))) == 1


def test_failed_write_leaves_no_complete_looking_directory(
    sharded: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, *tuned = sharded
    out = tmp_path / "merged"
    real_commit = SafetensorsWriter.commit
    committed: list[Path] = []

    def fail_after_first(self: SafetensorsWriter) -> Path:
        if committed:
            raise OSError(28, "No space left on device")
        committed.append(real_commit(self))
        return committed[-1]

    monkeypatch.setattr(SafetensorsWriter, "commit", fail_after_first)
    with pytest.raises(OutputError, match=r"merged: cannot write \(No space left on device\)"):
        merge_checkpoints("task_arithmetic", base, tuned, out, output_format="hf", shard_size="30KB")
    assert committed and not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial directory is gone too
    # a killed writer (no clean-up at all) leaves only a hidden partial directory, removed by the next run
    monkeypatch.setattr(hfdir.HFDirectoryWriter, "abort", lambda self: None)
    committed.clear()
    with pytest.raises(OutputError):
        merge_checkpoints("task_arithmetic", base, tuned, out, output_format="hf", shard_size="30KB")
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".merged.partial-") and not out.exists()
    assert not (partial / "model.safetensors.index.json").exists()
    partial.rename(tmp_path / ".merged.partial-999999999")  # as if its process were gone
    monkeypatch.undo()
    merge_checkpoints("task_arithmetic", base, tuned, out, output_format="hf", shard_size="30KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_directory_outputs_that_are_never_replaced(sharded: list[Path], tmp_path: Path) -> None:
    base, *tuned = sharded
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"foreign: the output directory exists and is not a mergeflow output"):
        merge_checkpoints("task_arithmetic", base, tuned, foreign, output_format="hf")
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError, match=r"the output is the input"):
        merge_checkpoints("task_arithmetic", base, tuned, tuned[0], output_format="hf")
    with pytest.raises(OutputError, match=r"the output directory contains the input"):
        merge_checkpoints("task_arithmetic", base, tuned, base.parent, output_format="hf")
    link = tmp_path / "link"
    link.symlink_to(base)
    with pytest.raises(OutputError, match=r"the output is the input"):
        merge_checkpoints("task_arithmetic", base, tuned, link, output_format="hf")
    (one,) = save_model_dirs(tmp_path / "one", tasks=0)
    before = (one / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match=r"model\.safetensors: the output is the input .*model\.safetensors"):
        merge_checkpoints("task_arithmetic", one, [one], one / "model.safetensors")
    assert (one / "model.safetensors").read_bytes() == before
    single = tmp_path / "single.safetensors"
    merge_checkpoints("task_arithmetic", base, tuned, single)
    with pytest.raises(OutputError, match=r"exists and is not a directory"):
        merge_checkpoints("task_arithmetic", base, tuned, single, output_format="hf")


def test_bf16_model_directory_round_trip(tmp_path: Path) -> None:
    dirs = save_model_dirs(tmp_path / "in", tasks=2, dtype=torch.bfloat16, max_shard_size="10KB")
    out = tmp_path / "merged"
    merge_checkpoints("task_arithmetic", dirs[0], dirs[1:], out, {"scaling": 0.5}, output_format="hf",
                      shard_size="10KB")  # fmt: skip
    expected = reference.task_arithmetic(_state(dirs[0]), [_state(d) for d in dirs[1:]], 0.5)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key
    assert (out / "config.json").read_bytes() == (dirs[0] / "config.json").read_bytes()
    with open_checkpoint(out) as reader:
        assert {reader.meta(k).dtype for k in reader.keys()} == {torch.bfloat16}


def test_cli_merge_format_hf(sharded: list[Path], tmp_path: Path) -> None:
    base, *tuned = sharded
    out = tmp_path / "cli-out"
    argv = ["merge", "--method", "task_arithmetic", "--pretrained", str(base / "model.safetensors.index.json"),
            "--finetuned", *map(str, tuned), "--output", str(out), "--format", "hf", "--shard-size", "40KB",
            "--set", "scaling=0.3"]  # fmt: skip
    assert cli.main(argv) == 0
    card = (out / "README.md").read_text()
    assert shlex.join(["mergeflow", *argv]) in card
    assert not (out / "config.json").exists()  # θ0 given as its index, not its directory: nothing to carry over
    assert cli.main(["merge", "--method", "cart_indexing", "--pretrained", str(base), "--finetuned", str(tuned[0]),
                     "--output", str(tmp_path / "x"), "--format", "hf"]) == 2  # fmt: skip
    assert cli.main([*argv[:-2], "--shard-size", "lots"]) == 2


@pytest.mark.parametrize(("text", "size"), [("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("20KB", 20_000),
                                            ("1GiB", 2**30), ("123", 123), (77, 77)])  # fmt: skip
def test_parse_size(text: object, size: int) -> None:
    assert hfdir.parse_size(text) == size  # type: ignore[arg-type]
