"""Hostile LoRA adapters and merge inputs: corrupt files, adapters for another base, mixed architectures.

Each case checks the error class, the file or value named in the message,
unchanged inputs and that no output was left, for the adapter folder edit,
the in-memory adapter edit and ``lines-hf merge``.
"""

import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lines_hf import (
    ArchitectureMismatchError,
    CorruptCheckpointError,
    LiNeSConfig,
    LiNeSEditor,
    NonFiniteError,
    UnsafeCheckpointError,
    UnsupportedAdapterError,
)
from lines_hf.adapters import edit_adapter_folder
from lines_hf.cli import main as cli_main
from lines_hf.merge import merge_folders
from test_hostile import PICKLE_MARKER, Guard, RunsCode, output_entries
from tiny import make_model, perturb

CONFIG = LiNeSConfig(alpha=0.2, beta=0.8)
TARGETS = ["q_proj", "v_proj"]


def save_adapter(folder, base_dir, **model_overrides):
    """Save a LoRA adapter (non-zero B) of a tiny llama built with ``model_overrides``, naming ``base_dir``."""
    model = make_model("llama", **model_overrides)
    torch.manual_seed(7)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    make_model("llama").save_pretrained(root / "base")
    save_adapter(root / "adapter", root / "base")
    save_adapter(root / "adapter-deeper", root / "base", num_hidden_layers=6)
    save_adapter(root / "adapter-wider", root / "base", hidden_size=64, intermediate_size=64)
    return root


@pytest.fixture
def lora(saved, tmp_path):
    for name in ("base", "adapter", "adapter-deeper", "adapter-wider"):
        shutil.copytree(saved / name, tmp_path / name)
    (tmp_path / "outputs").mkdir()
    return tmp_path


def both_paths(lora, adapter, **kwargs):
    """The folder edit and the in-memory edit of ``adapter`` against ``lora / 'base'``."""
    base = lora / "base"
    return [
        lambda: edit_adapter_folder(adapter, lora / "outputs" / "out", CONFIG, base=base, **kwargs),
        lambda: LiNeSEditor.from_pretrained(adapter, base_model=base, config=CONFIG, progress=False, **kwargs),
    ]


def expect_adapter_rejected(lora, adapter, error, fragments, **kwargs):
    guard = Guard(lora / "base", adapter)
    for run in both_paths(lora, adapter, **kwargs):
        with pytest.raises(error) as info:
            run()
        for fragment in fragments:
            assert fragment in str(info.value)
    guard.check()
    assert output_entries(lora / "outputs") == []


def test_clean_adapter_edits(lora):
    """The clean adapter passes both paths, so each case below fails for its own damage only."""
    record = edit_adapter_folder(lora / "adapter", lora / "outputs" / "out", CONFIG, base=lora / "base")
    assert record["kind"] == "adapter"
    model = LiNeSEditor.from_pretrained(lora / "adapter", base_model=lora / "base", config=CONFIG, progress=False)
    assert model.lines_record["kind"] == "adapter"


@pytest.mark.parametrize("damage", ["truncated", "header length", "unknown dtype"])
def test_corrupt_adapter_file(lora, damage):
    adapter = lora / "adapter"
    path = adapter / "adapter_model.safetensors"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:-50])
        fragment = "truncated"
    elif damage == "header length":
        path.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
        fragment = str(2**62)
    else:
        path.write_bytes(raw.replace(b'"F32"', b'"X99"', 1))
        fragment = "'X99'"
    expect_adapter_rejected(lora, adapter, CorruptCheckpointError, [str(path), fragment])


@pytest.mark.parametrize("text", ["[" * 50_000, "{not json", "[1, 2]", '{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}"])
def test_corrupt_adapter_config(lora, text):
    adapter = lora / "adapter"
    (adapter / "adapter_config.json").write_text(text)
    expect_adapter_rejected(lora, adapter, UnsupportedAdapterError, [str(adapter / "adapter_config.json")])


def test_adapter_config_of_wrong_types(lora):
    """Valid JSON with a nonsense value: PEFT's own failure comes out as one lines_hf error."""
    adapter = lora / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = 5
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureMismatchError) as info:
        LiNeSEditor.from_pretrained(adapter, base_model=lora / "base", config=CONFIG, progress=False)
    assert str(adapter) in str(info.value)
    assert "adapter_config.json" in str(info.value)


def test_adapter_for_deeper_model(lora):
    expect_adapter_rejected(
        lora, lora / "adapter-deeper", ArchitectureMismatchError,
        ["'model.layers.4.self_attn.q_proj'", str(lora / "base"), "trained on another model"],
    )


def test_adapter_for_wider_model(lora):
    expect_adapter_rejected(
        lora, lora / "adapter-wider", ArchitectureMismatchError,
        ["'model.layers.0.self_attn.q_proj'", "[4, 64]", "[32, 32]"],
    )


def test_adapter_for_other_architecture(lora):
    make_model("bert").save_pretrained(lora / "bert-base")
    adapter = lora / "adapter"
    guard = Guard(adapter, lora / "bert-base")
    with pytest.raises(ArchitectureMismatchError, match="model.layers.0.self_attn.q_proj"):
        edit_adapter_folder(adapter, lora / "outputs" / "out", CONFIG, base=lora / "bert-base")
    with pytest.raises(ArchitectureMismatchError, match="model.layers.0.self_attn.q_proj"):
        LiNeSEditor.from_pretrained(adapter, base_model=lora / "bert-base", config=CONFIG, progress=False)
    guard.check()
    assert output_entries(lora / "outputs") == []


def test_pickled_adapter_refused_then_safe(lora):
    adapter = lora / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    os.remove(adapter / "adapter_model.safetensors")
    torch.save(tensors, adapter / "adapter_model.bin")
    expect_adapter_rejected(lora, adapter, UnsafeCheckpointError, ["--allow-pickle", str(adapter)])

    record = edit_adapter_folder(adapter, lora / "outputs" / "out", CONFIG, base=lora / "base", allow_pickle=True)
    assert record["kind"] == "adapter"


def test_malicious_pickled_adapter(lora):
    adapter = lora / "adapter"
    os.remove(adapter / "adapter_model.safetensors")
    torch.save({"evil": RunsCode()}, adapter / "adapter_model.bin")
    PICKLE_MARKER.unlink(missing_ok=True)
    expect_adapter_rejected(
        lora, adapter, UnsafeCheckpointError, [str(adapter / "adapter_model.bin"), "system"], allow_pickle=True
    )
    assert not PICKLE_MARKER.exists()


def test_pickled_base_needs_opt_in_for_adapter(lora):
    """The in-memory adapter edit loads the base too: a pickled base follows the same opt-in."""
    base = lora / "base"
    tensors = load_file(base / "model.safetensors")
    os.remove(base / "model.safetensors")
    torch.save(tensors, base / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        LiNeSEditor.from_pretrained(lora / "adapter", base_model=base, config=CONFIG, progress=False)


def test_adapter_cli_one_line(lora, capsys):
    code = cli_main(["edit", "--base", str(lora / "base"), "--adapter", str(lora / "adapter-wider"), "--alpha",
                     "0.2", "--beta", "0.8", "--output", str(lora / "outputs" / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("lines-hf")] == [err.strip().splitlines()[-1]]
    assert "trained on another model" in err
    assert "Traceback" not in err
    assert output_entries(lora / "outputs") == []


# --------------------------------------------------------------------------- merges


@pytest.fixture(scope="module")
def merge_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = make_model("bert")
    base.save_pretrained(root / "base")
    for i in range(3):
        perturb(base, seed=i + 1).save_pretrained(root / f"ft{i}")
    perturb(make_model("bert", num_hidden_layers=4)).save_pretrained(root / "deeper")
    perturb(make_model("llama")).save_pretrained(root / "llama")
    return root


@pytest.fixture
def merge_dirs(merge_saved, tmp_path):
    for name in ("base", "ft0", "ft1", "ft2", "deeper", "llama"):
        shutil.copytree(merge_saved / name, tmp_path / name)
    (tmp_path / "outputs").mkdir()
    return tmp_path


def expect_merge_rejected(root, models, error, fragments):
    guard = Guard(root / "base", *models)
    with pytest.raises(error) as info:
        merge_folders(models, root / "base", root / "outputs" / "out", LiNeSConfig(alpha=0.3, beta=0.5), progress=False)
    for fragment in fragments:
        assert fragment in str(info.value)
    guard.check()
    assert output_entries(root / "outputs") == []


def test_clean_merge_works(merge_dirs):
    out = merge_folders([merge_dirs / "ft0", merge_dirs / "ft1"], merge_dirs / "base", merge_dirs / "outputs" / "out",
                        LiNeSConfig(alpha=0.3, beta=0.5), progress=False)
    assert (out / "lines_config.json").is_file()


@pytest.mark.parametrize(
    "other, fragments",
    [("deeper", ["'deeper'", "bert.encoder.layer.3"]), ("llama", ["'llama'", "model.layers.0"])],
)
def test_merge_of_other_architecture_or_depth(merge_dirs, other, fragments):
    models = [merge_dirs / "ft0", merge_dirs / other, merge_dirs / "ft1"]
    expect_merge_rejected(merge_dirs, models, ArchitectureMismatchError, fragments)


def test_merge_of_same_shaped_other_architecture(tmp_path):
    """Tiny llama and mistral models share every tensor name and shape: only the configs tell them apart."""
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    perturb(base).save_pretrained(tmp_path / "llama-ft")
    perturb(make_model("mistral")).save_pretrained(tmp_path / "mistral-ft")
    (tmp_path / "outputs").mkdir()
    models = [tmp_path / "llama-ft", tmp_path / "mistral-ft"]
    expect_merge_rejected(tmp_path, models, ArchitectureMismatchError, ["'mistral-ft'", "'mistral'", "'llama'"])


def test_merge_with_one_corrupt_input(merge_dirs):
    path = merge_dirs / "ft2" / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 64)
    models = [merge_dirs / "ft0", merge_dirs / "ft1", merge_dirs / "ft2"]
    expect_merge_rejected(merge_dirs, models, CorruptCheckpointError, [str(path), "truncated"])


def test_merge_with_one_non_finite_input(merge_dirs):
    path = merge_dirs / "ft1" / "model.safetensors"
    tensors = load_file(path)
    tensors["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})
    models = [merge_dirs / "ft0", merge_dirs / "ft1"]
    expect_merge_rejected(merge_dirs, models, NonFiniteError, ["'bert.encoder.layer.1.output.dense.weight'"])


def test_merge_with_malicious_pickle_input(merge_dirs):
    folder = merge_dirs / "ft1"
    os.remove(folder / "model.safetensors")
    torch.save({"evil": RunsCode()}, folder / "pytorch_model.bin")
    PICKLE_MARKER.unlink(missing_ok=True)
    models = [merge_dirs / "ft0", folder]
    expect_merge_rejected(merge_dirs, models, UnsafeCheckpointError, ["--allow-pickle"])
    guard = Guard(merge_dirs / "base", *models)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        merge_folders(models, merge_dirs / "base", merge_dirs / "outputs" / "out", LiNeSConfig(alpha=0.3, beta=0.5),
                      progress=False, allow_pickle=True)
    guard.check()
    assert not PICKLE_MARKER.exists()
    assert output_entries(merge_dirs / "outputs") == []


def test_merge_cli_one_line(merge_dirs, capsys):
    code = cli_main(["merge", "--base", str(merge_dirs / "base"), "--models", str(merge_dirs / "ft0"),
                     str(merge_dirs / "llama"), "--alpha", "0.3", "--beta", "0.5", "--output",
                     str(merge_dirs / "outputs" / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("lines-hf: error: ")
    assert "'llama'" in err
    assert "Traceback" not in err
    assert output_entries(merge_dirs / "outputs") == []
