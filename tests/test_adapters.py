"""LiNeS on LoRA adapters: the delta ``B @ A`` of every module, adapter and merged modes, files."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lines_hf import LiNeSConfig, LiNeSEditor, UnsupportedAdapterError
from lines_hf.adapters import edit_adapter_folder, is_quantized
from lines_hf.cli import main as cli_main
from tiny import make_model

ALPHA, BETA = 0.2, 0.8
CONFIG = LiNeSConfig(alpha=ALPHA, beta=BETA)

# Per architecture: LoRA target modules, and (regex of a module's stack and block, depth per stack).
# The block regexes are written out here, independently of lines_hf.layers.
CASES = {
    "bert": (["query", "value"], r"^bert\.encoder\.layer\.(\d+)\.", {"": 3}),
    "t5": (["q", "v"], r"^(encoder|decoder)\.block\.(\d+)\.", {"encoder": 3, "decoder": 2}),
    "llama": (["q_proj", "v_proj", "down_proj"], r"^model\.layers\.(\d+)\.", {"": 4}),
    "gpt2": (["c_attn", "c_fc"], r"^transformer\.h\.(\d+)\.", {"": 3}),
    "vit": (["q_proj", "v_proj"], r"^vit\.layers\.(\d+)\.", {"": 3}),
}


def expected_scale(arch: str, module: str, alpha: float = ALPHA, beta: float = BETA) -> float:
    """The LiNeS scale of ``module`` computed from the table above."""
    _, pattern, depths = CASES[arch]
    match = re.match(pattern, module)
    if match is None:
        return alpha
    stack, block = (match.group(1), int(match.group(2))) if match.re.groups == 2 else ("", int(match.group(1)))
    depth = depths[stack]
    return alpha + beta * (block / (depth - 1) if depth > 1 else 1.0)


def lora_model(arch: str, seed: int = 0, **lora_kwargs):
    """A tiny model of ``arch`` with a randomly initialised LoRA adapter (B is non-zero)."""
    targets = CASES[arch][0]
    options = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    if arch == "gpt2":
        options["fan_in_fan_out"] = True
    options.update(lora_kwargs)
    base = make_model(arch, seed=seed)
    torch.manual_seed(seed + 100)
    return get_peft_model(base, LoraConfig(**options))


def lora_deltas(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Return ``get_delta_weight`` (scaling * B @ A, transposed for fan_in_fan_out) of every LoRA module."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight(adapter).detach().clone()
    return deltas


def sample_inputs(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    ids = torch.randint(3, 100, (2, 9))
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


@torch.no_grad()
def logits(model, arch: str) -> torch.Tensor:
    model.eval()
    return model(**sample_inputs(arch)).logits


@pytest.mark.parametrize("arch", sorted(CASES))
def test_delta_scaled_per_block(arch):
    model = lora_model(arch)
    before = lora_deltas(model)
    edited = LiNeSEditor.from_pretrained(model, config=CONFIG)
    after = lora_deltas(edited)

    assert len(before) > 0
    assert set(after) == set(before)
    for module, delta in before.items():
        scale = expected_scale(arch, module)
        torch.testing.assert_close(after[module], scale * delta, rtol=1e-5, atol=1e-7, msg=module)
    # The input PeftModel is never modified.
    for module, delta in lora_deltas(model).items():
        assert torch.equal(delta, before[module]), module


def test_t5_encoder_decoder_told_apart():
    model = lora_model("t5")
    edited = LiNeSEditor.from_pretrained(model, config=CONFIG)
    scales = edited.lines_record["adapter"]["module_scales"]

    # Encoder depth 3: block 1 sits halfway; decoder depth 2: block 1 is the last block.
    assert scales["encoder.block.1.layer.0.SelfAttention.q"] == pytest.approx(ALPHA + BETA / 2)
    assert scales["decoder.block.1.layer.0.SelfAttention.q"] == pytest.approx(ALPHA + BETA)
    assert scales["decoder.block.1.layer.1.EncDecAttention.q"] == pytest.approx(ALPHA + BETA)
    assert set(edited.lines_record["stacks"]) == {"encoder.block", "decoder.block"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bert"])
def test_adapter_then_merge_equals_merged_mode(arch):
    model = lora_model(arch)
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora" not in k}
    deltas = lora_deltas(model)

    adapter_mode = LiNeSEditor.from_pretrained(model, config=CONFIG)
    via_adapter = adapter_mode.merge_and_unload().state_dict()
    merged = LiNeSEditor.from_pretrained(model, config=CONFIG, merge=True)
    merged_state = merged.state_dict()

    assert not hasattr(merged, "peft_config")
    assert merged.lines_record["adapter"]["merged"] is True
    for name, tensor in via_adapter.items():
        assert torch.equal(tensor, merged_state[name]), name
    # Reference computed another way: base + lambda * (scaling * B @ A).
    for module, delta in deltas.items():
        key = f"{module}.weight"
        clean_key = key.replace(".base_layer", "")
        original = base_state.get(f"{module}.base_layer.weight", base_state.get(clean_key))
        expected = original + expected_scale(arch, module) * delta
        torch.testing.assert_close(merged_state[clean_key], expected, rtol=1e-5, atol=1e-6, msg=module)


@pytest.mark.parametrize("arch", ["llama", "vit", "gpt2"])
def test_saved_adapter_reloads_with_peft(arch, tmp_path):
    model = lora_model(arch)
    edited = LiNeSEditor.from_pretrained(model, config=CONFIG)
    LiNeSEditor.save_pretrained(edited, tmp_path / "out")

    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lines_config.json", "README.md"} <= files
    saved = json.loads((tmp_path / "out" / "lines_config.json").read_text())
    assert saved["alpha"] == ALPHA
    assert saved["resolved"]["kind"] == "adapter"

    base = make_model(arch)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, arch), logits(edited, arch), rtol=0, atol=0)
    # And the edit changed the outputs at all.
    assert not torch.allclose(logits(model, arch), logits(edited, arch))


def test_rslora_scaled_exactly():
    model = lora_model("llama", use_rslora=True, r=8, lora_alpha=4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(4 / 8**0.5)
    before = lora_deltas(model)
    after = lora_deltas(LiNeSEditor.from_pretrained(model, config=CONFIG))
    for module, delta in before.items():
        torch.testing.assert_close(after[module], expected_scale("llama", module) * delta, rtol=1e-5, atol=1e-7)


def test_lora_bias_scaled_with_b():
    model = lora_model("bert", lora_bias=True)
    layer = model.base_model.model.bert.encoder.layer[2].attention.self.query
    torch.nn.init.normal_(layer.lora_B["default"].bias)
    bias_before = layer.lora_B["default"].bias.detach().clone()
    key = "bert.encoder.layer.2.attention.self.query.bias"
    base_bias = layer.get_base_layer().bias.detach().clone()
    merged_unscaled = copy.deepcopy(model).merge_and_unload().state_dict()

    edited = LiNeSEditor.from_pretrained(model, config=CONFIG)
    edited_layer = edited.base_model.model.bert.encoder.layer[2].attention.self.query
    torch.testing.assert_close(edited_layer.lora_B["default"].bias, (ALPHA + BETA) * bias_before)

    # The merged bias moves from the base bias by lambda times the unscaled merge's change.
    merged = LiNeSEditor.from_pretrained(model, config=CONFIG, merge=True).state_dict()
    expected = base_bias + (ALPHA + BETA) * (merged_unscaled[key] - base_bias)
    assert not torch.equal(merged_unscaled[key], base_bias)
    torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-7)


def test_embedding_lora_gets_non_block_scale():
    model = lora_model("llama", target_modules=["embed_tokens", "q_proj"])
    before = lora_deltas(model)
    assert "model.embed_tokens" in before
    after = lora_deltas(LiNeSEditor.from_pretrained(model, config=CONFIG))
    torch.testing.assert_close(after["model.embed_tokens"], ALPHA * before["model.embed_tokens"])

    keep = LiNeSEditor.from_pretrained(model, config=LiNeSConfig(alpha=ALPHA, beta=BETA, non_block_scale="keep"))
    assert torch.equal(lora_deltas(keep)["model.embed_tokens"], before["model.embed_tokens"])


def test_several_adapters_all_or_selected():
    model = lora_model("llama")
    torch.manual_seed(5)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"], init_lora_weights=False))
    first, second = lora_deltas(model, "default"), lora_deltas(model, "second")

    both = LiNeSEditor.from_pretrained(model, config=CONFIG)
    for adapter, reference in (("default", first), ("second", second)):
        for module, delta in lora_deltas(both, adapter).items():
            torch.testing.assert_close(delta, expected_scale("llama", module) * reference[module], rtol=1e-5, atol=1e-7)

    only_second = LiNeSEditor.from_pretrained(model, config=CONFIG, adapter_names=["second"])
    for module, delta in lora_deltas(only_second, "default").items():
        assert torch.equal(delta, first[module]), module
    for module, delta in lora_deltas(only_second, "second").items():
        torch.testing.assert_close(delta, expected_scale("llama", module) * second[module], rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="missing"):
        LiNeSEditor.from_pretrained(model, config=CONFIG, adapter_names=["missing"])


def test_layers_to_transform_uses_base_depth():
    model = lora_model("llama", layers_to_transform=[1, 2])
    edited = LiNeSEditor.from_pretrained(model, config=CONFIG)
    scales = edited.lines_record["adapter"]["module_scales"]
    # Depth 4 from the base config, not the 2 blocks the adapter touches.
    assert scales["model.layers.1.self_attn.q_proj"] == pytest.approx(ALPHA + BETA / 3)
    assert scales["model.layers.2.self_attn.q_proj"] == pytest.approx(ALPHA + 2 * BETA / 3)
    assert edited.lines_record["stacks"]["model.layers"]["depth"] == 4


def test_dora_refused_in_adapter_mode():
    model = lora_model("llama", use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        LiNeSEditor.from_pretrained(model, config=CONFIG)


def test_dora_merged_scales_task_vector():
    model = lora_model("llama", use_dora=True)
    with torch.no_grad():  # a trained magnitude differs from the weight norm it starts at
        for module in model.modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                module.lora_magnitude_vector["default"].weight.mul_(1.3)
    base_state = {
        k.replace(".base_layer", ""): v.clone() for k, v in model.get_base_model().state_dict().items() if "lora" not in k
    }
    dora_merged = copy.deepcopy(model).merge_and_unload().state_dict()

    merged = LiNeSEditor.from_pretrained(model, config=CONFIG, merge=True).state_dict()
    assert merged.keys() == dora_merged.keys()
    changed = 0
    for name, tensor in merged.items():
        match = re.match(r"^model\.layers\.(\d+)\.(self_attn\.[qv]_proj|mlp\.down_proj)\.weight$", name)
        if match is None:
            assert torch.equal(tensor, dora_merged[name]), name
            continue
        scale = ALPHA + BETA * int(match.group(1)) / 3
        expected = base_state[name] + scale * (dora_merged[name] - base_state[name])
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)
        changed += 1
    assert changed == 12


def test_non_lora_adapter_named_in_error():
    base = make_model("llama")
    model = get_peft_model(base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(UnsupportedAdapterError, match="IA3"):
        LiNeSEditor.from_pretrained(model, config=CONFIG)


def test_modules_to_save_follow_non_block_policy():
    base = make_model("bert")
    torch.manual_seed(3)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False)
    )
    wrapper = model.base_model.model.classifier
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(0.5)
    original = wrapper.original_module.weight.detach().clone()
    trained = wrapper.modules_to_save["default"].weight.detach().clone()

    edited = LiNeSEditor.from_pretrained(model, config=CONFIG)
    head = edited.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(head, original + ALPHA * (trained - original))

    kept = LiNeSEditor.from_pretrained(model, config=LiNeSConfig(alpha=ALPHA, beta=BETA, non_block_scale="keep"))
    assert torch.equal(kept.base_model.model.classifier.modules_to_save["default"].weight, trained)


def save_adapter_pair(tmp_path, arch: str = "llama", **lora_kwargs):
    """Save a base model folder and a LoRA adapter folder whose config names that base."""
    model = lora_model(arch, **lora_kwargs)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_model(arch).save_pretrained(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


def test_adapter_folder_without_base_argument(tmp_path):
    model, base_dir, adapter_dir = save_adapter_pair(tmp_path)
    edited = LiNeSEditor.from_pretrained(str(adapter_dir), config=CONFIG)
    assert isinstance(edited, PeftModel)
    for module, delta in lora_deltas(model).items():
        torch.testing.assert_close(lora_deltas(edited)[module], expected_scale("llama", module) * delta, rtol=1e-5, atol=1e-7)
    assert edited.lines_record["inputs"]["base_model"]["path"] == str(base_dir)


def test_folder_mode_matches_memory_mode(tmp_path, monkeypatch):
    import transformers

    from lines_hf import checkpoint

    base = make_model("bert")
    torch.manual_seed(3)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    )
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_model("bert").save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)

    memory = LiNeSEditor.from_pretrained(str(adapter_dir), base_model=str(base_dir), config=CONFIG)
    LiNeSEditor.save_pretrained(memory, tmp_path / "memory")

    # Folder mode must neither load a model nor read base tensors other than the head.
    def no_model_loading(*args, **kwargs):
        raise AssertionError("folder mode loaded a whole model")

    read_names = []
    original_read = checkpoint.FolderSource.read

    def recording_read(self, name):
        if self.folder == base_dir:
            read_names.append(name)
        return original_read(self, name)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_model_loading)
    monkeypatch.setattr(checkpoint.FolderSource, "read", recording_read)
    status = cli_main(
        ["edit", "--base", str(base_dir), "--adapter", str(adapter_dir), "--alpha", str(ALPHA), "--beta", str(BETA),
         "--output", str(tmp_path / "folder")]
    )
    assert status == 0
    assert sorted(read_names) == ["classifier.bias", "classifier.weight"]

    from_memory = load_file(tmp_path / "memory" / "adapter_model.safetensors")
    from_folder = load_file(tmp_path / "folder" / "adapter_model.safetensors")
    assert from_memory.keys() == from_folder.keys()
    for key in from_memory:
        assert torch.equal(from_memory[key], from_folder[key]), key
    record = json.loads((tmp_path / "folder" / "lines_config.json").read_text())["resolved"]
    assert record["command"].startswith("lines-hf edit --base")
    assert (tmp_path / "folder" / "adapter_config.json").is_file()


def test_cli_merge_writes_plain_model(tmp_path):
    import transformers

    model, base_dir, adapter_dir = save_adapter_pair(tmp_path)
    status = cli_main(
        ["edit", "--base", str(base_dir), "--adapter", str(adapter_dir), "--alpha", str(ALPHA), "--beta", str(BETA),
         "--output", str(tmp_path / "merged"), "--merge"]
    )
    assert status == 0
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert not any(name.startswith("adapter_") for name in files)
    assert {"config.json", "model.safetensors", "lines_config.json"} <= files

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = LiNeSEditor.from_pretrained(model, config=CONFIG, merge=True)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


PROBE_PROGRESS = """
import sys
from lines_hf.cli import main
main(sys.argv[1:])
import transformers  # imported after the command, as the CLI does lazily
print("bars", transformers.utils.logging.is_progress_bar_enabled())
"""


@pytest.mark.parametrize(("flag", "expected"), [(["--no-progress"], "bars False"), ([], "bars True")])
def test_cli_no_progress_reaches_transformers(tmp_path, flag, expected):
    """--no-progress silences transformers' weight-loading bars too (the adapter --merge path loads a model)."""
    _, base_dir, adapter_dir = save_adapter_pair(tmp_path)
    command = [sys.executable, "-c", PROBE_PROGRESS, "edit", "--base", str(base_dir), "--adapter", str(adapter_dir),
               "--alpha", str(ALPHA), "--beta", str(BETA), "--output", str(tmp_path / "out"), "--dry-run", "--quiet", *flag]
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == expected


def test_cli_dry_run_lists_modules(tmp_path, capsys):
    _, base_dir, adapter_dir = save_adapter_pair(tmp_path)
    status = cli_main(
        ["edit", "--base", str(base_dir), "--adapter", str(adapter_dir), "--gamma", "0.5",
         "--output", str(tmp_path / "unused"), "--dry-run"]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "model.layers.3.self_attn.q_proj" in out
    assert "stack model.layers: 4 blocks" in out
    assert not (tmp_path / "unused").exists()


def test_folder_mode_rejects_dora(tmp_path):
    _, base_dir, adapter_dir = save_adapter_pair(tmp_path, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="--merge"):
        edit_adapter_folder(adapter_dir, tmp_path / "out", CONFIG, base=base_dir)
    assert not (tmp_path / "out").exists()


def test_quantized_base_adapter_mode_only():
    # bitsandbytes does not run on this CPU-only machine, so a quantization
    # config replaces a real QLoRA base: detection reads the same fields.
    model = lora_model("llama")
    model.get_base_model().config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert is_quantized(model)
    before = lora_deltas(model)

    edited = LiNeSEditor.from_pretrained(model, config=CONFIG)
    for module, delta in before.items():
        torch.testing.assert_close(lora_deltas(edited)[module], expected_scale("llama", module) * delta, rtol=1e-5, atol=1e-7)
    with pytest.raises(UnsupportedAdapterError, match="full-precision"):
        LiNeSEditor.from_pretrained(model, config=CONFIG, merge=True)


def test_gguf_config_is_not_quantized():
    model = lora_model("llama")
    model.get_base_model().config.quantization_config = {"quant_method": "gguf"}
    assert not is_quantized(model)
    assert not is_quantized(lora_model("llama"))


def test_head_missing_from_base_copied(tmp_path):
    # The base is a bare BertModel, so the classification head has no pre-trained value.
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_model("bert", model_class="BertModel").save_pretrained(base_dir)
    torch.manual_seed(3)
    model = get_peft_model(
        make_model("bert"), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False)
    )
    model.save_pretrained(adapter_dir)
    trained = load_file(adapter_dir / "adapter_model.safetensors")
    head = "base_model.model.classifier.weight"

    memory = LiNeSEditor.from_pretrained(str(adapter_dir), base_model=str(base_dir), config=CONFIG)
    LiNeSEditor.save_pretrained(memory, tmp_path / "memory")
    record = edit_adapter_folder(adapter_dir, tmp_path / "folder", CONFIG, base=base_dir)

    assert "classifier.weight" in memory.lines_record["copied_from_finetuned_not_in_base"]
    assert "classifier.weight" in record["copied_from_finetuned_not_in_base"]
    for folder in ("memory", "folder"):
        saved = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert torch.equal(saved[head], trained[head]), folder


def test_adapter_given_as_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tiny import add_to_hub_cache

    model, base_dir, adapter_dir = save_adapter_pair(tmp_path)
    add_to_hub_cache(tmp_path / "hub", "org/tiny-lora", adapter_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    edited = LiNeSEditor.from_pretrained("org/tiny-lora", base_model=str(base_dir), config=CONFIG)
    assert isinstance(edited, PeftModel)
    for module, delta in lora_deltas(model).items():
        torch.testing.assert_close(lora_deltas(edited)[module], expected_scale("llama", module) * delta, rtol=1e-5, atol=1e-7)
