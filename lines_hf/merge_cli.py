"""The ``lines-hf merge`` command: its arguments, its handler, and the chooser that scores beta on local task datasets (``--tasks``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import HEAD_POLICIES, MERGE_METHODS, TIES_TRIM_SCOPES
from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .merge import Merger

if TYPE_CHECKING:
    from .selection import GridSearchResult

LOG = logging.getLogger(__name__)


def task_list_chooser(
    model_dirs: Sequence[str | os.PathLike],
    tasks: Sequence[str],
    *,
    lines: bool,
    grid: Sequence[float] | None = None,
    validation_size: int = 300,
    progress: bool = False,
) -> Callable[["Merger", float | None], "GridSearchResult"]:
    """Return a ``choose`` function for ``merge_folders`` that scores beta on local task datasets.

    Task ``i`` of ``tasks`` (a name of ``lines_hf.tasks``) is the task of model
    folder ``i``: its validation split (``load_task`` with default sizes and
    seed) is scored with the merged backbone and that model's own head.

    Raises:
        ConfigError: if the number of tasks differs from the number of models.
    """
    if len(tasks) != len(model_dirs):
        raise ConfigError(
            f"--tasks names {len(tasks)} task(s) but --models gives {len(model_dirs)} model(s): "
            "pass one task per model, in the same order"
        )

    def choose(merger: "Merger", alpha: float | None) -> "GridSearchResult":
        import transformers

        from .merge import choose_scale

        from .evaluation import target_accuracy
        from .tasks import load_task

        splits = {task: load_task(task, validation_size=validation_size)["validation"] for task in tasks}
        models = [
            transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval() for folder in model_dirs
        ]
        tokenizers = [transformers.AutoTokenizer.from_pretrained(folder) for folder in model_dirs]
        finetuned = {
            task: target_accuracy(model, tokenizer, splits[task])
            for task, model, tokenizer in zip(tasks, models, tokenizers)
        }
        LOG.info("Fine-tuned validation accuracies: %s", finetuned)

        def evaluate(state: Mapping[str, "torch.Tensor"]) -> dict[str, float]:
            # NOTE: the state uses the names stored on disk; this matches the
            # names in memory for BERT-style classifiers, which --tasks targets.
            result = {}
            for task, model, tokenizer in zip(tasks, models, tokenizers):
                model.load_state_dict(state, strict=False)
                result[task] = target_accuracy(model, tokenizer, splits[task])
            return result

        return choose_scale(merger, evaluate, finetuned, lines=lines, alpha=alpha, grid=grid, progress=progress)

    return choose


def add_merge_command(commands: Any, parents: Sequence[Any] = ()) -> Any:
    """Register ``lines-hf merge`` on the CLI's sub-command parsers and return its parser."""
    from .cli import add_config_arguments, add_io_arguments

    merge = commands.add_parser(
        "merge",
        parents=list(parents),
        help="merge fine-tunes (or LoRA adapters) of one base, with LiNeS or as a plain baseline",
        description="Merge several fine-tunes of one base model (streamed, memory stays flat), then scale the "
        "merged task vector with LiNeS. Alpha defaults to the automatic L1-norm ratio; beta is given with "
        "--beta or chosen on validation data with --tasks.",
    )
    merge.add_argument("--base", required=True, help="pre-trained model folder or Hub repo id")
    merge.add_argument(
        "--models", nargs="+", required=True, metavar="DIR", help="fine-tuned model or LoRA adapter folders, in order"
    )
    merge.add_argument("--method", choices=MERGE_METHODS, default="task_arithmetic", help="merge method (default task_arithmetic)")
    group = merge.add_argument_group("merge method")
    group.add_argument("--no-lines", action="store_true", help="plain baseline: base + scale * merged task vector")
    group.add_argument("--scale", type=float, help="the baseline's global scale (with --no-lines)")
    group.add_argument("--density", type=float, help="ties: fraction of each task vector kept (default 0.2)")
    group.add_argument(
        "--ties-trim", choices=TIES_TRIM_SCOPES, help="ties: trim over the whole task vector (global, default) or per tensor"
    )
    group.add_argument("--consensus-lam", type=float, nargs="+", help="consensus: lam_t, one value or one per model (default 0.4)")
    group.add_argument("--consensus-k", type=int, help="consensus: minimum number of agreeing tasks (default 2)")
    group.add_argument("--drop-rate", type=float, help="dare_linear, dare_ties: drop probability (default 0.5)")
    group.add_argument("--seed", type=int, help="dare_linear, dare_ties: random seed (default 0)")
    group.add_argument(
        "--heads",
        choices=HEAD_POLICIES,
        default="save",
        help="tensors the base lacks (task heads): save writes OUTPUT/heads/<i>-<name>/, drop leaves them out",
    )
    group.add_argument(
        "--tasks", nargs="+", metavar="TASK",
        help="choose beta (or the baseline scale) on these local validation datasets, one task per model",
    )
    group.add_argument("--grid", type=float, nargs="+", help="values to try with --tasks (default: the method's reference grid)")
    add_config_arguments(merge, merge=True)
    add_io_arguments(merge)
    merge.set_defaults(handler=run_merge_command)
    return merge


def run_merge_command(args: Any, argv: Sequence[str]) -> int:
    """Run ``lines-hf merge`` from parsed arguments and return the exit status."""
    from .cli import _command_line, config_from_args, print_plan
    # Imported here, not at module level, so that building the parser (and
    # `lines-hf --help`) does not import torch.
    from .checkpoint import FolderSource
    from .merge import Merger, merge_folders, resolve_method
    from .merge_inputs import folder_sources, open_inputs

    config = config_from_args(args)
    lam = args.consensus_lam[0] if args.consensus_lam and len(args.consensus_lam) == 1 else args.consensus_lam
    method = resolve_method(
        args.method,
        density=args.density,
        ties_trim=args.ties_trim,
        consensus_lam=lam,
        consensus_k=args.consensus_k,
        drop_rate=args.drop_rate,
        seed=args.seed,
    )
    lines = not args.no_lines
    choose = None
    if args.tasks:
        choose = task_list_chooser(args.models, args.tasks, lines=lines, grid=args.grid, progress=not args.no_progress)
    if args.dry_run:
        base = FolderSource(args.base, allow_pickle=args.allow_pickle)
        sources = folder_sources(args.models, base, allow_pickle=args.allow_pickle)
        merger = Merger(base, open_inputs(base, sources), method, config)
        alpha = config.alpha if config.alpha is not None else merger.auto_alpha()
        print_plan(merger.scaled_plan(alpha if lines else (args.scale or 1.0), config.beta or 0.0, lines=lines))
        return 0
    output = merge_folders(
        args.models,
        args.base,
        args.output,
        config,
        method=method,
        lines=lines,
        scale=args.scale,
        heads=args.heads,
        choose=choose,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        command=_command_line(argv),
    )
    print(f"Saved the merged model to {output}")
    return 0
