"""Layer resolution: which block and stack each tensor of each architecture belongs to."""

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from lines_hf.errors import DepthMismatchError, LayerResolutionError
from lines_hf.layers import align_names, config_depth, resolve_layers
from lines_hf.schedule import linear_scale, linear_scales
from tiny import ARCHITECTURES, make_model


def structural_blocks(model):
    """Reference computed another way: walk the module tree for ModuleLists of transformer layers."""
    expected = {}
    for list_name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not len(module):
            continue
        if not all(isinstance(child, GradientCheckpointingLayer) for child in module):
            continue
        for index, child in enumerate(module):
            for param_name, _ in child.named_parameters(remove_duplicate=False):
                expected[f"{list_name}.{index}.{param_name}"] = (list_name, index)
    return expected


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_match_module_structure(arch):
    model = make_model(arch)
    names = list(model.state_dict())
    layer_map = resolve_layers(names, model.config.to_dict())
    expected = structural_blocks(model)
    assert expected, f"no transformer layers found structurally in {arch}"

    for name, (stack, index) in expected.items():
        ref = layer_map.blocks.get(name)
        assert ref is not None, f"{name} was not assigned to a block"
        assert ref.stack == stack
        assert ref.index == index
    # Everything not inside a layer module is outside every block.
    for name in names:
        if name not in expected and not any(name.startswith(f"{s}.{i}.") for s, i in expected.values()):
            assert name not in layer_map.blocks, f"{name} should be outside every block"


EXPECTED_STACKS = {
    "bert": {"bert.encoder.layer": 3},
    "roberta": {"roberta.encoder.layer": 3},
    "vit": {"vit.layers": 3},
    "t5": {"encoder.block": 3, "decoder.block": 2},
    "llama": {"model.layers": 4},
    "mistral": {"model.layers": 4},
    "qwen2": {"model.layers": 4},
    "mixtral": {"model.layers": 3},
    "gpt2": {"transformer.h": 3},
    "clip": {"text_model.encoder.layers": 2, "vision_model.encoder.layers": 3},
    "clip_vision": {"encoder.layers": 3},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stack_depths_from_config(arch):
    model = make_model(arch)
    layer_map = resolve_layers(model.state_dict(), model.config.to_dict())
    depths = {name: info.depth for name, info in layer_map.stacks.items()}
    assert depths == EXPECTED_STACKS[arch]
    for info in layer_map.stacks.values():
        assert info.depth_source.startswith("config.")


NAME_TABLE = [
    # name, stack, block
    ("encoder.block.2.layer.1.DenseReluDense.wi.weight", "encoder.block", 2),
    ("decoder.block.1.layer.0.SelfAttention.q.weight", "decoder.block", 1),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder.block", 0),
    ("model.layers.5.mlp.experts.0.w1.weight", "model.layers", 5),
    ("model.layers.5.block_sparse_moe.experts.3.w2.weight", "model.layers", 5),
    ("transformer.h.11.attn.c_attn.weight", "transformer.h", 11),
    ("vit.encoder.layer.7.attention.attention.query.weight", "vit.encoder.layer", 7),
    ("vit.layers.7.attention.q_proj.weight", "vit.layers", 7),
    ("vision_model.encoder.layers.10.mlp.fc1.bias", "vision_model.encoder.layers", 10),
    ("bert.encoder.layer.0.output.LayerNorm.weight", "bert.encoder.layer", 0),
    ("encoder.layer.4.attention.self.query.weight", "encoder.layer", 4),
]


@pytest.mark.parametrize("name,stack,block", NAME_TABLE)
def test_block_of_name(name, stack, block):
    layer_map = resolve_layers([name], None, num_layers=12, require_all_blocks=False)
    ref = layer_map.blocks[name]
    assert (ref.stack, ref.index) == (stack, block)


@pytest.mark.parametrize(
    "name",
    ["shared.weight", "lm_head.weight", "model.norm.weight", "vit.embeddings.cls_token", "encoder.final_layer_norm.weight",
     "feature_extractor.conv_layers.0.conv.weight", "logit_scale", "classifier.weight"],
)
def test_outside_names(name):
    layer_map = resolve_layers([name, "model.layers.0.x.weight"], None, num_layers=1)
    assert name not in layer_map.blocks
    assert name in layer_map.outside


def test_schedule_values():
    assert linear_scales(5, 0.2, 0.8) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert linear_scale(0, 1, 0.3, 0.5) == 0.8  # a single block is the last block
    assert linear_scale(3, 4, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="depth 4"):
        linear_scale(4, 4, 0.0, 1.0)


def test_t5_global_numbering():
    model = make_model("t5")
    layer_map = resolve_layers(model.state_dict(), model.config.to_dict(), stack_policy="global")
    encoder, decoder = layer_map.stacks["encoder.block"], layer_map.stacks["decoder.block"]
    assert [encoder.position(i) for i in range(3)] == [(0, 5), (1, 5), (2, 5)]
    assert [decoder.position(i) for i in range(2)] == [(3, 5), (4, 5)]


def test_global_rejected_for_parallel_towers():
    model = make_model("clip")
    with pytest.raises(LayerResolutionError, match="per_stack"):
        resolve_layers(model.state_dict(), model.config.to_dict(), stack_policy="global")


def test_depth_mismatch_names_both_numbers():
    names = [f"model.layers.{i}.mlp.weight" for i in range(3)]
    with pytest.raises(DepthMismatchError, match=r"depth 4 but 3 blocks"):
        resolve_layers(names, {"num_hidden_layers": 4})
    # An explicit depth overrides the config.
    layer_map = resolve_layers(names, {"num_hidden_layers": 4}, num_layers=3)
    assert layer_map.stacks["model.layers"].depth == 3


def test_block_beyond_config_depth():
    names = [f"model.layers.{i}.mlp.weight" for i in range(5)]
    with pytest.raises(DepthMismatchError, match="numbered 4"):
        resolve_layers(names, {"num_hidden_layers": 4})


def test_no_blocks_lists_names_and_fix():
    names = ["backbone.stages.0.conv.weight", "head.weight"]
    with pytest.raises(LayerResolutionError) as info:
        resolve_layers(names, {"num_hidden_layers": 1})
    message = str(info.value)
    assert "backbone.stages.0.conv.weight" in message
    assert "--layer-pattern" in message
    assert "--num-layers" in message


def test_custom_layer_pattern():
    names = ["backbone.stages.0.conv.weight", "backbone.stages.1.conv.weight", "head.weight"]
    layer_map = resolve_layers(names, None, layer_pattern=r"^backbone\.stages\.(\d+)\.", num_layers=2)
    assert layer_map.blocks["backbone.stages.1.conv.weight"].index == 1
    assert layer_map.blocks["backbone.stages.1.conv.weight"].stack == "backbone.stages"
    assert "head.weight" in layer_map.outside


def test_config_depth_keys():
    assert config_depth("transformer.h", {"n_layer": 7}) == (7, "n_layer")
    assert config_depth("decoder.block", {"model_type": "t5", "num_layers": 6}) == (6, "num_layers")
    assert config_depth("decoder.block", {"num_layers": 6, "num_decoder_layers": 2}) == (2, "num_decoder_layers")
    assert config_depth("text_model.encoder.layers", {"text_config": {"num_hidden_layers": 12}, "vision_config": {"num_hidden_layers": 24}}) == (
        12,
        "text_config.num_hidden_layers",
    )


def test_align_backbone_prefix():
    finetuned = ["bert.encoder.layer.0.w", "bert.embeddings.word_embeddings.weight", "classifier.weight"]
    base = ["encoder.layer.0.w", "embeddings.word_embeddings.weight", "embeddings.position_ids"]
    mapping = align_names(finetuned, base)
    assert mapping == {
        "bert.encoder.layer.0.w": "encoder.layer.0.w",
        "bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "classifier.weight": None,
    }
    # The other direction: a base saved from a task model, a fine-tune from the backbone.
    assert align_names(base[:2], finetuned)["encoder.layer.0.w"] == "bert.encoder.layer.0.w"


@pytest.mark.parametrize("alpha,beta", [(0.2, 0.8), (0.1, 0.9), (0.3, 0.7), (0.0, 1.0)])
@pytest.mark.parametrize("depth", [2, 3, 6, 12, 30])
def test_last_block_exactly_alpha_plus_beta(alpha, beta, depth):
    assert linear_scale(depth - 1, depth, alpha, beta) == alpha + beta
    assert linear_scale(depth - 1, depth, alpha, beta) == 1.0


def test_gamma_last_block_exactly_one():
    from lines_hf.schedule import gamma_to_alpha_beta

    for step in range(11):
        alpha, beta = gamma_to_alpha_beta(step / 10)
        assert linear_scale(11, 12, alpha, beta) == 1.0
