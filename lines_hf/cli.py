"""The ``lines-hf`` command line.

Commands import transformers and torch only when they run, so ``lines-hf
--help`` is quick. Errors print as one line without a traceback unless
``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any

LOG = logging.getLogger("lines_hf")


def _number_or_policy(value: str) -> str | float:
    if value in ("alpha", "keep", "base"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected alpha, keep, base or a number, got {value!r}") from None


def _num_layers(values: list[str] | None) -> int | dict[str, int] | None:
    """Parse ``--num-layers 12`` or ``--num-layers encoder.block=6 decoder.block=4``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return _positive_int(values[0], "--num-layers")
    result = {}
    for item in values:
        stack, sep, depth = item.rpartition("=")
        if not sep or not stack:
            raise _usage(f"--num-layers takes one integer or STACK=N pairs, got {item!r}")
        result[stack] = _positive_int(depth, f"--num-layers {stack}")
    return result


def _positive_int(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _usage(f"{option} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise _usage(f"{option} must be a positive integer, got {text!r}")
    return value


def _usage(message: str):
    from .errors import ConfigError

    return ConfigError(message)


def add_config_arguments(parser: argparse.ArgumentParser, *, merge: bool = False) -> None:
    """Add the LiNeS schedule options shared by ``edit`` and ``merge``."""
    group = parser.add_argument_group("LiNeS schedule")
    alpha_help = "scale of the first block of each stack"
    if merge:
        alpha_help += " (default: automatic, from L1 norms of the task vectors)"
    group.add_argument("--alpha", type=float, help=alpha_help)
    group.add_argument("--beta", type=float, help="added over depth: the last block gets alpha + beta")
    group.add_argument("--gamma", type=float, help="one-knob form in [0, 1]: alpha = gamma, beta = 1 - gamma")
    group.add_argument(
        "--non-block-scale",
        type=_number_or_policy,
        default=None,
        help="scale of tensors outside every block: alpha (default), keep (1.0), base (0.0) or a number",
    )
    group.add_argument(
        "--stack-policy",
        choices=("per_stack", "global"),
        default=None,
        help="per_stack (default): each stack numbered from 0; global: encoder then decoder blocks in one schedule",
    )
    group.add_argument(
        "--layer-pattern",
        help=r"regex whose first group is a tensor's block number, for example '^model\.layers\.(\d+)\.'",
    )
    group.add_argument(
        "--num-layers",
        nargs="+",
        metavar="N|STACK=N",
        help="depth to use instead of the config's: one integer, or STACK=N per stack",
    )
    group.add_argument(
        "--exclude", nargs="+", default=None, metavar="REGEX", help="tensors to keep exactly as in the fine-tune"
    )
    group.add_argument(
        "--out-dtype",
        choices=("float32", "float16", "bfloat16", "float64"),
        help="dtype of the output tensors (default: the fine-tune's)",
    )
    group.add_argument(
        "--allow-missing-tensors",
        action="store_true",
        help="drop floating-point tensors that the base has and the fine-tune lacks instead of failing",
    )
    group.add_argument("--allow-non-finite", action="store_true", help="allow NaN or inf values in a task vector")
    group.add_argument(
        "--new-vocab-rows",
        choices=("error", "finetuned"),
        default=None,
        help="when the fine-tune has more embedding rows than the base (resize_token_embeddings): error "
        "(default) rejects the edit; finetuned edits the shared rows and copies the new rows unchanged",
    )
    group.add_argument("--config", metavar="FILE", help="start from a saved lines_config.json; options override it")


def add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the output and safety options shared by every command that writes a model."""
    group = parser.add_argument_group("input and output")
    group.add_argument("--output", required=True, help="output folder (must not be inside an input)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
    group.add_argument("--max-shard-size", default="5GB", help="largest shard size, for example 5GB or 500MB")
    group.add_argument("--dry-run", action="store_true", help="print each tensor's block and scale; write nothing")
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pytorch_model.bin checkpoints (loaded with torch.load(weights_only=True))",
    )
    group.add_argument(
        "--trust-remote-code", action="store_true", help="allow models whose config needs custom code"
    )
    group.add_argument("--revision", help="Hub revision of the fine-tune (when given as a repo id)")
    group.add_argument("--base-revision", help="Hub revision of the base model")
    group.add_argument("--token", help="Hub token (default: the one huggingface_hub knows)")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace):
    """Build a ``LiNeSConfig`` from ``--config`` and the schedule options."""
    from .config import LiNeSConfig

    values: dict[str, Any] = {}
    if args.config:
        values = LiNeSConfig.from_pretrained(args.config).to_dict()
    if args.gamma is not None and (args.alpha is not None or args.beta is not None):
        raise _usage("--gamma sets alpha = gamma and beta = 1 - gamma: pass either --gamma or --alpha and --beta")
    if args.gamma is not None:
        values.update(gamma=args.gamma, alpha=None, beta=None)
    if args.alpha is not None or args.beta is not None:
        values.pop("gamma", None)
        if args.alpha is not None:
            values["alpha"] = args.alpha
        if args.beta is not None:
            values["beta"] = args.beta
    for option, field in (
        ("non_block_scale", "non_block_scale"),
        ("stack_policy", "stack_policy"),
        ("layer_pattern", "layer_pattern"),
        ("exclude", "exclude"),
        ("out_dtype", "out_dtype"),
        ("new_vocab_rows", "new_vocab_rows"),
    ):
        if getattr(args, option) is not None:
            values[field] = getattr(args, option)
    if args.num_layers:
        values["num_layers"] = _num_layers(args.num_layers)
    if args.allow_missing_tensors:
        values["allow_missing_tensors"] = True
    if args.allow_non_finite:
        values["allow_non_finite"] = True
    return LiNeSConfig(**values)


def print_plan(plan, stream=None) -> None:
    """Print a dry-run table: every tensor's stack, block and scale, then per-stack scales."""
    stream = stream or sys.stdout
    rows = [("tensor", "stack", "block", "scale")] + plan.rows()
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=stream)
    print(file=stream)
    print(f"alpha = {plan.alpha:g}, beta = {plan.beta:g}, outside blocks = {plan.non_block_scale:g}", file=stream)
    for name, scales in plan.stack_scales().items():
        info = plan.layer_map.stacks[name]
        print(
            f"stack {name}: {info.depth} blocks ({info.depth_source}); scales "
            + ", ".join(f"{s:.4g}" for s in scales),
            file=stream,
        )


def _command_line(argv: Sequence[str]) -> str:
    # Record the command without the token, so it can be shown and re-run safely.
    words, skip = ["lines-hf"], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word == "--token":
            skip = True
            continue
        if word.startswith("--token="):
            continue
        words.append(word)
    return shlex.join(words)


def run_edit_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .editor import LiNeSEditor

    config = config_from_args(args)
    if args.adapter is not None:
        from . import adapters

        return adapters.run_cli(args, config, _command_line(argv))
    if args.finetuned is None:
        raise _usage("lines-hf edit needs --finetuned DIR (a full fine-tune) or --adapter DIR (a LoRA adapter)")
    if args.merge:
        raise _usage("--merge applies to LoRA adapters only: pass the adapter with --adapter DIR, or drop --merge")
    if args.dry_run:
        plan = LiNeSEditor.plan(
            args.finetuned,
            args.base,
            config,
            revision=args.revision,
            base_revision=args.base_revision,
            token=args.token,
            allow_pickle=args.allow_pickle,
        )
        print_plan(plan)
        return 0
    output = LiNeSEditor.edit_folder(
        args.finetuned,
        args.base,
        args.output,
        config,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        progress=not args.no_progress,
        command=_command_line(argv),
    )
    print(f"Saved the LiNeS-edited model to {output}")
    return 0


def common_options() -> argparse.ArgumentParser:
    """Return a parent parser that lets ``--debug`` and ``--quiet`` follow the command name too."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="log warnings and errors only"
    )
    return common


def one_line(text: str) -> str:
    """Return ``text`` with line breaks and other control characters escaped, so it prints as one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors print as one line (exit status 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="lines-hf",
        description="LiNeS: scale each block's task vector by alpha + beta * l / (L - 1) to keep what the "
        "pre-trained model knew.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    edit = commands.add_parser(
        "edit",
        parents=[common_options()],
        help="apply LiNeS to a full fine-tune or a LoRA adapter",
        description="Apply LiNeS to a fine-tune (streamed from safetensors, memory stays flat) or a LoRA adapter.",
    )
    edit.add_argument("--base", required=True, help="pre-trained model folder or Hub repo id")
    source = edit.add_mutually_exclusive_group()
    source.add_argument("--finetuned", help="fine-tuned model folder or Hub repo id")
    source.add_argument("--adapter", help="LoRA adapter folder (contains adapter_config.json)")
    edit.add_argument(
        "--merge", action="store_true", help="with --adapter: merge the scaled adapter into the base and save a full model"
    )
    add_config_arguments(edit)
    add_io_arguments(edit)
    edit.set_defaults(handler=run_edit_command)

    from .merge_cli import add_merge_command

    add_merge_command(commands, parents=[common_options()])

    from .hub import add_hub_arguments, add_push_command

    add_push_command(commands, parents=[common_options()])
    # Every command that writes an output folder can push it afterwards.
    for command in commands.choices.values():
        if "--output" in command._option_string_actions:
            add_hub_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lines-hf`` and return its exit status.

    The status is 0 on success, 1 on an error, 2 on a usage error and 128 plus
    the signal number when interrupted (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )

    if getattr(args, "no_progress", False):
        # transformers copies this switch when it is imported. An already imported
        # transformers has its own switch, so that one is turned off too.
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()

    from .errors import LiNeSError

    from .hub import check_push_arguments, maybe_push

    try:
        # Fails before a long edit if the push cannot work (offline mode, invalid repo id).
        check_push_arguments(args)
        status = args.handler(args, argv)
        if status == 0 and getattr(args, "push_to_hub", None) and not getattr(args, "dry_run", False):
            commit = maybe_push(args, args.output)
            print(f"Pushed {args.output} to {args.push_to_hub}: {commit.pr_url or commit.commit_url}")
        return status
    except KeyboardInterrupt as exc:
        # SIGTERM and SIGHUP arrive as a KeyboardInterrupt carrying their number. Exit as shells expect (128 + signal).
        signum = getattr(exc, "signum", 2)
        print(f"lines-hf: interrupted by signal {signum}; no incomplete output folder was left behind", file=sys.stderr)
        return 128 + signum
    except (LiNeSError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"lines-hf: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # an unexpected failure: still one line, with a way to see more
        if args.debug:
            raise
        print(
            f"lines-hf: error: {type(exc).__name__}: {one_line(str(exc))} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
