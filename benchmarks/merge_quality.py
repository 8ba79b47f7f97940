"""Merge real MiniLM fine-tunes with every method, with and without LiNeS, and score them on test splits.

The bundled all-MiniLM-L6-v2 is fine-tuned on each task (``lines_hf.tasks``;
fine-tunes are cached under ``--cache`` and shared with the other
benchmarks). Every method of ``lines_hf.merging`` then merges the fine-tunes
twice: with LiNeS (automatic alpha, beta chosen on the validation splits over
the method's reference grid) and as the plain baseline (one global scale,
chosen on the same splits over the same grid). Each task is scored with the
merged backbone and its own classification head. The normalised accuracy of a
task is its accuracy over its fine-tuned accuracy on the same split.

Example::

    flock /tmp/lines_hf_heavy.lock python benchmarks/merge_quality.py

Writes ``<work>/merge_quality.json``, ``<work>/merge_quality.md`` (the table)
and ``benchmarks/merge_quality.png`` (the plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import transformers

from lines_hf.checkpoint import FolderSource
from lines_hf.config import LiNeSConfig
from lines_hf.engine import DictSink
from lines_hf.merge import Merger, choose_scale, folder_sources, open_inputs
from lines_hf.merging import METHODS, MergeMethod, reference_grid
from lines_hf.tasks import available_tasks, finetune_cached, load_task, minilm_path

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("merge_quality")


class TaskScorer:
    """Scores a merged backbone on each task with that task's own head, on pre-tokenized splits."""

    def __init__(self, folders: dict[str, Path], data: dict, *, max_length: int = 64, batch_size: int = 128):
        self.tasks = list(folders)
        first = folders[self.tasks[0]]
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(first)
        self.models = {
            task: transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
            for task, folder in folders.items()
        }
        # One working model carries the merged backbone; each task borrows it
        # with its own head.
        self.backbone = transformers.AutoModelForSequenceClassification.from_pretrained(first).eval()
        self.batches: dict[tuple[str, str], list] = {}
        for task in self.tasks:
            for split in ("validation", "test"):
                texts, labels = data[task][split]["text"], data[task][split]["label"]
                order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
                batches = []
                for start in range(0, len(order), batch_size):
                    index = order[start : start + batch_size]
                    encoded = self.tokenizer(
                        [texts[i] for i in index], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt",
                    )
                    batches.append((encoded, torch.tensor([labels[i] for i in index])))
                self.batches[(task, split)] = batches

    @torch.inference_mode()
    def _accuracy(self, model, task: str, split: str) -> float:
        correct = total = 0
        for encoded, labels in self.batches[(task, split)]:
            pooled = model.bert(**encoded).pooler_output
            logits = self.models[task].classifier(pooled)
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
        return correct / total

    def finetuned(self, split: str) -> dict[str, float]:
        return {task: self._accuracy(self.models[task], task, split) for task in self.tasks}

    def merged(self, state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        self.backbone.load_state_dict(state, strict=False)
        return {task: self._accuracy(self.backbone, task, split) for task in self.tasks}


def merged_state(merger: Merger, alpha: float | None, value: float, lines: bool) -> dict[str, torch.Tensor]:
    plan = merger.scaled_plan(alpha, value, lines=True) if lines else merger.scaled_plan(value, 0.0, lines=False)
    sink = DictSink(plan.actions)
    merger.run(plan, sink)
    return sink.tensors


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    positions = range(len(methods))
    baseline = [100 * results["methods"][m]["baseline"]["test_mean_normalized"] for m in methods]
    lines = [100 * results["methods"][m]["lines"]["test_mean_normalized"] for m in methods]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.bar([p - 0.2 for p in positions], baseline, width=0.4, label="baseline (one global scale)")
    axis.bar([p + 0.2 for p in positions], lines, width=0.4, label="with LiNeS")
    axis.set_xticks(list(positions), methods)
    axis.set_ylabel("mean normalised test accuracy (%)")
    low = min(baseline + lines)
    axis.set_ylim(max(0, low - 10), 100)
    axis.set_title(f"Merging {len(results['tasks'])} MiniLM fine-tunes ({', '.join(results['tasks'])})", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def table(results: dict) -> str:
    tasks = results["tasks"]
    header = "| method | variant | chosen | " + " | ".join(tasks) + " | mean acc. | mean norm. acc. |"
    rows = [header, "|" + "---|" * (len(tasks) + 5)]
    fine = results["finetuned_test"]
    rows.append("| fine-tuned (each task its own model) | - | - | " + " | ".join(f"{100 * fine[t]:.1f}" for t in tasks)
                + f" | {100 * mean(fine.values()):.1f} | 100.0 |")
    for method, entry in results["methods"].items():
        for variant, label in (("baseline", "baseline"), ("lines", "LiNeS")):
            item = entry[variant]
            chosen = f"scale {item['chosen']:g}" if variant == "baseline" else f"alpha {item['alpha']:.3g}, beta {item['chosen']:g}"
            rows.append(
                f"| {method} | {label} | {chosen} | " + " | ".join(f"{100 * item['test'][t]:.1f}" for t in tasks)
                + f" | {100 * item['test_mean']:.1f} | {100 * item['test_mean_normalized']:.1f} |"
            )
    lines = ["\n".join(rows), ""]
    for method, entry in results["methods"].items():
        gain = 100 * (entry["lines"]["test_mean_normalized"] - entry["baseline"]["test_mean_normalized"])
        verdict = "improved it" if gain > 0 else "did not improve it"
        lines.append(f"- {method}: LiNeS changed the mean normalised test accuracy by {gain:+.1f} points ({verdict}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", help="tasks to merge (default: every installed task)")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks/_work/finetunes")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks/_work/merge_quality")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/merge_quality.png")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-train", action="store_true", help="use only fine-tunes already in the cache")
    parser.add_argument("--grid", type=float, nargs="+", help="values to search (default: each method's reference grid)")
    parser.add_argument(
        "--grid-step", type=int, default=1,
        help="search every N-th value of each reference grid (2: 0.2, 0.4, ...), to save evaluation time",
    )
    parser.add_argument("--validation-size", type=int, default=300, help="validation examples per task")
    parser.add_argument("--test-size", type=int, default=1000, help="test examples per task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()

    tasks = args.tasks or available_tasks()
    # The training split is drawn first, so these sizes do not change the cached fine-tunes.
    data = {task: load_task(task, validation_size=args.validation_size, test_size=args.test_size) for task in tasks}
    folders = {}
    for task in tasks:
        if args.no_train:
            found = sorted(args.cache.glob(f"{task}-*/finetune.json"))
            if not found:
                LOG.warning("No cached fine-tune of %s: leaving it out", task)
                continue
            folders[task] = found[0].parent
        else:
            folders[task] = finetune_cached(task, args.cache, data=data[task], progress=False)
    tasks = list(folders)
    if len(tasks) < 2:
        print("error: need fine-tunes of at least two tasks", file=sys.stderr)
        return 1

    scorer = TaskScorer(folders, data)
    finetuned_validation = scorer.finetuned("validation")
    finetuned_test = scorer.finetuned("test")
    LOG.info("Fine-tuned accuracy: validation %s, test %s", finetuned_validation, finetuned_test)

    base = FolderSource(minilm_path())
    sources = folder_sources([folders[t] for t in tasks], base)
    results = {"tasks": tasks, "finetunes": {t: str(folders[t]) for t in tasks},
               "finetuned_validation": finetuned_validation, "finetuned_test": finetuned_test, "methods": {}}
    for name in args.methods:
        merger = Merger(base, open_inputs(base, sources, tasks), MergeMethod(name), LiNeSConfig())
        grid = args.grid or reference_grid(name)[args.grid_step - 1 :: args.grid_step]
        entry = {}
        for variant, lines in (("baseline", False), ("lines", True)):
            alpha = merger.auto_alpha() if lines else None
            selection = choose_scale(
                merger, lambda state: scorer.merged(dict(state), "validation"), finetuned_validation, lines=lines, alpha=alpha,
                grid=grid,
            )
            chosen = selection.best_value
            test = scorer.merged(merged_state(merger, alpha, chosen, lines), "test")
            entry[variant] = {
                "alpha": alpha,
                "chosen": chosen,
                "grid": selection.to_dict()["points"],
                "test": test,
                "test_mean": mean(test.values()),
                "test_mean_normalized": mean(test[t] / finetuned_test[t] for t in tasks),
            }
            LOG.info("%s %s: chosen %g, test %s", name, variant, chosen, test)
        results["methods"][name] = entry

    results["seconds"] = round(time.perf_counter() - started, 1)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "merge_quality.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = table(results)
    (args.work / "merge_quality.md").write_text(text + "\n", encoding="utf-8")
    plot(results, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
