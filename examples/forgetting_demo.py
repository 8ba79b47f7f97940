"""Fine-tune, choose gamma, apply LiNeS and save: the demo's steps, to adapt to your own model and data.

Replace the three marked inputs: the pre-trained encoder folder, the target
task and the control tasks (each a ``datasets.DatasetDict`` with ``train``,
``validation`` and ``test`` splits and ``text``/``label`` columns). Runs
offline in about ten minutes on 2 CPU cores with the bundled MiniLM.

    python examples/forgetting_demo.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from lines_hf import LiNeSConfig, LiNeSEditor  # noqa: E402
from lines_hf.evaluation import ControlProbes, target_accuracy  # noqa: E402
from lines_hf.selection import select_gamma  # noqa: E402
from lines_hf.tasks import FinetuneSettings, finetune_cached, load_task, minilm_path  # noqa: E402

# 1. Your inputs: the pre-trained model, the task to fine-tune on, and tasks it should not forget.
base_dir = minilm_path()
target = load_task("tweet_sentiment", train_size=1500, validation_size=200, test_size=400)
controls = {
    name: load_task(name, train_size=400, validation_size=200, test_size=400)
    for name in ("food_reviews", "trump_source")
}

# 2. Fine-tune with transformers.Trainer; the result is cached, so a second run skips this.
finetuned_dir = finetune_cached(
    "tweet_sentiment", ".cache/lines_hf/finetunes", data=target, base_model=base_dir,
    settings=FinetuneSettings(epochs=3, learning_rate=2e-4),
)
tokenizer = transformers.AutoTokenizer.from_pretrained(finetuned_dir)
base = transformers.AutoModel.from_pretrained(base_dir).eval()
finetuned = transformers.AutoModelForSequenceClassification.from_pretrained(finetuned_dir).eval()

# 3. Control accuracy: frozen probes fitted once on the pre-trained encoder's embeddings.
probes = ControlProbes(base, tokenizer, controls)

# 4. Choose gamma on the validation splits (grid 1.0, 0.9, ..., 0.0, edited in memory).
selection = select_gamma(
    finetuned,
    base,
    evaluate_target=lambda model: target_accuracy(model, tokenizer, target["validation"]),
    evaluate_control=lambda model: probes.accuracies(model, split="validation"),
    zeroshot_control_accuracies=probes.zeroshot["validation"],
)
gamma = selection.best_value

# 5. Apply LiNeS with that gamma, compare on the test splits, and save with card and lines_config.json.
edited = LiNeSEditor.from_pretrained(str(finetuned_dir), base_model=str(base_dir), config=LiNeSConfig(gamma=gamma))
for name, model in (("fine-tuned", finetuned), (f"LiNeS gamma={gamma:g}", edited)):
    control = probes.normalized(probes.accuracies(model, split="test"), split="test")
    print(
        f"{name:<18} target {target_accuracy(model, tokenizer, target['test']):.3f}  "
        f"control / pre-trained {sum(control.values()) / len(control):.3f}"
    )
print("Saved to", LiNeSEditor.save_pretrained(edited, "lines-example-output", overwrite=True))
