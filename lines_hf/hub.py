"""Pushing a finished LiNeS output folder to the Hugging Face Hub in one commit.

The folder is uploaded as written (weights, index, config, ``README.md`` card,
scale plot, ``lines_config.json``) with ``HfApi.upload_folder``. A README that
the target repo already has is kept unless the caller asks to replace it. A
failed push never touches the local folder, and its error gives the exact
command to retry. The access token is passed to huggingface_hub only: it is
never logged, printed or written.

The CLI helpers here (``add_hub_arguments``, ``maybe_push``,
``add_push_command``) give every ``lines-hf`` command the same push options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HubError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

LOG = logging.getLogger(__name__)

README_NAME = "README.md"
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def is_offline_mode() -> bool:
    """Return whether Hub access is disabled by ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``).

    huggingface_hub reads the variables once, at import. The environment is read
    again here, so a variable set later is honoured too.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    return any(os.environ.get(name, "").upper() in _TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def retry_command(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    overwrite_readme: bool = False,
) -> str:
    """Return the ``lines-hf push`` command line that repeats a push (never with the token)."""
    words = ["lines-hf", "push", os.fspath(folder), "--repo-id", repo_id]
    if private:
        words.append("--private")
    if revision:
        words += ["--revision", revision]
    if commit_message:
        words += ["--commit-message", commit_message]
    if create_pr:
        words.append("--create-pr")
    if overwrite_readme:
        words.append("--overwrite-readme")
    return shlex.join(words)


def default_commit_message(folder: Path) -> str:
    """Return a commit message that names the LiNeS settings stored in ``lines_config.json``."""
    from . import __version__

    try:
        with open(folder / "lines_config.json", encoding="utf-8") as handle:
            resolved = json.load(handle).get("resolved") or {}
    except (OSError, ValueError, AttributeError):
        resolved = {}
    if not isinstance(resolved, dict):
        resolved = {}
    kind = {"edit": "model", "adapter": "adapter", "merge": "merged model"}.get(resolved.get("kind"), "model")
    if isinstance(resolved.get("adapter"), dict) and resolved["adapter"].get("merged"):
        kind = "model with a merged adapter"
    settings = ""
    if all(isinstance(resolved.get(key), (int, float)) for key in ("alpha", "beta")):
        settings = f" (alpha={resolved['alpha']:.4g}, beta={resolved['beta']:.4g})"
    return f"Upload LiNeS {kind}{settings} made with lines_hf {__version__}"


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise HubError(f"cannot push {os.fspath(folder)!r}: folder not found. Pass the output folder to upload.")
    if not any(folder.iterdir()):
        raise HubError(f"cannot push {os.fspath(folder)!r}: the folder is empty")
    if not (folder / "lines_config.json").is_file():
        LOG.warning("%s has no lines_config.json, so the pushed repo will not record a LiNeS edit.", folder)
    has_full_weights = any(folder.glob("model*.safetensors")) or (folder / "pytorch_model.bin").is_file()
    if has_full_weights and (folder / "adapter_config.json").is_file():
        LOG.warning(
            "%s holds full model weights and adapter_config.json: AutoModel.from_pretrained would load the "
            "adapter. Remove the adapter files before pushing a merged model.",
            folder,
        )


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise HubError(f"invalid Hub repo id {repo_id!r}: {exc}. Expected 'name' or 'user/name'.") from None


def _hide(text: str, token: str | bool | None) -> str:
    if isinstance(token, str) and token:
        return text.replace(token, "<token>")
    return text


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    api: "HfApi | None" = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    overwrite_readme: bool = False,
) -> "CommitInfo":
    """Upload a finished output folder to a Hub model repo in one commit.

    The repo is created if needed (``exist_ok``), and so is the branch
    ``revision`` unless a pull request is opened against it. When the target
    revision already has a ``README.md``, the local one is left out of the
    upload unless ``overwrite_readme`` is true.

    Args:
        folder: the local folder to upload. It is only read, never modified.
        repo_id: ``name`` or ``user/name`` of the target model repo.
        api: the ``HfApi`` client to use; a new one by default (tests pass a mock).
        private: visibility of a newly created repo; ``None`` uses the Hub default.
            An existing repo keeps its visibility.
        revision: the branch to commit to (default: the main branch), or the
            base branch of the pull request with ``create_pr``.
        commit_message: defaults to one naming the LiNeS settings.
        create_pr: open a pull request instead of committing to the branch.
        token: Hub token. ``None`` uses ``HF_TOKEN`` or the token saved by ``hf auth login``.
        overwrite_readme: replace a README that the target already has.

    Returns:
        The ``CommitInfo`` of the commit (its ``pr_url`` is set with ``create_pr``).

    Raises:
        HubError: if the folder is missing or empty, the repo id is invalid,
            offline mode is on, or any Hub request fails. The message says that
            the local folder is intact and gives the command that retries.

    Example:
        >>> push_folder("outputs/bert-lines", "me/bert-lines", private=True)  # doctest: +SKIP
    """
    folder = Path(folder)
    _check_folder(folder)
    _check_repo_id(repo_id)
    retry = retry_command(
        folder,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        overwrite_readme=overwrite_readme,
    )
    if is_offline_mode():
        raise HubError(_offline_message(folder, repo_id, retry))

    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    client = api if api is not None else HfApi()
    message = commit_message or default_commit_message(folder)
    try:
        client.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        if revision and not create_pr:
            client.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)

        ignore = []
        if (folder / README_NAME).is_file() and not overwrite_readme:
            if client.file_exists(repo_id, README_NAME, repo_type="model", revision=revision, token=token):
                ignore.append(README_NAME)
                LOG.warning(
                    "%s already has a README.md%s, so the LiNeS model card was not uploaded over it. Pass "
                    "overwrite_readme=True (--overwrite-readme) to replace it.",
                    repo_id,
                    f" on {revision}" if revision else "",
                )

        commit = client.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=ignore or None,
            token=token,
        )
    except OfflineModeIsEnabled:
        raise HubError(_offline_message(folder, repo_id, retry)) from None
    except Exception as exc:  # Whatever failed, the user needs the retry command.
        reason = _hide(f"{type(exc).__name__}: {exc}", token)
        raise HubError(
            f"pushing {os.fspath(folder)!r} to the Hub repo {repo_id!r} failed ({reason}). The local output is "
            f"intact at {os.fspath(folder.resolve())}. Retry with: {retry} (log in first with `hf auth login`, "
            "or set HF_TOKEN, if the Hub rejected the token)."
        ) from None

    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None)
    LOG.info("Pushed %s to %s in one commit: %s", folder, repo_id, url)
    return commit


def _offline_message(folder: Path, repo_id: str, retry: str) -> str:
    return (
        f"cannot push {os.fspath(folder)!r} to the Hub repo {repo_id!r}: huggingface_hub is in offline mode "
        "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set). The local output is intact at "
        f"{os.fspath(folder.resolve())}. Unset the variable and retry with: {retry}"
    )


# --------------------------------------------------------------------------- command line


def _add_push_options(group: Any, parser: argparse.ArgumentParser, *, revision_flag: str) -> None:
    group.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="create the repo as private (an existing repo keeps its visibility)",
    )
    group.add_argument(
        revision_flag,
        dest="push_revision",
        metavar="BRANCH",
        help="branch to commit to (created if missing), or the base branch of --create-pr (default: main)",
    )
    group.add_argument("--commit-message", help="message of the upload commit (default: names alpha and beta)")
    group.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    group.add_argument(
        "--overwrite-readme",
        action="store_true",
        help="replace a README.md that the repo already has with the LiNeS model card",
    )
    # Commands that read inputs from the Hub already take --token; the same token is used to push.
    if "--token" not in parser._option_string_actions:
        group.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--push-to-hub REPO`` and its options to a command that writes an output folder.

    The target branch is ``--revision``, or ``--push-revision`` on commands
    where ``--revision`` already selects the revision of an input model.
    """
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="after saving, upload the output folder to this Hub model repo (created if missing) in one commit",
    )
    revision_flag = "--push-revision" if "--revision" in parser._option_string_actions else "--revision"
    _add_push_options(group, parser, revision_flag=revision_flag)


def check_push_arguments(args: argparse.Namespace) -> None:
    """Fail before a long edit if ``--push-to-hub`` cannot work (invalid repo id, offline mode).

    Raises:
        HubError: with the reason and the fix.
    """
    repo_id = getattr(args, "push_to_hub", None)
    if not repo_id:
        return
    _check_repo_id(repo_id)
    if is_offline_mode():
        raise HubError(
            f"--push-to-hub {repo_id} cannot work: huggingface_hub is in offline mode (HF_HUB_OFFLINE or "
            "TRANSFORMERS_OFFLINE is set). Unset the variable, or drop --push-to-hub and push the output later "
            "with `lines-hf push`."
        )


def maybe_push(args: argparse.Namespace, folder: str | os.PathLike, *, api: "HfApi | None" = None) -> "CommitInfo | None":
    """Push ``folder`` when the command got ``--push-to-hub``; return the commit or ``None``."""
    repo_id = getattr(args, "push_to_hub", None)
    if not repo_id:
        return None
    return push_folder(
        folder,
        repo_id,
        api=api,
        private=getattr(args, "private", None),
        revision=getattr(args, "push_revision", None),
        commit_message=getattr(args, "commit_message", None),
        create_pr=bool(getattr(args, "create_pr", False)),
        token=getattr(args, "token", None),
        overwrite_readme=bool(getattr(args, "overwrite_readme", False)),
    )


def run_push_command(args: argparse.Namespace, argv: Any = None) -> int:  # noqa: ARG001 - CLI handler signature
    """Run ``lines-hf push FOLDER --repo-id ID``: upload an existing output folder."""
    commit = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.push_revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        token=args.token,
        overwrite_readme=args.overwrite_readme,
    )
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None)
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def add_push_command(commands: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register ``lines-hf push`` on the CLI's sub-command parsers and return its parser.

    ``parents`` are parsers whose options (such as ``--debug``) the command shares.
    """
    push = commands.add_parser(
        "push",
        parents=list(parents),
        help="upload a finished output folder to the Hugging Face Hub",
        description="Upload a LiNeS output folder to a Hub model repo in one commit, creating the repo if needed. "
        "A README.md already in the repo is kept unless --overwrite-readme is given.",
    )
    push.add_argument("folder", help="the output folder to upload")
    push.add_argument("--repo-id", "--repo", dest="repo_id", required=True, help="target repo, 'name' or 'user/name'")
    group = push.add_argument_group("Hugging Face Hub")
    _add_push_options(group, push, revision_flag="--revision")
    push.set_defaults(handler=run_push_command)
    return push
