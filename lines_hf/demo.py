"""The first-run demo: LiNeS on the real all-MiniLM-L6-v2 and real text tasks, offline.

``python -m lines_hf.demo`` fine-tunes the bundled MiniLM on one task with
``transformers.Trainer``, cached so that a second run skips training. It
measures forgetting with the control-probe metric of ``lines_hf.evaluation``
on other tasks and chooses gamma on the validation splits. It then prints
target and control accuracy on the test splits for the pre-trained model, the
fine-tune and the LiNeS edit, and saves the edited model with its model card
and ``lines_config.json``.

Every step is a function, so tests run the same path on a tiny model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .selection import DEFAULT_GAMMA_GRID, GridSearchResult
from .tasks import MINILM_HUB_ID, FinetuneSettings

if TYPE_CHECKING:
    import datasets

LOG = logging.getLogger(__name__)

RESULTS_NAME = "demo_results.json"


@dataclass
class DemoSettings:
    """Settings of the demo: tasks, split sizes, training settings and output folders."""

    target: str = "tweet_sentiment"
    controls: tuple[str, ...] = ("food_reviews", "trump_source")
    train_size: int = 1500
    validation_size: int = 200
    test_size: int = 400
    control_train_size: int = 400
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    probe: str = "logistic"
    grid: tuple[float, ...] = DEFAULT_GAMMA_GRID
    output_dir: str = "outputs/lines-demo"
    cache_dir: str = ".cache/lines_hf/finetunes"
    base_model: str | None = None
    seed: int = 0


@dataclass
class ModelScores:
    """Test-split accuracies of one model; ``target_note`` explains a target accuracy not from the model's head."""

    name: str
    gamma: float | None
    target: float
    controls: dict[str, float]
    target_normalized: float | None
    controls_normalized: dict[str, float]
    target_note: str = ""

    @property
    def control(self) -> float:
        return sum(self.controls.values()) / len(self.controls)

    @property
    def control_normalized(self) -> float:
        return sum(self.controls_normalized.values()) / len(self.controls_normalized)


@dataclass
class DemoResult:
    """Everything the demo measured and wrote."""

    rows: list[ModelScores]
    selection: GridSearchResult
    finetuned_dir: Path
    output_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [
                {**dataclasses.asdict(r), "control": r.control, "control_normalized": r.control_normalized}
                for r in self.rows
            ],
            "selection": self.selection.to_dict(),
            "finetuned_dir": str(self.finetuned_dir),
            "output_dir": str(self.output_dir),
        }


def name_bundled_base(record: dict[str, Any]) -> None:
    """Name the Hub repository of the bundled all-MiniLM-L6-v2 as the base model of ``record``.

    The package ships the weights of that repository, so the model card links
    it as the base model instead of a path inside site-packages.
    """
    record["inputs"]["base_model"]["hub_id"] = MINILM_HUB_ID


def load_demo_tasks(settings: DemoSettings) -> dict[str, "datasets.DatasetDict"]:
    """Load the target and control tasks with the demo's split sizes."""
    from .tasks import load_task

    tasks = {
        settings.target: load_task(
            settings.target,
            train_size=settings.train_size,
            validation_size=settings.validation_size,
            test_size=settings.test_size,
            seed=settings.seed,
        )
    }
    for name in settings.controls:
        tasks[name] = load_task(
            name,
            train_size=settings.control_train_size,
            validation_size=settings.validation_size,
            test_size=settings.test_size,
            seed=settings.seed,
        )
    return tasks


def run_demo(
    settings: DemoSettings,
    *,
    tasks: Mapping[str, "datasets.DatasetDict"] | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo: fine-tune (cached), choose gamma, edit, evaluate and save.

    Args:
        settings: the demo's settings.
        tasks: task name -> splits, instead of loading ``settings.target`` and
            ``settings.controls`` (tests pass small hand-made tasks here).
        progress: show progress bars for training and the gamma grid.

    Returns:
        The test-split scores of the pre-trained model, the fine-tune and the
        LiNeS edit, the grid search and the folders written.

    Raises:
        ConfigError: if the target is also a control, or a task is missing.
        DataNotFoundError, CheckpointNotFoundError: if a source package is not installed.
    """
    import datasets
    import transformers

    from .config import LiNeSConfig
    from .editor import LiNeSEditor
    from .errors import ConfigError
    from .evaluation import ControlProbes, target_accuracy
    from .selection import select_gamma
    from .tasks import finetune_cached, minilm_path

    if settings.target in settings.controls:
        raise ConfigError(f"the target task {settings.target!r} cannot also be a control task")
    if not settings.controls:
        raise ConfigError("the demo needs at least one control task")
    tasks = dict(tasks) if tasks is not None else load_demo_tasks(settings)
    missing = [n for n in (settings.target, *settings.controls) if n not in tasks]
    if missing:
        raise ConfigError(f"no data for task(s) {', '.join(missing)}")
    controls = list(settings.controls)
    target_data = tasks[settings.target]
    max_length = settings.finetune.max_length

    base_dir = Path(settings.base_model) if settings.base_model else minilm_path()
    finetuned_dir = finetune_cached(
        settings.target,
        settings.cache_dir,
        data=target_data,
        base_model=base_dir,
        settings=settings.finetune,
        progress=progress,
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(finetuned_dir)
    base = transformers.AutoModel.from_pretrained(base_dir).eval()
    finetuned = transformers.AutoModelForSequenceClassification.from_pretrained(finetuned_dir).eval()

    LOG.info("Fitting control probes on the pre-trained encoder")
    probes = ControlProbes(
        base, tokenizer, {name: tasks[name] for name in controls}, probe=settings.probe, max_length=max_length
    )
    # The pre-trained encoder has no head for the target task: a frozen probe on
    # it, fitted on as many examples as a control probe, gives its target accuracy.
    target_probe_data = datasets.DatasetDict(
        train=target_data["train"].select(range(min(settings.control_train_size, len(target_data["train"])))),
        test=target_data["test"],
    )
    target_probe = ControlProbes(
        base, tokenizer, {settings.target: target_probe_data}, splits=("test",), probe=settings.probe,
        max_length=max_length,
    )

    def evaluate_target(model) -> float:
        return target_accuracy(model, tokenizer, target_data["validation"], max_length=max_length)

    def evaluate_control(model) -> dict[str, float]:
        return probes.accuracies(model, split="validation", tasks=controls)

    selection = select_gamma(
        finetuned,
        base,
        evaluate_target,
        evaluate_control,
        grid=settings.grid,
        zeroshot_control_accuracies={c: probes.zeroshot["validation"][c] for c in controls},
        progress=progress,
    )
    gamma = selection.best_value

    # The saved model comes from the public editor, so its record and card show
    # the call that reproduces it from the two folders.
    edited = LiNeSEditor.from_pretrained(
        str(finetuned_dir), base_model=str(base_dir), config=LiNeSConfig(gamma=gamma), progress=False
    )
    if not settings.base_model:
        name_bundled_base(edited.lines_record)

    rows = score_models(
        tokenizer,
        tasks,
        settings.target,
        controls,
        probes,
        {"pre-trained": (None, base), "fine-tuned": (1.0, finetuned), "LiNeS": (gamma, edited)},
        pretrained_target=target_probe.zeroshot["test"][settings.target],
        max_length=max_length,
    )

    output_dir = LiNeSEditor.save_pretrained(edited, settings.output_dir, overwrite=True)
    result = DemoResult(rows=rows, selection=selection, finetuned_dir=finetuned_dir, output_dir=Path(output_dir))
    with open(Path(output_dir) / RESULTS_NAME, "w", encoding="utf-8") as handle:
        json.dump({"settings": _settings_dict(settings), **result.to_dict()}, handle, indent=2)
        handle.write("\n")
    return result


def score_models(
    tokenizer,
    tasks: Mapping[str, "datasets.DatasetDict"],
    target: str,
    controls: Sequence[str],
    probes,
    models: Mapping[str, tuple[float | None, Any]],
    *,
    pretrained_target: float,
    split: str = "test",
    max_length: int = 64,
) -> list[ModelScores]:
    """Score models on ``split``: target accuracy and control-probe accuracy, raw and normalised.

    ``models`` maps a row name to ``(gamma, model)``. A ``gamma`` of ``None``
    marks the pre-trained encoder, which has no classification head: its
    target accuracy is ``pretrained_target``, a frozen probe's. The first row
    with ``gamma == 1.0`` is the fine-tune that target accuracies are
    normalised by.
    """
    from .evaluation import target_accuracy

    rows: list[ModelScores] = []
    finetuned_target = None
    for name, (gamma, model) in models.items():
        if gamma is None:
            target_value = pretrained_target
            note = "frozen probe: the pre-trained encoder has no task head"
            # The probes already scored the pre-trained encoder when they were fitted.
            control = {c: probes.zeroshot[split][c] for c in controls}
        else:
            target_value = target_accuracy(model, tokenizer, tasks[target][split], max_length=max_length)
            note = ""
            if gamma == 1.0 and finetuned_target is None:
                finetuned_target = target_value
            control = probes.accuracies(model, split=split, tasks=controls)
        rows.append(
            ModelScores(
                name=name,
                gamma=gamma,
                target=target_value,
                controls=control,
                target_normalized=None,
                controls_normalized=probes.normalized(control, split=split),
                target_note=note,
            )
        )
    for row in rows:
        if finetuned_target and row.gamma is not None:
            row.target_normalized = row.target / finetuned_target
    return rows


def format_table(result: DemoResult) -> str:
    """Return the demo's result table as monospaced text."""
    lines = [
        f"{'model':<12} {'gamma':>5} {'target acc':>10} {'target/ft':>9} {'control acc':>11} {'control/pre':>11}",
    ]
    for row in result.rows:
        gamma = "-" if row.gamma is None else f"{row.gamma:.1f}"
        target_normalized = "-" if row.target_normalized is None else f"{row.target_normalized:.3f}"
        mark = "*" if row.target_note else " "
        lines.append(
            f"{row.name:<12} {gamma:>5} {row.target:>9.3f}{mark} {target_normalized:>9} "
            f"{row.control:>11.3f} {row.control_normalized:>11.3f}"
        )
    notes = [f"* {row.target_note}" for row in result.rows if row.target_note]
    per_task = ", ".join(
        f"{name} {value:.3f}" for name, value in result.rows[0].controls.items()
    )
    lines.append("")
    lines.extend(notes)
    lines.append(f"control = mean over control tasks of the frozen probe's accuracy (pre-trained: {per_task})")
    return "\n".join(lines)


def format_grid(selection: GridSearchResult) -> str:
    """Return the validation scores of every gamma as monospaced text."""
    lines = [f"{'gamma':>5} {'target/ft':>9} {'control/pre':>11} {'criterion':>9}"]
    for point in selection.points:
        mark = "  <- chosen" if point is selection.best else ""
        lines.append(
            f"{point.value:>5.1f} {point.scores['target_normalized']:>9.3f} "
            f"{point.scores['control_normalized']:>11.3f} {point.criterion:>9.3f}{mark}"
        )
    return "\n".join(lines)


def _settings_dict(settings: DemoSettings) -> dict[str, Any]:
    data = dataclasses.asdict(settings)
    data["controls"] = list(settings.controls)
    data["grid"] = list(settings.grid)
    return data


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="python -m lines_hf.demo",
        description="Fine-tune the bundled all-MiniLM-L6-v2 on a real text task, apply LiNeS with gamma chosen "
        "on validation data, and compare target and control accuracy. Runs offline.",
    )
    parser.add_argument("--target", default=defaults.target, help="task to fine-tune on (default: %(default)s)")
    parser.add_argument(
        "--controls", nargs="+", default=list(defaults.controls), help="control tasks (default: %(default)s)"
    )
    parser.add_argument("--output", default=defaults.output_dir, help="folder for the edited model (default: %(default)s)")
    parser.add_argument(
        "--cache-dir", default=defaults.cache_dir, help="folder of cached fine-tunes (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=float, default=defaults.finetune.epochs, help="training epochs")
    parser.add_argument("--learning-rate", type=float, default=defaults.finetune.learning_rate, help="peak learning rate")
    parser.add_argument("--train-size", type=int, default=defaults.train_size, help="training examples of the target")
    parser.add_argument("--test-size", type=int, default=defaults.test_size, help="test examples per task")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars and log messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line and print its tables; return the exit status."""
    # Nothing may reach the network: set before transformers and huggingface_hub are imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "evaluate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from .errors import LiNeSError

    settings = DemoSettings(
        target=args.target,
        controls=tuple(args.controls),
        train_size=args.train_size,
        test_size=args.test_size,
        finetune=dataclasses.replace(DemoSettings().finetune, epochs=args.epochs, learning_rate=args.learning_rate),
        output_dir=args.output,
        cache_dir=args.cache_dir,
    )
    try:
        result = run_demo(settings, progress=not args.quiet)
    except LiNeSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print()
    print("Gamma chosen on the validation splits (criterion 2 * target/ft + control/pre-trained):")
    print(format_grid(result.selection))
    print()
    print(f"Test accuracy, target task {settings.target}, control tasks {', '.join(settings.controls)}:")
    print(format_table(result))
    print()
    print(f"Fine-tune (cached): {result.finetuned_dir}")
    print(
        f"Saved the LiNeS edit (gamma={result.selection.best_value:g}) with README.md and lines_config.json "
        f"to {result.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
