"""Hostile checkpoints: corrupt safetensors files and indexes, pickles, remote code, cache symlinks.

Every case checks the error class, that the message names the offending file
or value, that both input folders are byte-for-byte unchanged, and that no
output folder (finished or hidden temporary) is left behind.
"""

import hashlib
import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lines_hf import (
    CorruptCheckpointError,
    LiNeSEditor,
    LiNeSError,
    UnsafeCheckpointError,
)
from lines_hf.checkpoint import FolderSource
from lines_hf.cli import main as cli_main
from tiny import make_model, perturb

ALPHA, BETA = 0.3, 0.5
PICKLE_MARKER = Path("/tmp/lines_hf_hostile_pickle_ran")


# --------------------------------------------------------------------------- helpers shared by test_hostile_*.py


def folder_digest(folder):
    """Return a SHA-256 over every file's relative path and bytes under ``folder`` (symlinks followed)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def output_entries(parent):
    """Return the names in ``parent``: outputs, hidden temporary folders, anything written there."""
    return sorted(os.listdir(parent)) if os.path.isdir(parent) else []


class Guard:
    """Checksums of the input folders, taken on creation and compared by ``check``."""

    def __init__(self, *folders):
        self.folders = [Path(f) for f in folders]
        self.before = [folder_digest(f) for f in self.folders]

    def check(self):
        for folder, before in zip(self.folders, self.before):
            assert folder_digest(folder) == before, f"input {folder} changed"


def read_header(path):
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_header(path, header, data):
    """Write a safetensors file with ``header`` (any JSON value) and the raw ``data`` bytes."""
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = make_model("bert")
    tuned = perturb(base)
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    tuned.save_pretrained(root / "tuned-sharded", max_shard_size="40KB")
    return root


@pytest.fixture
def pair(saved_pair, tmp_path):
    """Fresh copies of the base, the fine-tune and a sharded fine-tune, plus an empty output parent."""
    for name in ("base", "tuned", "tuned-sharded"):
        shutil.copytree(saved_pair / name, tmp_path / name)
    (tmp_path / "outputs").mkdir()
    return tmp_path / "base", tmp_path / "tuned", tmp_path / "tuned-sharded", tmp_path / "outputs"


def edit(base_dir, tuned_dir, out, **kwargs):
    kwargs.setdefault("alpha", ALPHA)
    kwargs.setdefault("beta", BETA)
    return LiNeSEditor.edit_folder(tuned_dir, base_dir, out, progress=False, **kwargs)


def expect_rejected(error, fragments, base_dir, tuned_dir, outputs, **kwargs):
    """Run an edit that must fail with ``error`` whose message contains every fragment; return the message."""
    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(error) as info:
        edit(base_dir, tuned_dir, outputs / "out", **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    guard.check()
    assert output_entries(outputs) == []
    return message


# --------------------------------------------------------------------------- corrupt safetensors files


def truncate_data(path):
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)
    return "truncated"


def header_too_long(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**60) + raw[8:])
    return str(2**60)


def offsets_overlap(path):
    header, data = read_header(path)
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    first, second = names[0], names[1]
    # Give the second tensor the first one's bytes; its size still fits, so only the overlap is wrong.
    header[second] = dict(header[first])
    write_header(path, header, data)
    return "overlapping"


def offsets_past_end(path):
    header, data = read_header(path)
    name = next(n for n in header if n != "__metadata__")
    begin, end = header[name]["data_offsets"]
    shift = len(data)
    header[name]["data_offsets"] = [begin + shift, end + shift]
    write_header(path, header, data)
    return name


def unknown_dtype(path):
    header, data = read_header(path)
    name = next(n for n in header if n != "__metadata__")
    header[name]["dtype"] = "Q4_K"
    write_header(path, header, data)
    return "Q4_K"


def huge_shape(path):
    header, data = read_header(path)
    name = next(n for n in header if n != "__metadata__")
    header[name]["shape"] = [2**40, 2**40]
    write_header(path, header, data)
    return name


def header_not_json(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"\xff" * length + raw[8 + length :])
    return "not valid JSON"


def header_nested_deeply(path):
    nested = b"[" * 50_000 + b"]" * 50_000
    path.write_bytes(struct.pack("<Q", len(nested)) + nested)
    return "nested too deeply"


def duplicate_key(path):
    header, data = read_header(path)
    name = next(n for n in header if n != "__metadata__")
    raw = json.dumps(header).encode()
    entry = json.dumps({name: header[name]})[1:-1].encode()
    raw = raw[:-1] + b"," + entry + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return "appears twice"


def empty_file(path):
    path.write_bytes(b"")
    return "0 bytes"


CORRUPTIONS = {
    "truncated data": truncate_data,
    "header length past the end": header_too_long,
    "overlapping offsets": offsets_overlap,
    "offsets past the end": offsets_past_end,
    "unknown dtype": unknown_dtype,
    "huge shape": huge_shape,
    "header not JSON": header_not_json,
    "header nested deeply": header_nested_deeply,
    "duplicate tensor name": duplicate_key,
    "empty file": empty_file,
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.parametrize("which", ["tuned", "base"])
def test_corrupt_safetensors_rejected(pair, case, which):
    base_dir, tuned_dir, _, outputs = pair
    target = (tuned_dir if which == "tuned" else base_dir) / "model.safetensors"
    fragment = CORRUPTIONS[case](target)
    expect_rejected(CorruptCheckpointError, [str(target), fragment], base_dir, tuned_dir, outputs)


@pytest.mark.parametrize("case", ["truncated data", "unknown dtype"])
def test_corrupt_safetensors_in_memory_edit(pair, case):
    base_dir, tuned_dir, _, _ = pair
    target = tuned_dir / "model.safetensors"
    fragment = CORRUPTIONS[case](target)
    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(CorruptCheckpointError) as info:
        LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=ALPHA, beta=BETA, progress=False)
    assert str(target) in str(info.value)
    assert fragment in str(info.value)
    guard.check()


@pytest.mark.parametrize("case", ["truncated data", "header length past the end", "overlapping offsets"])
def test_corrupt_safetensors_cli_one_line(pair, case, capsys):
    base_dir, tuned_dir, _, outputs = pair
    target = tuned_dir / "model.safetensors"
    fragment = CORRUPTIONS[case](target)
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--alpha", "0.3",
                     "--beta", "0.5", "--output", str(outputs / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("lines-hf: error: ")
    assert str(target) in err
    assert fragment in err
    assert "Traceback" not in err
    assert output_entries(outputs) == []


def test_file_truncated_while_editing(pair, monkeypatch):
    """A shard that another process truncates after its header was read (a half-written download)."""
    base_dir, tuned_dir, _, outputs = pair
    target = tuned_dir / "model.safetensors"
    original_size = target.stat().st_size
    import lines_hf.checkpoint as checkpoint

    parse = checkpoint._parse_header

    def parse_then_truncate(path):
        parsed = parse(path)
        if path == target:
            with open(path, "r+b") as handle:
                handle.truncate(original_size // 2)
        return parsed

    monkeypatch.setattr(checkpoint, "_parse_header", parse_then_truncate)
    with pytest.raises(CorruptCheckpointError) as info:
        edit(base_dir, tuned_dir, outputs / "out")
    assert str(target) in str(info.value)
    assert "ended early" in str(info.value)
    assert output_entries(outputs) == []


# --------------------------------------------------------------------------- memory stays proportional to the file


def test_huge_header_length_reads_nothing(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}" + b"\0" * 1000)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match=str(10**12)):
            FolderSource(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_huge_header_within_limit_is_bounded_by_file(tmp_path):
    """A header length below the format's limit but past the end of a small file is rejected before reading."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 90_000_000) + b"{" + b" " * 100)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="90000000"):
            FolderSource(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_huge_shape_allocates_nothing(pair, monkeypatch):
    base_dir, tuned_dir, _, outputs = pair
    name = huge_shape(tuned_dir / "model.safetensors")
    sizes = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(torch, "empty", recording_empty)
    with pytest.raises(CorruptCheckpointError, match=name):
        edit(base_dir, tuned_dir, outputs / "out")
    file_size = (tuned_dir / "model.safetensors").stat().st_size
    assert all(size <= file_size for size in sizes)
    assert output_entries(outputs) == []


# --------------------------------------------------------------------------- sharded indexes


def set_weight_map(folder, change):
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    change(index["weight_map"])
    index_path.write_text(json.dumps(index))
    return index_path


def test_sharded_pair_edits(pair):
    """The sharded fine-tune is a valid input, so the index cases below fail only for their corruption."""
    base_dir, _, sharded_dir, outputs = pair
    shards = sorted(p.name for p in sharded_dir.glob("*.safetensors"))
    assert len(shards) >= 2
    out = edit(base_dir, sharded_dir, outputs / "out")
    assert (out / "lines_config.json").is_file()


def test_index_names_missing_shard(pair):
    base_dir, _, sharded_dir, outputs = pair
    missing = sorted(sharded_dir.glob("model-*.safetensors"))[-1]
    missing.unlink()
    expect_rejected(CorruptCheckpointError, [missing.name, "does not exist"], base_dir, sharded_dir, outputs)


def test_index_names_missing_tensor(pair):
    base_dir, _, sharded_dir, outputs = pair
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[0].name
    set_weight_map(sharded_dir, lambda wm: wm.update({"bert.encoder.layer.9.output.dense.weight": shard}))
    expect_rejected(
        CorruptCheckpointError, ["bert.encoder.layer.9.output.dense.weight", shard, str(sharded_dir)],
        base_dir, sharded_dir, outputs,
    )


def test_duplicate_tensor_across_shards(pair):
    base_dir, _, sharded_dir, outputs = pair
    first, second = sorted(sharded_dir.glob("model-*.safetensors"))[:2]
    first_tensors, second_tensors = load_file(first), load_file(second)
    name = sorted(first_tensors)[0]
    second_tensors[name] = first_tensors[name]
    save_file(second_tensors, second, metadata={"format": "pt"})
    expect_rejected(CorruptCheckpointError, [name, first.name, second.name], base_dir, sharded_dir, outputs)


@pytest.mark.parametrize("shard", ["../../somewhere/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_shard_outside_folder(pair, shard):
    base_dir, _, sharded_dir, outputs = pair
    # A real file at the climbed-to path shows that the name, not the file's absence, is rejected.
    escape = (sharded_dir / "../../somewhere").resolve()
    escape.mkdir(parents=True, exist_ok=True)
    shutil.copy(sorted(sharded_dir.glob("model-*.safetensors"))[0], escape / "model.safetensors")
    set_weight_map(sharded_dir, lambda wm: wm.update({next(iter(wm)): shard}))
    expect_rejected(CorruptCheckpointError, [repr(shard), "outside the model folder"], base_dir, sharded_dir, outputs)


@pytest.mark.parametrize(
    "weight_map, fragment",
    [([1, 2], "weight_map object"), ({"x": ["a"]}, "['a']"), ({"x": 7}, "7, which is not a shard file name")],
)
def test_index_of_wrong_types(pair, weight_map, fragment):
    base_dir, _, sharded_dir, outputs = pair
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expect_rejected(CorruptCheckpointError, ["model.safetensors.index.json", fragment], base_dir, sharded_dir, outputs)


def test_index_not_json(pair):
    base_dir, _, sharded_dir, outputs = pair
    (sharded_dir / "model.safetensors.index.json").write_text("[" * 100_000)
    expect_rejected(CorruptCheckpointError, ["model.safetensors.index.json", "JSON"], base_dir, sharded_dir, outputs)


# --------------------------------------------------------------------------- Hugging Face cache symlinks


def as_hub_cache(folder, cache_root, repo="org/tiny"):
    """Lay ``folder`` out as the Hugging Face cache does: snapshot files are relative symlinks into blobs/."""
    repo_dir = cache_root / ("models--" + repo.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        content = path.read_bytes()
        blob = blobs / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.mark.parametrize("which", ["tuned", "tuned-sharded"])
def test_hub_cache_symlinks_work(pair, tmp_path, which):
    base_dir, tuned_dir, sharded_dir, outputs = pair
    source = tuned_dir if which == "tuned" else sharded_dir
    snapshot = as_hub_cache(source, tmp_path / "cache")
    assert all(p.is_symlink() for p in snapshot.iterdir())

    guard = Guard(base_dir, snapshot)
    via_cache = edit(base_dir, snapshot, outputs / "cached")
    direct = edit(base_dir, tuned_dir, outputs / "direct")
    guard.check()

    expected = load_file(direct / "model.safetensors")
    got = {}
    for shard in sorted(via_cache.glob("*.safetensors")):
        got.update(load_file(shard))
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # The copied config is a regular file, not a link into the cache.
    assert not (via_cache / "config.json").is_symlink()
    assert json.loads((via_cache / "config.json").read_text()) == json.loads((snapshot / "config.json").read_text())


# --------------------------------------------------------------------------- pickles


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {PICKLE_MARKER}",))


def replace_with_pickle(folder, write):
    os.remove(folder / "model.safetensors")
    write(folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    "variant",
    ["zip format", "legacy format", "plain pickle module"],
)
def test_malicious_pickle_never_runs(pair, variant):
    base_dir, tuned_dir, _, outputs = pair
    PICKLE_MARKER.unlink(missing_ok=True)
    # The code-running object comes first, so the unpickler meets it before any tensor.
    payload = {"evil": RunsCode(), "bert.pooler.dense.weight": torch.zeros(32, 32)}
    if variant == "zip format":
        replace_with_pickle(tuned_dir, lambda p: torch.save(payload, p))
    elif variant == "legacy format":
        replace_with_pickle(tuned_dir, lambda p: torch.save(payload, p, _use_new_zipfile_serialization=False))
    else:
        import pickle

        replace_with_pickle(tuned_dir, lambda p: p.write_bytes(pickle.dumps(payload, protocol=2)))
    path = tuned_dir / "pytorch_model.bin"
    message = expect_rejected(
        UnsafeCheckpointError, [str(path), "weights_only=True"], base_dir, tuned_dir, outputs, allow_pickle=True
    )
    assert "system" in message
    assert not PICKLE_MARKER.exists()


def test_malicious_pickle_refused_without_opt_in(pair):
    base_dir, tuned_dir, _, outputs = pair
    PICKLE_MARKER.unlink(missing_ok=True)
    replace_with_pickle(tuned_dir, lambda p: torch.save({"evil": RunsCode()}, p))
    expect_rejected(UnsafeCheckpointError, ["--allow-pickle", str(tuned_dir)], base_dir, tuned_dir, outputs)
    assert not PICKLE_MARKER.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a dict"])
def test_corrupt_pickle_rejected(pair, damage):
    base_dir, tuned_dir, _, outputs = pair
    tensors = load_file(tuned_dir / "model.safetensors")
    path = tuned_dir / "pytorch_model.bin"
    if damage == "not a dict":
        replace_with_pickle(tuned_dir, lambda p: torch.save(list(tensors.values()), p))
        fragment = "does not hold a state dict"
    else:
        replace_with_pickle(tuned_dir, lambda p: torch.save(tensors, p))
        fragment = "not a valid torch checkpoint"
        if damage == "truncated":
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
        elif damage == "garbage":
            path.write_bytes(b"definitely not a pickle" * 50)
        else:
            path.write_bytes(b"")
    expect_rejected(CorruptCheckpointError, [str(path), fragment], base_dir, tuned_dir, outputs, allow_pickle=True)


def test_pickle_index_outside_folder(pair):
    base_dir, tuned_dir, _, outputs = pair
    os.remove(tuned_dir / "model.safetensors")
    (tuned_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"x": "../../../etc/passwd"}})
    )
    expect_rejected(
        CorruptCheckpointError, ["'../../../etc/passwd'", "outside the model folder"],
        base_dir, tuned_dir, outputs, allow_pickle=True,
    )


def test_pickle_opt_in_loads_same_values(pair):
    """With the opt-in a clean pickle gives exactly the edit of the same tensors in safetensors."""
    base_dir, tuned_dir, _, outputs = pair
    direct = edit(base_dir, tuned_dir, outputs / "direct")
    tensors = load_file(tuned_dir / "model.safetensors")
    replace_with_pickle(tuned_dir, lambda p: torch.save(tensors, p))
    pickled = edit(base_dir, tuned_dir, outputs / "pickled", allow_pickle=True)
    expected, got = load_file(direct / "model.safetensors"), load_file(pickled / "model.safetensors")
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# --------------------------------------------------------------------------- remote code


@pytest.mark.parametrize("which", ["tuned", "base"])
def test_remote_code_refused_names_flag(pair, which, capsys):
    base_dir, tuned_dir, _, outputs = pair
    folder = tuned_dir if which == "tuned" else base_dir
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(PICKLE_MARKER)!r}, 'w').close()\n")
    PICKLE_MARKER.unlink(missing_ok=True)

    expect_rejected(UnsafeCheckpointError, ["--trust-remote-code", str(folder)], base_dir, tuned_dir, outputs)
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--alpha", "0.3",
                     "--beta", "0.5", "--output", str(outputs / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "--trust-remote-code" in err
    assert "Traceback" not in err
    assert not PICKLE_MARKER.exists()
    assert output_entries(outputs) == []

    # The streaming edit never imports the model's code, even with the flag: it reads tensors only.
    out = edit(base_dir, tuned_dir, outputs / "out", trust_remote_code=True)
    assert (out / "model.safetensors").is_file()
    assert not PICKLE_MARKER.exists()


def test_every_hostile_error_is_a_lines_error():
    """The classes the cases above expect are LiNeSError subclasses of the built-ins callers catch."""
    assert issubclass(CorruptCheckpointError, LiNeSError)
    assert issubclass(CorruptCheckpointError, ValueError)
    assert issubclass(UnsafeCheckpointError, LiNeSError)
    assert issubclass(UnsafeCheckpointError, PermissionError)
