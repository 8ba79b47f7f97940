"""Single-model LiNeS edits: exact identities, the reference formula, in-memory against streaming."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lines_hf import LiNeSConfig, LiNeSEditor
from lines_hf.cli import main as cli_main
from lines_hf.layers import resolve_layers
from lines_hf.schedule import linear_scale
from tiny import ARCHITECTURES, add_to_hub_cache, make_model, perturb, save_pair


def load_folder(folder):
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def expected_scale(name, layer_map, alpha, beta, outside):
    located = layer_map.locate(name)
    if located is None:
        return outside
    ref, info = located
    position, depth = info.position(ref.index)
    return linear_scale(position, depth, alpha, beta)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_in_memory_edit_matches_formula(arch):
    base = make_model(arch)
    tuned = perturb(base)
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    edited = LiNeSEditor.from_pretrained(tuned, base_model=base, config=LiNeSConfig(alpha=0.3, beta=0.6), progress=False)

    # The input model is never modified.
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(tensor, before[name]), name

    layer_map = resolve_layers(before, tuned.config.to_dict())
    base_state = base.state_dict()
    for name, value in edited.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, before[name])
            continue
        scale = expected_scale(name, layer_map, 0.3, 0.6, 0.3)
        reference = base_state[name] + scale * (before[name] - base_state[name])
        assert torch.equal(value, reference), name


@pytest.mark.parametrize("arch", ["bert", "t5", "gpt2", "vit", "llama", "clip"])
def test_zero_scales_give_base_bit_for_bit(arch):
    base = make_model(arch)
    tuned = perturb(base)
    edited = LiNeSEditor.from_pretrained(tuned, base_model=base, alpha=0.0, beta=0.0, progress=False)
    for name, value in edited.state_dict().items():
        assert torch.equal(value, base.state_dict()[name]), name


@pytest.mark.parametrize("arch", ["bert", "t5", "gpt2", "vit", "llama", "clip"])
def test_unit_scales_give_finetune_bit_for_bit(arch):
    base = make_model(arch)
    tuned = perturb(base)
    edited = LiNeSEditor.from_pretrained(tuned, base_model=base, alpha=1.0, beta=0.0, progress=False)
    for name, value in edited.state_dict().items():
        assert torch.equal(value, tuned.state_dict()[name]), name


def test_tied_embedding_scaled_once():
    base = make_model("gpt2")
    tuned = perturb(base)
    assert tuned.lm_head.weight.data_ptr() == tuned.transformer.wte.weight.data_ptr()
    edited = LiNeSEditor.from_pretrained(tuned, base_model=base, alpha=0.5, beta=0.5, progress=False)
    b, f = base.transformer.wte.weight, tuned.transformer.wte.weight
    assert torch.equal(edited.transformer.wte.weight, b + 0.5 * (f - b))
    assert edited.lm_head.weight.data_ptr() == edited.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("arch", ["bert", "t5", "llama", "vit", "gpt2", "mixtral"])
def test_cli_and_memory_identical(tmp_path, arch):
    base_dir, tuned_dir = save_pair(tmp_path, arch)
    out = tmp_path / "out"
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--alpha", "0.25", "--beta", "0.5",
                     "--output", str(out), "--no-progress"])
    assert code == 0
    edited = LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=0.25, beta=0.5, progress=False)
    streamed = load_folder(out)
    on_disk = load_folder(tuned_dir)
    assert set(streamed) == set(on_disk)
    # Names on disk may differ from names in memory (ViT), so compare after loading.
    reloaded = type(edited).from_pretrained(out)
    memory = edited.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, memory[name]), name
    assert (out / "config.json").is_file()
    record = json.loads((out / "lines_config.json").read_text())
    assert record["alpha"] == 0.25
    assert record["beta"] == 0.5
    assert record["resolved"]["kind"] == "edit"
    assert (out / "README.md").is_file()


def test_streaming_in_small_chunks_matches(tmp_path, monkeypatch):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "whole", alpha=0.1, beta=0.7, progress=False)
    import lines_hf.engine as engine

    monkeypatch.setattr(engine, "DEFAULT_CHUNK_ELEMENTS", 37)
    monkeypatch.setattr(engine.stream, "__kwdefaults__", {**engine.stream.__kwdefaults__, "chunk_elements": 37})
    LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "chunked", alpha=0.1, beta=0.7, progress=False)
    whole, chunked = load_folder(tmp_path / "whole"), load_folder(tmp_path / "chunked")
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def test_sharded_output_has_index(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    out = LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "out", alpha=0.1, beta=0.7, max_shard_size="40KB",
                                  progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 1
    assert sorted(set(index["weight_map"].values())) == shards
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    memory = LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=0.1, beta=0.7, progress=False)
    for name, tensor in memory.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_bf16_rounded_once(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama", dtype=torch.bfloat16)
    out = LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "out", alpha=0.3, beta=0.4, progress=False)
    edited, base, tuned = load_folder(out), load_folder(base_dir), load_folder(tuned_dir)
    layer_map = resolve_layers(tuned, json.loads((tuned_dir / "config.json").read_text()))
    for name, value in edited.items():
        assert value.dtype == torch.bfloat16
        scale = expected_scale(name, layer_map, 0.3, 0.4, 0.3)
        b, f = base[name].float(), tuned[name].float()
        assert torch.equal(value, (b + scale * (f - b)).to(torch.bfloat16)), name


def test_out_dtype_written_to_config(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    out = LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "out", alpha=0.3, beta=0.4, out_dtype="bfloat16",
                                  progress=False)
    assert all(t.dtype == torch.bfloat16 for t in load_folder(out).values() if t.is_floating_point())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    memory = LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=0.3, beta=0.4, out_dtype="bfloat16",
                                         progress=False)
    for name, tensor in load_folder(out).items():
        assert torch.equal(memory.state_dict()[name], tensor), name


@pytest.mark.parametrize("policy,expected", [("per_stack", {"encoder.block": [0.2, 0.6, 1.0], "decoder.block": [0.2, 1.0]}),
                                             ("global", {"encoder.block": [0.2, 0.4, 0.6], "decoder.block": [0.8, 1.0]})])
def test_t5_stack_policies(policy, expected):
    base = make_model("t5")
    tuned = perturb(base)
    plan = LiNeSEditor.plan(tuned, base, alpha=0.2, beta=0.8, stack_policy=policy)
    for stack, scales in plan.stack_scales().items():
        assert scales == pytest.approx(expected[stack])
    actions = plan.by_name()
    decoder_ffn = actions["decoder.block.1.layer.2.DenseReluDense.wi.weight"]
    assert decoder_ffn.scale == pytest.approx(expected["decoder.block"][1])
    bias = actions["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert bias.scale == pytest.approx(expected["decoder.block"][0])
    assert actions["shared.weight"].scale == pytest.approx(0.2)


@pytest.mark.parametrize("policy,value", [("alpha", 0.2), ("keep", 1.0), ("base", 0.0), (0.35, 0.35)])
def test_non_block_policy(policy, value):
    base = make_model("llama")
    tuned = perturb(base)
    plan = LiNeSEditor.plan(tuned, base, alpha=0.2, beta=0.8, non_block_scale=policy)
    actions = plan.by_name()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert actions[name].scale == value


def test_exclude_keeps_finetuned():
    base = make_model("llama")
    tuned = perturb(base)
    edited = LiNeSEditor.from_pretrained(tuned, base_model=base, alpha=0.0, beta=0.5, exclude=[r"^lm_head\."],
                                         progress=False)
    assert torch.equal(edited.lm_head.weight, tuned.lm_head.weight)
    assert torch.equal(edited.model.norm.weight, base.model.norm.weight)


def test_backbone_base_and_task_finetune(tmp_path):
    """A base saved from BertModel, a fine-tune from BertForSequenceClassification (the MiniLM case)."""
    base = make_model("bert", model_class="BertModel", add_pooling_layer=False) if False else make_model("bert", model_class="BertModel")
    tuned_full = make_model("bert", model_class="BertForSequenceClassification")
    tuned_full.bert.load_state_dict(base.state_dict())
    tuned_full = perturb(tuned_full)
    base.save_pretrained(tmp_path / "base")
    tuned_full.save_pretrained(tmp_path / "tuned")

    out = LiNeSEditor.edit_folder(tmp_path / "tuned", tmp_path / "base", tmp_path / "out", alpha=0.0, beta=0.0,
                                  progress=False)
    edited = load_folder(out)
    base_tensors = load_folder(tmp_path / "base")
    tuned_tensors = load_folder(tmp_path / "tuned")
    assert torch.equal(edited["bert.encoder.layer.1.attention.self.query.weight"],
                       base_tensors["encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(edited["classifier.weight"], tuned_tensors["classifier.weight"])
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["copied_from_finetuned_not_in_base"] == ["classifier.bias", "classifier.weight"] or set(
        record["copied_from_finetuned_not_in_base"]) == {"classifier.bias", "classifier.weight"}


def test_non_float_buffers_copied(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    tuned = load_file(tuned_dir / "model.safetensors")
    tuned["extra.position_ids"] = torch.arange(7)
    save_file(tuned, tuned_dir / "model.safetensors", metadata={"format": "pt"})
    out = LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "out", alpha=0.3, beta=0.3, progress=False)
    assert torch.equal(load_folder(out)["extra.position_ids"], torch.arange(7))


def test_dry_run_prints_table(tmp_path, capsys):
    base_dir, tuned_dir = save_pair(tmp_path, "t5")
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--gamma", "0.5",
                     "--output", str(tmp_path / "out"), "--dry-run"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert rows["encoder.block.2.layer.1.DenseReluDense.wi.weight"] == ["encoder.block", "2", "1", "(block)"]
    assert rows["encoder.block.1.layer.1.DenseReluDense.wi.weight"] == ["encoder.block", "1", "0.75", "(block)"]
    assert rows["shared.weight"] == ["-", "-", "0.5", "(outside", "blocks)"]
    assert "stack decoder.block: 2 blocks" in printed
    assert not (tmp_path / "out").exists()


def test_copies_non_weight_files(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    (tuned_dir / "tokenizer.json").write_text("{}")
    (tuned_dir / "1_Pooling").mkdir()
    (tuned_dir / "1_Pooling" / "config.json").write_text("{}")
    (tuned_dir / "adapter_model.safetensors").write_bytes(b"x")
    (tuned_dir / "pytorch_model.bin").write_bytes(b"x")
    out = LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "out", alpha=0.3, beta=0.3, progress=False)
    assert (out / "tokenizer.json").is_file()
    assert (out / "1_Pooling" / "config.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "pytorch_model.bin").exists()


def test_hub_id_resolved_from_cache(tmp_path, monkeypatch):
    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "org/tiny-base", base_dir)
    add_to_hub_cache(cache, "org/tiny-tuned", tuned_dir)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = LiNeSEditor.edit_folder("org/tiny-tuned", "org/tiny-base", tmp_path / "out", alpha=0.3, beta=0.3,
                                  progress=False)
    reference = LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "ref", alpha=0.3, beta=0.3, progress=False)
    a, b = load_folder(out), load_folder(reference)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["inputs"]["base_model"]["hub_id"] == "org/tiny-base"


def test_vit_new_name_layout_on_disk(tmp_path):
    base = make_model("vit")
    tuned = perturb(base)
    base.save_pretrained(tmp_path / "base", save_original_format=False)
    tuned.save_pretrained(tmp_path / "tuned", save_original_format=False)
    assert "vit.layers.0.attention.q_proj.weight" in load_folder(tmp_path / "tuned")
    out = LiNeSEditor.edit_folder(tmp_path / "tuned", tmp_path / "base", tmp_path / "out", alpha=0.2, beta=0.6,
                                  progress=False)
    memory = LiNeSEditor.from_pretrained(tuned, base_model=base, alpha=0.2, beta=0.6, progress=False).state_dict()
    for name, tensor in load_folder(out).items():
        assert torch.equal(tensor, memory[name]), name


def test_mixed_vit_layouts_rejected(tmp_path):
    from lines_hf import TensorMismatchError

    base = make_model("vit")
    tuned = perturb(base)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned", save_original_format=False)
    with pytest.raises(TensorMismatchError, match="save_original_format"):
        LiNeSEditor.edit_folder(tmp_path / "tuned", tmp_path / "base", tmp_path / "out", alpha=0.2, beta=0.6,
                                progress=False)
    assert not (tmp_path / "out").exists()


def test_debug_flag_after_command(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        cli_main(["edit", "--debug", "--base", str(tmp_path / "nope"), "--finetuned", str(tmp_path / "nope2"),
                  "--alpha", "0", "--beta", "1", "--output", str(tmp_path / "out")])


@pytest.fixture
def transformers_bars_on(monkeypatch):
    """Turn transformers' progress bars on for one test, then put the previous state back."""
    import importlib

    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    # The test session disables the bars through this variable, which would veto enabling them.
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", None)
    was_enabled = transformers_logging.is_progress_bar_enabled()
    hub_disabled = are_progress_bars_disabled()
    transformers_logging.enable_progress_bar()
    yield
    if not was_enabled:
        transformers_logging.disable_progress_bar()
    if hub_disabled:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@pytest.mark.parametrize("progress", [False, True])
def test_progress_flag_reaches_transformers_bars(tmp_path, monkeypatch, progress, transformers_bars_on):
    """progress=False hides transformers' loading and saving bars too, and restores them afterwards."""
    from transformers.utils import logging as transformers_logging

    import lines_hf.editor as editor

    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    seen = []
    real_load = editor._load_folder_model

    def recording_load(*args, **kwargs):
        seen.append(transformers_logging.is_progress_bar_enabled())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(editor, "_load_folder_model", recording_load)
    model = LiNeSEditor.from_pretrained(tuned_dir, base_dir, alpha=0.3, beta=0.5, progress=progress)
    assert seen == [progress, progress]
    assert transformers_logging.is_progress_bar_enabled()

    real_save = type(model).save_pretrained

    def recording_save(self, *args, **kwargs):
        seen.append(transformers_logging.is_progress_bar_enabled())
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "save_pretrained", recording_save)
    LiNeSEditor.save_pretrained(model, tmp_path / "out", progress=progress)
    assert seen[-1] is progress
    assert transformers_logging.is_progress_bar_enabled()


def test_quiet_bars_keep_disabled_state(transformers_bars_on):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    from lines_hf.editor import transformers_bars

    transformers_logging.disable_progress_bar()
    with transformers_bars(False):
        assert not transformers_logging.is_progress_bar_enabled()
    assert not transformers_logging.is_progress_bar_enabled()
    assert are_progress_bars_disabled()
