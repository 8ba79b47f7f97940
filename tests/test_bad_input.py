"""Bad input to the core edit: a clear error naming the value, and no output left behind."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lines_hf import (
    CheckpointNotFoundError,
    ConfigError,
    LiNeSEditor,
    NonFiniteError,
    OutputPathError,
    TensorMismatchError,
    UnsafeCheckpointError,
)
from lines_hf.cli import main as cli_main
from tiny import save_pair


def folder_digest(folder):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(path.encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def leftovers(parent):
    """Names in ``parent`` that look like (partial) outputs."""
    return sorted(n for n in os.listdir(parent) if n.startswith(("out", ".out")))


@pytest.fixture
def pair(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    return base_dir, tuned_dir


def rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit(base_dir, tuned_dir, out, **kwargs):
    kwargs.setdefault("alpha", 0.3)
    kwargs.setdefault("beta", 0.5)
    return LiNeSEditor.edit_folder(tuned_dir, base_dir, out, progress=False, **kwargs)


def test_shape_mismatch_names_tensor_and_shapes(pair, tmp_path):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, lambda t: t.update({"bert.pooler.dense.weight": torch.zeros(32, 31)}))
    with pytest.raises(TensorMismatchError) as info:
        edit(base_dir, tuned_dir, tmp_path / "out")
    assert "bert.pooler.dense.weight" in str(info.value)
    assert "[32, 31]" in str(info.value)
    assert "[32, 32]" in str(info.value)
    assert leftovers(tmp_path) == []


def test_vocabulary_resize_hint(pair, tmp_path):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, lambda t: t.update({"bert.embeddings.word_embeddings.weight": torch.zeros(107, 32)}))
    with pytest.raises(TensorMismatchError, match="resize_token_embeddings"):
        edit(base_dir, tuned_dir, tmp_path / "out")


def test_dtype_mismatch_suggests_out_dtype(pair, tmp_path):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, lambda t: t.update({"bert.pooler.dense.weight": t["bert.pooler.dense.weight"].half()}))
    with pytest.raises(TensorMismatchError, match="--out-dtype") as info:
        edit(base_dir, tuned_dir, tmp_path / "out")
    assert "float16" in str(info.value)
    assert "float32" in str(info.value)
    # With an explicit output dtype both sides are computed in float32.
    out = edit(base_dir, tuned_dir, tmp_path / "out", out_dtype="float32")
    assert load_file(out / "model.safetensors")["bert.pooler.dense.weight"].dtype == torch.float32


def test_base_tensor_missing_in_finetune(pair, tmp_path):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, lambda t: t.pop("bert.pooler.dense.bias"))
    with pytest.raises(TensorMismatchError, match="bert.pooler.dense.bias") as info:
        edit(base_dir, tuned_dir, tmp_path / "out")
    assert "--allow-missing-tensors" in str(info.value)
    out = edit(base_dir, tuned_dir, tmp_path / "out", allow_missing_tensors=True)
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["dropped_base_only"] == ["bert.pooler.dense.bias"]


def test_non_finite_task_vector(pair, tmp_path):
    base_dir, tuned_dir = pair

    def poison(tensors):
        tensors["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")

    rewrite(tuned_dir, poison)
    with pytest.raises(NonFiniteError, match="bert.encoder.layer.1.output.dense.weight"):
        edit(base_dir, tuned_dir, tmp_path / "out")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("missing", ["base", "finetuned"])
def test_missing_folder(pair, tmp_path, missing):
    base_dir, tuned_dir = pair
    gone = tmp_path / "does-not-exist"
    args = (gone, tuned_dir) if missing == "base" else (base_dir, gone)
    with pytest.raises(CheckpointNotFoundError, match="does-not-exist"):
        edit(*args, tmp_path / "out")


def test_empty_folder(pair, tmp_path):
    base_dir, _ = pair
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="empty"):
        edit(base_dir, empty, tmp_path / "out")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cli_rejects_non_finite_alpha(pair, tmp_path, value, capsys):
    base_dir, tuned_dir = pair
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--alpha", value, "--beta", "0.5",
                     "--output", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "alpha must be finite" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_output_inside_input(pair, where):
    base_dir, tuned_dir = pair
    before = folder_digest(tuned_dir)
    out = tuned_dir if where == "equal" else tuned_dir / "edited"
    with pytest.raises(OutputPathError, match="inside input"):
        edit(base_dir, tuned_dir, out)
    assert folder_digest(tuned_dir) == before


def test_output_containing_input(pair, tmp_path):
    base_dir, tuned_dir = pair
    with pytest.raises(OutputPathError, match="contains input"):
        edit(base_dir, tuned_dir, tmp_path, overwrite=True)


def test_existing_output_needs_overwrite(pair, tmp_path):
    base_dir, tuned_dir = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="--overwrite"):
        edit(base_dir, tuned_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    edit(base_dir, tuned_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_failure_midway_leaves_no_output(pair, tmp_path, monkeypatch):
    base_dir, tuned_dir = pair
    import lines_hf.engine as engine

    calls = {"n": 0}
    original = engine.apply_scale

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "apply_scale", failing)
    with pytest.raises(KeyboardInterrupt):
        edit(base_dir, tuned_dir, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_pickle_refused_then_loaded_safely(pair, tmp_path):
    base_dir, tuned_dir = pair
    tensors = load_file(tuned_dir / "model.safetensors")
    os.remove(tuned_dir / "model.safetensors")
    torch.save(tensors, tuned_dir / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        edit(base_dir, tuned_dir, tmp_path / "out")
    out = edit(base_dir, tuned_dir, tmp_path / "out", allow_pickle=True)
    assert set(load_file(out / "model.safetensors")) == set(tensors)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lines_hf_pickle_ran",))


def test_malicious_pickle_does_not_run(pair, tmp_path):
    base_dir, tuned_dir = pair
    os.remove(tuned_dir / "model.safetensors")
    if os.path.exists("/tmp/lines_hf_pickle_ran"):
        os.remove("/tmp/lines_hf_pickle_ran")
    torch.save({"x": Boom()}, tuned_dir / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        edit(base_dir, tuned_dir, tmp_path / "out", allow_pickle=True)
    assert not os.path.exists("/tmp/lines_hf_pickle_ran")


def test_remote_code_refused(pair, tmp_path):
    base_dir, tuned_dir = pair
    config = json.loads((tuned_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tuned_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeCheckpointError, match="--trust-remote-code"):
        edit(base_dir, tuned_dir, tmp_path / "out")
    with pytest.raises(UnsafeCheckpointError, match="trust_remote_code"):
        LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=0.1, beta=0.1)


def test_missing_alpha_beta_message(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--output", str(tmp_path / "out")])
    assert code == 1
    assert "--alpha" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir)


def test_gamma_with_alpha_beta_rejected(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--gamma", "0.2", "--alpha", "0.5",
                     "--beta", "0.5", "--output", str(tmp_path / "out")])
    assert code == 1
    assert "either --gamma or --alpha and --beta" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_flag_without_adapter(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--gamma", "0.2", "--merge",
                     "--output", str(tmp_path / "out")])
    assert code == 1
    assert "--adapter" in capsys.readouterr().err


def test_unknown_stack_in_num_layers(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--gamma", "0.2",
                     "--num-layers", "foo.layer=4", "--output", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "'foo.layer'" in err
    assert "bert.encoder.layer" in err


def test_empty_output_rejected(pair):
    base_dir, tuned_dir = pair
    with pytest.raises(OutputPathError, match="empty string"):
        edit(base_dir, tuned_dir, "")


def test_output_follows_umask(pair, tmp_path):
    base_dir, tuned_dir = pair
    previous = os.umask(0o022)
    try:
        out = edit(base_dir, tuned_dir, tmp_path / "out")
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert (os.stat(out / "model.safetensors").st_mode & 0o777) == 0o644


def test_in_memory_rejects_incomplete_finetune(pair, tmp_path):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, lambda t: t.pop("bert.encoder.layer.1.attention.self.query.weight"))
    with pytest.raises(TensorMismatchError, match="bert.encoder.layer.1.attention.self.query.weight"):
        LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=0.3, beta=0.5, progress=False)


def test_in_memory_rejects_extra_tensor(pair, tmp_path):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, lambda t: t.update({"bert.encoder.layer.1.extra.weight": torch.zeros(3)}))
    with pytest.raises(TensorMismatchError, match="bert.encoder.layer.1.extra.weight"):
        LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=0.3, beta=0.5, progress=False)
