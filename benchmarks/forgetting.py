"""Forgetting benchmark: LiNeS on the real all-MiniLM-L6-v2, each task in turn the target.

Mirrors the single-task table of the LiNeS paper (Wang et al., ICLR 2025): the
model is fine-tuned on one task (the target) and the other tasks are the
control. For each target it reports, on the test splits:

- target accuracy, absolute and normalised by the fine-tune's;
- control accuracy (the frozen-probe metric of ``lines_hf.evaluation``),
  absolute and normalised by the pre-trained encoder's;

for the fine-tune and for LiNeS at the gamma chosen on the validation splits,
and plots normalised target against normalised control accuracy over the
gamma grid. Fine-tunes are cached under ``<work-dir>/finetunes``, so a second
run does not retrain.

Run it (about an hour on 2 CPU cores, most of it fine-tuning):

    .venv/bin/python benchmarks/forgetting.py

Nothing is downloaded: the model and the tasks come from installed packages
(``lines_hf[demo]``, and Debian ``wordnet-base`` for ``wordnet_supersense``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
DEFAULT_TASKS = ("tweet_sentiment", "food_reviews", "wordnet_supersense", "trump_source")

LOG = logging.getLogger("forgetting")


def build_parser() -> argparse.ArgumentParser:
    from lines_hf.tasks import FinetuneSettings

    defaults = FinetuneSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="at least two tasks")
    parser.add_argument("--work-dir", default=str(HERE / "_work"), help="cache folder (fine-tunes under finetunes/)")
    parser.add_argument("--results", default=str(HERE / "forgetting_results.json"), help="JSON record of every number")
    parser.add_argument("--plot", default=str(HERE / "forgetting_gamma.png"), help="plot of the gamma grid")
    parser.add_argument("--train-size", type=int, default=1500, help="fine-tuning examples per task")
    parser.add_argument("--validation-size", type=int, default=150, help="validation examples per task")
    parser.add_argument("--test-size", type=int, default=400, help="test examples per task")
    parser.add_argument("--probe-train-size", type=int, default=400, help="examples each frozen probe is fitted on")
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--probe", default="logistic", choices=("logistic", "centroid"))
    parser.add_argument("--quiet", action="store_true", help="hide progress bars")
    return parser


def run(args: argparse.Namespace, on_target=None) -> dict:
    """Run the benchmark and return its JSON-serialisable record.

    ``on_target(per_task)``, when given, is called after each target task with
    the results so far, so an interrupted run still leaves them on disk.
    """
    import datasets
    import transformers

    from lines_hf import LiNeSConfig, LiNeSEditor
    from lines_hf.evaluation import ControlProbes, mean, target_accuracy
    from lines_hf.selection import select_gamma
    from lines_hf.tasks import FinetuneSettings, finetune_cached, load_task, minilm_path

    if len(args.tasks) < 2:
        raise SystemExit("the benchmark needs at least two tasks: one target and one control")
    started = time.perf_counter()
    settings = FinetuneSettings(epochs=args.epochs, learning_rate=args.learning_rate)
    progress = not args.quiet

    tasks = {
        name: load_task(
            name, train_size=args.train_size, validation_size=args.validation_size, test_size=args.test_size
        )
        for name in args.tasks
    }
    base_dir = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    base = transformers.AutoModel.from_pretrained(base_dir).eval()

    # One frozen probe per task, fitted once on the pre-trained encoder; each
    # target then uses the probes of the other tasks as its control.
    probe_tasks = {
        name: datasets.DatasetDict(
            train=data["train"].select(range(min(args.probe_train_size, len(data["train"])))),
            validation=data["validation"],
            test=data["test"],
        )
        for name, data in tasks.items()
    }
    probe_start = time.perf_counter()
    probes = ControlProbes(base, tokenizer, probe_tasks, probe=args.probe, max_length=settings.max_length)
    LOG.info("Fitted the probes in %.0f s: %s", time.perf_counter() - probe_start, probes.zeroshot)

    per_task = {}
    for target in args.tasks:
        controls = [name for name in args.tasks if name != target]
        task_start = time.perf_counter()
        finetuned_dir = finetune_cached(
            target, Path(args.work_dir) / "finetunes", data=tasks[target], settings=settings, progress=progress
        )
        finetuned = transformers.AutoModelForSequenceClassification.from_pretrained(finetuned_dir).eval()

        def evaluate_target(model, split="validation", target=target):
            return target_accuracy(model, tokenizer, tasks[target][split], max_length=settings.max_length)

        def evaluate_control(model, split="validation", controls=controls):
            return probes.accuracies(model, split=split, tasks=controls)

        selection = select_gamma(
            finetuned,
            base,
            evaluate_target,
            evaluate_control,
            zeroshot_control_accuracies={c: probes.zeroshot["validation"][c] for c in controls},
            progress=progress,
        )
        gamma = selection.best_value
        edited = LiNeSEditor.from_pretrained(
            finetuned, base_model=base, config=LiNeSConfig(gamma=gamma), progress=False
        )

        finetuned_target = evaluate_target(finetuned, "test")
        rows = {}
        for label, model in (("finetuned", finetuned), ("lines", edited)):
            target_value = finetuned_target if label == "finetuned" else evaluate_target(model, "test")
            control = evaluate_control(model, "test")
            normalized = probes.normalized(control, split="test")
            rows[label] = {
                "target": target_value,
                "target_normalized": target_value / finetuned_target,
                "control": mean(control),
                "control_normalized": mean(normalized),
                "control_per_task": control,
            }
        per_task[target] = {
            "controls": controls,
            "gamma": gamma,
            "finetune_dir": str(finetuned_dir),
            "finetune_record": json.loads((finetuned_dir / "finetune.json").read_text()),
            "zeroshot_target_probe": probes.zeroshot["test"][target],
            "zeroshot_control": mean({c: probes.zeroshot["test"][c] for c in controls}),
            **rows,
            "selection": selection.to_dict(),
            "seconds": round(time.perf_counter() - task_start, 1),
        }
        LOG.info("%s: %s", target, {k: per_task[target][k] for k in ("gamma", "finetuned", "lines")})
        if on_target is not None:
            on_target(per_task)

    average = {
        label: {
            key: mean([per_task[t][label][key] for t in args.tasks])
            for key in ("target", "target_normalized", "control", "control_normalized")
        }
        for label in ("finetuned", "lines")
    }
    average["zeroshot_control"] = mean([per_task[t]["zeroshot_control"] for t in args.tasks])
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
        "settings": {**vars(args), "finetune": settings.__dict__},
        "zeroshot": probes.zeroshot,
        "per_task": per_task,
        "average": average,
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_markdown(record: dict) -> str:
    """Return the per-task and average table in Markdown."""
    header = (
        "| target | gamma | FT target | LiNeS target (norm.) | zero-shot control | FT control (norm.) "
        "| LiNeS control (norm.) |\n|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for name, row in record["per_task"].items():
        ft, lines_row = row["finetuned"], row["lines"]
        lines.append(
            f"| {name} | {row['gamma']:.1f} | {ft['target']:.3f} | {lines_row['target']:.3f} "
            f"({lines_row['target_normalized']:.3f}) | {row['zeroshot_control']:.3f} | {ft['control']:.3f} "
            f"({ft['control_normalized']:.3f}) | {lines_row['control']:.3f} ({lines_row['control_normalized']:.3f}) |"
        )
    ft, lines_row = record["average"]["finetuned"], record["average"]["lines"]
    lines.append(
        f"| **average** | | {ft['target']:.3f} | {lines_row['target']:.3f} ({lines_row['target_normalized']:.3f}) "
        f"| {record['average']['zeroshot_control']:.3f} | {ft['control']:.3f} ({ft['control_normalized']:.3f}) "
        f"| {lines_row['control']:.3f} ({lines_row['control_normalized']:.3f}) |"
    )
    return "\n".join(lines)


def plot_grid(record: dict, path: str) -> None:
    """Plot normalised target against normalised control accuracy over the gamma grid (validation splits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    curves = []
    for name, row in record["per_task"].items():
        points = row["selection"]["points"]
        control = [p["control_normalized"] for p in points]
        target = [p["target_normalized"] for p in points]
        curves.append((control, target))
        axis.plot(control, target, marker="o", markersize=3, linewidth=1, alpha=0.7, label=name)
        chosen = next(p for p in points if p["value"] == row["gamma"])
        axis.scatter([chosen["control_normalized"]], [chosen["target_normalized"]], s=60, facecolors="none",
                     edgecolors="black", zorder=3)
    gammas = [p["value"] for p in next(iter(record["per_task"].values()))["selection"]["points"]]
    mean_control = [sum(c[i] for c, _ in curves) / len(curves) for i in range(len(gammas))]
    mean_target = [sum(t[i] for _, t in curves) / len(curves) for i in range(len(gammas))]
    axis.plot(mean_control, mean_target, color="black", marker="s", linewidth=2, label="average")
    for gamma, x, y in zip(gammas, mean_control, mean_target):
        axis.annotate(f"{gamma:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.axhline(1.0, color="grey", linewidth=0.5)
    axis.axvline(1.0, color="grey", linewidth=0.5)
    axis.set_xlabel("control accuracy / pre-trained (validation)")
    axis.set_ylabel("target accuracy / fine-tuned (validation)")
    axis.set_title("LiNeS on all-MiniLM-L6-v2: gamma from 1.0 (fine-tune) to 0.0; circles: chosen gamma")
    axis.title.set_fontsize(9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "datasets", "evaluate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def save_partial(per_task: dict) -> None:
        partial = {"complete": False, "command": " ".join(sys.argv), "per_task": per_task}
        Path(args.results).write_text(json.dumps(partial, indent=2) + "\n", encoding="utf-8")

    record = run(args, on_target=save_partial)
    record["complete"] = True
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    plot_grid(record, args.plot)
    print(format_markdown(record))
    print(f"\n{record['date']}, {record['machine']}, {record['seconds']:.0f} s; results in {args.results}, plot in {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
