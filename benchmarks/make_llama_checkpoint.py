"""Write a Llama-shaped bf16 checkpoint with random weights, plus perturbed fine-tunes of it.

The model has the tensor names, shapes and ``config.json`` of a
``LlamaForCausalLM`` (hidden size 2048, MLP 5632, 32 query and 4 key/value
heads, vocabulary 32000, untied ``lm_head``). The number of decoder layers is
chosen so the parameter count comes closest to ``--params`` times ``--scale``:
20 layers (1.01e9 parameters) for the default 1e9 and 43 layers (2.03e9) for
``--scale 2``. Tensors are generated and written one at a time through
``lines_hf.checkpoint.ShardWriter``, so memory stays near one float32 copy of
the largest tensor (the 262 MB embedding matrix).

Layout of ``--out``::

    base/     config.json, model-0000{1,2}-of-00002.safetensors, model.safetensors.index.json
    ft0/ ...  the same files, weights = base + seeded noise (one folder per fine-tune)

Weights are ``N(0, 0.02)``, norm weights are 1. Fine-tune ``k`` adds
``N(0, 0.002)`` to every tensor, drawn from its own seed, so fine-tunes differ
from each other and from the base. Values depend only on ``--seed``, the model
index and the tensor name, so a rerun reproduces the files bit for bit.

Example::

    python benchmarks/make_llama_checkpoint.py --out benchmarks/_work/llama1b --finetunes 1 --params 1e9 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lines_hf.checkpoint import ShardWriter
from lines_hf.plan import TensorSpec

LOG = logging.getLogger("make_llama_checkpoint")

BASE_STD = 0.02
FINETUNE_STD = 0.002


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama decoder; ``num_layers`` is the only one fitted to the requested size."""

    num_layers: int
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def specs(self) -> list[TensorSpec]:
        """Return the tensors of ``LlamaForCausalLM`` in the order transformers stores them."""
        kv = self.kv_heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.num_layers):
            prefix = f"model.layers.{layer}."
            shapes += [
                (prefix + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (prefix + "self_attn.k_proj.weight", (kv, self.hidden)),
                (prefix + "self_attn.v_proj.weight", (kv, self.hidden)),
                (prefix + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (prefix + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (prefix + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (prefix + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (prefix + "input_layernorm.weight", (self.hidden,)),
                (prefix + "post_attention_layernorm.weight", (self.hidden,)),
            ]
        shapes += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return [TensorSpec(name=name, dtype="bfloat16", shape=shape) for name, shape in shapes]

    def config(self) -> dict:
        """Return the ``config.json`` contents of a ``LlamaForCausalLM`` with these sizes."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": BASE_STD,
            "torch_dtype": "bfloat16",
        }


def fit_shape(params: float) -> LlamaShape:
    """Return the shape whose parameter count is closest to ``params`` (at least one layer)."""
    one = LlamaShape(num_layers=1)
    two = LlamaShape(num_layers=2)
    per_layer = count_params(two) - count_params(one)
    fixed = count_params(one) - per_layer
    layers = max(1, round((params - fixed) / per_layer))
    return LlamaShape(num_layers=layers)


def count_params(shape: LlamaShape) -> int:
    return sum(spec.numel for spec in shape.specs())


def _generator(seed: int, model_index: int, name: str) -> torch.Generator:
    # Seeding per tensor keeps every value independent of write order and of
    # how many fine-tunes are generated.
    key = zlib.crc32(f"{seed}/{model_index}/{name}".encode())
    return torch.Generator().manual_seed(key)


def base_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Return the base model's value of ``spec`` in float32."""
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape)
    values = torch.empty(spec.shape)
    values.normal_(0.0, BASE_STD, generator=_generator(seed, 0, spec.name))
    return values


def model_tensor(spec: TensorSpec, seed: int, model_index: int) -> torch.Tensor:
    """Return tensor ``spec`` of model ``model_index`` (0 = base, k >= 1 = fine-tune k-1) in bf16."""
    values = base_tensor(spec, seed)
    if model_index > 0:
        noise = torch.empty(spec.shape)
        noise.normal_(0.0, FINETUNE_STD, generator=_generator(seed, model_index, spec.name))
        values += noise
        del noise
    return values.to(torch.bfloat16)


def write_model(folder: Path, shape: LlamaShape, seed: int, model_index: int, shards: int) -> None:
    """Write one model (config, ``shards`` safetensors shards and their index) into ``folder``."""
    specs = shape.specs()
    total_bytes = sum(spec.numel * 2 for spec in specs)
    # Greedy packing fills each shard up to the limit; a small margin over an
    # even split keeps the count at ``shards`` despite tensor boundaries.
    shard_limit = math.ceil(total_bytes / shards * 1.02) if shards > 1 else total_bytes + 1
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with open(folder / "config.json", "w", encoding="utf-8") as handle:
        json.dump(shape.config(), handle, indent=2)
        handle.write("\n")

    writer = ShardWriter(folder, specs, max_shard_size=shard_limit)
    by_name = {spec.name: spec for spec in specs}
    try:
        for name in writer.order:
            writer.write(name, model_tensor(by_name[name], seed, model_index).reshape(-1))
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    LOG.info("wrote %s: %s", folder, ", ".join(files))


def _is_complete(folder: Path, shape: LlamaShape) -> bool:
    # The index is written last, so its presence means the shards are complete.
    # The config comparison catches a folder left by a run with another size.
    config = folder / "config.json"
    if not (folder / "model.safetensors.index.json").is_file() or not config.is_file():
        return False
    with open(config, encoding="utf-8") as handle:
        return json.load(handle) == shape.config()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder; base/ and ft0/ ... go inside")
    parser.add_argument("--finetunes", type=int, default=1, help="number of perturbed fine-tunes to write (default 1)")
    parser.add_argument("--params", type=float, default=1e9, help="target parameter count (default 1e9)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --params by this, e.g. 2 for the 2x model")
    parser.add_argument("--shards", type=int, default=2, help="safetensors shards per model (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--skip-existing", action="store_true", help="keep a model folder already written with the same shape")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.finetunes < 0 or args.shards < 1 or args.params * args.scale <= 0:
        print("error: --finetunes must be >= 0, --shards >= 1, and --params * --scale > 0", file=sys.stderr)
        return 2
    shape = fit_shape(args.params * args.scale)
    LOG.info("Llama shape: %d layers, %.3e parameters", shape.num_layers, count_params(shape))

    folders = [args.out / "base"] + [args.out / f"ft{k}" for k in range(args.finetunes)]
    for model_index, folder in enumerate(folders):
        if args.skip_existing and _is_complete(folder, shape):
            LOG.info("kept existing %s", folder)
            continue
        started = time.perf_counter()
        write_model(folder, shape, args.seed, model_index, args.shards)
        LOG.info("%s took %.1f s", folder.name, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
