"""Tiny transformers models built from configs, and base/fine-tune pairs saved to folders.

Every architecture lines_hf supports has an entry in ``ARCHITECTURES``; tests
build models with ``make_model`` and perturb them with ``perturb`` to stand in
for fine-tuning.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import transformers

ARCHITECTURES = ("bert", "roberta", "vit", "t5", "llama", "mistral", "qwen2", "mixtral", "gpt2", "clip", "clip_vision")


def tiny_config(arch: str, **overrides):
    """Return a config of a few hundred thousand parameters for ``arch``."""
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    if arch == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=3, vocab_size=100, max_position_embeddings=64, **common)
    elif arch == "roberta":
        cfg = transformers.RobertaConfig(
            num_hidden_layers=3, vocab_size=100, max_position_embeddings=70, pad_token_id=1, **common
        )
    elif arch == "vit":
        cfg = transformers.ViTConfig(num_hidden_layers=3, image_size=16, patch_size=8, num_channels=3, **common)
    elif arch == "t5":
        cfg = transformers.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0,
        )
    elif arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
        cfg = cls(
            num_hidden_layers=4, vocab_size=100, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, **common,
        )
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(
            num_hidden_layers=3, vocab_size=100, num_key_value_heads=2, num_local_experts=2,
            num_experts_per_tok=1, max_position_embeddings=64, **common,
        )
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    elif arch == "clip":
        cfg = transformers.CLIPConfig(
            text_config=dict(num_hidden_layers=2, vocab_size=100, max_position_embeddings=16, projection_dim=16, **common),
            vision_config=dict(num_hidden_layers=3, image_size=16, patch_size=8, projection_dim=16, **common),
            projection_dim=16,
        )
    elif arch == "clip_vision":
        cfg = transformers.CLIPVisionConfig(num_hidden_layers=3, image_size=16, patch_size=8, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


_CLASSES = {
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
    "vit": "ViTForImageClassification",
    "t5": "T5ForConditionalGeneration",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "clip": "CLIPModel",
    "clip_vision": "CLIPVisionModel",
}


def make_model(arch: str, seed: int = 0, model_class: str | None = None, dtype=torch.float32, **overrides):
    """Build a randomly initialised tiny model of ``arch`` (seeded)."""
    torch.manual_seed(seed)
    cls = getattr(transformers, model_class or _CLASSES[arch])
    model = cls(tiny_config(arch, **overrides))
    return model.to(dtype).eval()


@torch.no_grad()
def perturb(model, seed: int = 1, scale: float = 0.05):
    """Return a copy of ``model`` with every floating-point parameter moved by seeded noise."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for _, param in tuned.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * scale
        param.add_(noise.to(param.dtype))
    return tuned


def save_pair(root: Path, arch: str, dtype=torch.float32, **overrides) -> tuple[Path, Path]:
    """Save a tiny base model and a perturbed fine-tune of ``arch`` under ``root``."""
    base = make_model(arch, dtype=dtype, **overrides)
    tuned = perturb(base)
    base_dir, tuned_dir = Path(root) / f"{arch}-base", Path(root) / f"{arch}-finetuned"
    base.save_pretrained(base_dir)
    tuned.save_pretrained(tuned_dir)
    return base_dir, tuned_dir


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef") -> None:
    """Lay ``folder`` out in ``cache`` as huggingface_hub does: snapshot symlinks into ``blobs/``."""
    repo_dir = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot, blobs, refs = repo_dir / "snapshots" / revision, repo_dir / "blobs", repo_dir / "refs"
    for path in (snapshot, blobs, refs):
        path.mkdir(parents=True, exist_ok=True)
    for file in Path(folder).iterdir():
        if file.is_file():
            (blobs / file.name).write_bytes(file.read_bytes())
            (snapshot / file.name).symlink_to(blobs / file.name)
    (refs / "main").write_text(revision)
