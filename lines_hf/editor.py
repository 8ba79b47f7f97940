"""``LiNeSEditor``: the Python face of lines_hf.

It wires the pure core (plan, layer map, task-vector math) to the edges: models
loaded in memory, safetensors folders streamed from disk, the model card and
``lines_config.json``. In-memory and streaming edits run the same plan through
the same engine; only the tensor sources and sinks differ.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    ADAPTER_CONFIG_NAME,
    FolderSource,
    ShardWriter,
    StateDictSource,
    atomic_output_dir,
    check_remote_code,
    copy_non_weight_files,
    looks_like_repo_id,
    read_config,
    resolve_model_dir,
    tied_weights,
)
from .config import LiNeSConfig
from .engine import MemorySink, run_edit
from .errors import CheckpointNotFoundError, ConfigError, TensorMismatchError
from .plan import EditPlan, TensorSpec, build_plan, check_same_architecture
from .plot import PLOT_NAME, ScalePlot

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LOG = logging.getLogger(__name__)


def _coerce_config(config: LiNeSConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> LiNeSConfig:
    if config is None:
        return LiNeSConfig(**overrides)
    if isinstance(config, Mapping):
        return LiNeSConfig(**{**config, **overrides})
    if not isinstance(config, LiNeSConfig):
        raise ConfigError(f"config must be a LiNeSConfig or a dict, got {type(config).__name__}")
    if overrides:
        return LiNeSConfig(**{**config.to_dict(), **overrides})
    return config


def _is_model(value: Any) -> bool:
    # A model object cannot exist before its library is imported, so a folder
    # path is checked without paying seconds to import transformers.
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(value, PreTrainedModel)


def _is_peft_model(value: Any) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(value, PeftModel)


def describe_input(value: Any, revision: str | None = None) -> dict[str, Any]:
    """Return the record entry of one input: its path, Hub id (if any) and revision."""
    if _is_model(value) or _is_peft_model(value):
        name = getattr(value, "name_or_path", None) or getattr(getattr(value, "config", None), "_name_or_path", "")
        name = str(name or "")
        hub_id = name if name and not os.path.exists(name) and looks_like_repo_id(name) else None
        return {"path": name or "<in-memory model>", "hub_id": hub_id, "revision": revision}
    text = os.fspath(value)
    hub_id = text if not os.path.exists(text) and looks_like_repo_id(text) else None
    return {"path": text, "hub_id": hub_id, "revision": revision}


def _format_args(config: LiNeSConfig) -> str:
    defaults = LiNeSConfig()
    fields = {k: v for k, v in config.to_dict().items() if v != getattr(defaults, k)}
    return "LiNeSConfig(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def python_call(method: str, finetuned: Any, base: Any, config: LiNeSConfig) -> str:
    """Return the Python call that reproduces an edit, for the record and the card."""
    ft = describe_input(finetuned)["path"]
    base_path = describe_input(base)["path"] if base is not None else None
    return f"LiNeSEditor.{method}({ft!r}, base_model={base_path!r}, config={_format_args(config)})"


def make_record(
    plan: EditPlan,
    config: LiNeSConfig,
    *,
    kind: str,
    base: dict[str, Any],
    finetuned: list[dict[str, Any]],
    command: str,
    library_name: str = "transformers",
) -> dict[str, Any]:
    """Build the record of an edit that ``lines_config.json`` and the model card store."""
    return {
        "kind": kind,
        "library_name": library_name,
        "inputs": {"base_model": base, "finetuned": finetuned},
        "command": command,
        **plan.summary(),
        "out_dtype": config.out_dtype,
    }


def _model_class(model_config: Mapping[str, Any] | None):
    """Return the transformers class named by ``config.json`` (never remote code)."""
    import transformers

    for name in (model_config or {}).get("architectures") or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _load_folder_model(
    name_or_path: Any,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    trust_remote_code: bool,
    allow_pickle: bool,
) -> tuple["PreTrainedModel", Path]:
    folder = resolve_model_dir(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    model_config = read_config(folder)
    if model_config is None:
        raise CheckpointNotFoundError(f"no config.json in {folder}: lines_hf needs it to know the model's depth")
    check_remote_code(model_config, folder, trust_remote_code)
    # Parsing the headers first rejects pickles without opt-in and corrupt files
    # with a clear message, before transformers touches them.
    FolderSource(folder, allow_pickle=allow_pickle).close()

    cls = _model_class(model_config)
    model, info = cls.from_pretrained(
        folder,
        dtype="auto",
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        output_loading_info=True,
    )
    _check_loading_info(folder, cls.__name__, info)
    return model.eval(), folder


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """Inside the block, hide transformers' progress bars (loading, saving) unless ``enabled``.

    transformers' switch also turns huggingface_hub's bars off and on, so the
    previous state of both is restored when the block ends.
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _check_loading_info(folder: Path, class_name: str, info: Mapping[str, Any]) -> None:
    """Raise if transformers had to invent or drop weights while loading ``folder``.

    transformers fills a missing tensor with fresh random values and drops an
    unknown one, with only a log line; LiNeS would then edit noise as if it
    were trained weights.
    """
    problems = []
    for key, label in (
        ("missing_keys", "missing from the checkpoint (transformers would initialise them randomly)"),
        ("mismatched_keys", "of a different shape than the model expects"),
        ("unexpected_keys", "in the checkpoint but not in the model (transformers would drop them)"),
    ):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(key) or [])
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{len(names)} tensor(s) {label}: {shown}")
    if problems:
        raise TensorMismatchError(
            f"loading {folder} as {class_name} found " + "; ".join(problems) + ". Check that the folder contains a "
            "complete checkpoint of this architecture (the streaming CLI, lines-hf edit, reports the same)."
        )


def _model_config_dict(model: "PreTrainedModel") -> dict[str, Any]:
    return model.config.to_dict()


class LiNeSEditor:
    """Apply LiNeS to fine-tuned models, adapters and merges.

    Every method is a class or static method: the editor keeps no state, and its
    outputs (models, folders) carry their own ``lines_config`` and record.
    """

    # ------------------------------------------------------------------ in memory

    @classmethod
    def from_pretrained(
        cls,
        finetuned: Any,
        base_model: Any = None,
        config: LiNeSConfig | Mapping[str, Any] | None = None,
        *,
        revision: str | None = None,
        base_revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        progress: bool = True,
        merge: bool = False,
        adapter_names: list[str] | None = None,
        **config_overrides: Any,
    ) -> "PreTrainedModel":
        """Return the fine-tuned model with LiNeS applied: ``base + lambda * (finetuned - base)``.

        Args:
            finetuned: a local folder, a Hub repo id or a loaded ``PreTrainedModel``
                (copied, never modified in place).
            base_model: the pre-trained model, in any of the same forms.
            config: a ``LiNeSConfig`` (or a dict of its fields); keyword arguments
                such as ``alpha=0.5`` override its fields.
            revision, base_revision: Hub revisions of the fine-tune and the base.
            token: Hub token; ``None`` uses the token that huggingface_hub has stored.
            trust_remote_code: allow models whose config needs custom code.
            allow_pickle: allow ``pytorch_model.bin`` checkpoints, loaded with
                ``weights_only=True``.
            merge: LoRA adapters only. When false, return a ``PeftModel`` whose
                ``lora_B`` factors are scaled per block; when true, return the
                base model with the scaled delta merged in, as a plain model.
            adapter_names: LoRA adapters of a ``PeftModel`` to edit (default: all).
            progress: show progress bars (the edit's and transformers' loading bars).

        Returns:
            A model of the fine-tune's class, with ``model.lines_config`` and
            ``model.lines_record`` set. ``LiNeSEditor.save_pretrained`` saves it
            with ``lines_config.json`` and a model card.

        Raises:
            ConfigError, LayerResolutionError, TensorMismatchError,
            CheckpointNotFoundError, UnsafeCheckpointError: see their messages.
        """
        config = _coerce_config(config, config_overrides)

        if (merge or adapter_names is not None) and not cls._is_adapter(finetuned):
            raise ConfigError(
                "merge and adapter_names apply only to LoRA adapters (a folder with adapter_config.json or a "
                "PeftModel); a full fine-tune is always returned as a plain model"
            )
        with transformers_bars(progress):
            return cls._edit(
                finetuned,
                base_model,
                config,
                revision=revision,
                base_revision=base_revision,
                token=token,
                cache_dir=cache_dir,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                progress=progress,
                merge=merge,
                adapter_names=adapter_names,
            )

    @classmethod
    def _edit(
        cls,
        finetuned: Any,
        base_model: Any,
        config: LiNeSConfig,
        *,
        revision: str | None,
        base_revision: str | None,
        token: str | bool | None,
        cache_dir: str | os.PathLike | None,
        trust_remote_code: bool,
        allow_pickle: bool,
        progress: bool,
        merge: bool,
        adapter_names: list[str] | None,
    ) -> "PreTrainedModel":
        if cls._is_adapter(finetuned):
            from . import adapters

            return adapters.edit_adapter(
                finetuned,
                base_model=base_model,
                config=config,
                revision=revision,
                base_revision=base_revision,
                token=token,
                cache_dir=cache_dir,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                merge=merge,
                adapter_names=adapter_names,
            )

        if base_model is None:
            raise ConfigError("base_model is required to edit a full fine-tune: pass the pre-trained model")

        load = dict(token=token, cache_dir=cache_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        source_folder: Path | None = None
        if _is_model(finetuned):
            model = copy.deepcopy(finetuned)
        else:
            model, source_folder = _load_folder_model(finetuned, revision=revision, **load)
        if _is_model(base_model):
            base = base_model
        else:
            base, _ = _load_folder_model(base_model, revision=base_revision, **load)

        finetuned_source = StateDictSource(model.state_dict(), config=_model_config_dict(model))
        base_source = StateDictSource(base.state_dict(), config=_model_config_dict(base))
        plan = plan_sources(
            finetuned_source, base_source, config, prefix_hint=getattr(model, "base_model_prefix", None)
        )

        if config.out_dtype is not None:
            from .task_vector import torch_dtype

            # The source keeps references to the original tensors, so converting
            # the model replaces its parameters without touching what is read.
            model.to(torch_dtype(config.out_dtype))
            model.config.dtype = config.out_dtype

        targets = StateDictSource(model.state_dict())._tensors
        run_edit(
            plan,
            base_source,
            finetuned_source,
            MemorySink(targets),
            allow_non_finite=config.allow_non_finite,
            progress=progress,
            description="LiNeS edit",
        )

        record = make_record(
            plan,
            config,
            kind="edit",
            base=describe_input(base_model, base_revision),
            finetuned=[describe_input(finetuned, revision)],
            command=python_call("from_pretrained", finetuned, base_model, config),
        )
        _attach(model, config, record, source_folder)
        _log_summary(plan)
        return model

    @staticmethod
    def plan(
        finetuned: Any,
        base_model: Any,
        config: LiNeSConfig | Mapping[str, Any] | None = None,
        *,
        revision: str | None = None,
        base_revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        **config_overrides: Any,
    ) -> EditPlan:
        """Return the edit plan (every tensor's stack, block and scale) without editing anything.

        Folders are read from their safetensors headers only; no weights are loaded.
        """
        config = _coerce_config(config, config_overrides)
        finetuned_source = _source(finetuned, revision=revision, token=token, allow_pickle=allow_pickle)
        base_source = _source(base_model, revision=base_revision, token=token, allow_pickle=allow_pickle)
        return plan_sources(
            finetuned_source, base_source, config, prefix_hint=getattr(finetuned, "base_model_prefix", None)
        )

    # ------------------------------------------------------------------ saving

    @staticmethod
    def save_pretrained(
        model: Any,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        max_shard_size: int | str = "5GB",
        progress: bool = True,
    ) -> Path:
        """Save an edited model with ``lines_config.json`` and a ``README.md`` model card.

        The folder is written to a hidden temporary folder beside the target and
        renamed only when complete. Tokenizer and other non-weight files of the
        fine-tune's folder are copied along when the model was loaded from one.
        ``progress=False`` hides transformers' shard-writing bar.

        Raises:
            ConfigError: if the model did not come from a LiNeS edit.
            OutputPathError: if the folder is an input or exists (without ``overwrite``).
        """
        config = getattr(model, "lines_config", None)
        record = getattr(model, "lines_record", None)
        if config is None or record is None:
            raise ConfigError(
                "this model carries no LiNeS record: save the result of LiNeSEditor.from_pretrained or merge, "
                "or use model.save_pretrained for a plain save"
            )
        source_folder = getattr(model, "lines_source_folder", None)
        inputs = [p for p in _input_paths(record)]

        with atomic_output_dir(save_directory, inputs, overwrite=overwrite) as temp:
            finetuned_card = None
            if source_folder is not None:
                copy_non_weight_files(source_folder, temp)
                finetuned_card = _read_text(Path(source_folder) / "README.md")
            with transformers_bars(progress):
                model.save_pretrained(temp, max_shard_size=max_shard_size)
            _finish_folder(temp, config, record, finetuned_card)
        LOG.info("Saved the LiNeS-edited model to %s", save_directory)
        return Path(save_directory)

    @staticmethod
    def push_to_hub(
        model_or_folder: Any,
        repo_id: str,
        *,
        save_directory: str | os.PathLike | None = None,
        max_shard_size: int | str = "5GB",
        **push_kwargs: Any,
    ):
        """Upload a LiNeS output to a Hub model repo in one commit, with its card and ``lines_config.json``.

        Args:
            model_or_folder: an output folder, or an edited model (the result of
                ``from_pretrained`` or a merge), which is first saved with
                ``save_pretrained`` into ``save_directory`` or a temporary folder.
            repo_id: ``name`` or ``user/name`` of the target repo (created if missing).
            save_directory: where to save a model before pushing; kept afterwards.
            **push_kwargs: ``private``, ``revision``, ``commit_message``,
                ``create_pr``, ``token``, ``overwrite_readme`` and ``api``, as for
                ``lines_hf.hub.push_folder``.

        Returns:
            The ``huggingface_hub.CommitInfo`` of the upload.

        Raises:
            HubError: if the push fails. A temporary folder is then kept, and the
                message names it and the command that retries.
        """
        import shutil
        import tempfile

        from .hub import push_folder

        if isinstance(model_or_folder, (str, os.PathLike)):
            return push_folder(model_or_folder, repo_id, **push_kwargs)

        if save_directory is not None:
            folder = LiNeSEditor.save_pretrained(model_or_folder, save_directory, max_shard_size=max_shard_size)
            return push_folder(folder, repo_id, **push_kwargs)

        folder = Path(tempfile.mkdtemp(prefix="lines-hf-push-"))
        try:
            LiNeSEditor.save_pretrained(model_or_folder, folder, overwrite=True, max_shard_size=max_shard_size)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        # On a failed push the saved folder stays, so the retry in the error message can use it.
        commit = push_folder(folder, repo_id, **push_kwargs)
        shutil.rmtree(folder, ignore_errors=True)
        return commit

    # ------------------------------------------------------------------ streaming

    @staticmethod
    def edit_folder(
        finetuned: str | os.PathLike,
        base_model: str | os.PathLike,
        output: str | os.PathLike,
        config: LiNeSConfig | Mapping[str, Any] | None = None,
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
        base_revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        command: str | None = None,
        **config_overrides: Any,
    ) -> Path:
        """Edit a checkpoint folder into ``output``, one tensor chunk at a time.

        Peak memory stays near a few chunks whatever the model size: tensors are
        read with ``pread`` into their own buffers and written straight into
        safetensors shards. Non-weight files of the fine-tune (config, tokenizer,
        sentence-transformers modules) are copied along.

        Returns:
            The output folder.

        Raises:
            OutputPathError: if ``output`` is an input or exists (without ``overwrite``).
            and every error of ``from_pretrained``.
        """
        config = _coerce_config(config, config_overrides)
        finetuned_dir = resolve_model_dir(finetuned, revision=revision, token=token, cache_dir=cache_dir)
        base_dir = resolve_model_dir(base_model, revision=base_revision, token=token, cache_dir=cache_dir)

        finetuned_source = FolderSource(finetuned_dir, allow_pickle=allow_pickle)
        base_source = FolderSource(base_dir, allow_pickle=allow_pickle)
        try:
            if finetuned_source.config is None:
                raise CheckpointNotFoundError(
                    f"no config.json in {finetuned_dir}: lines_hf needs it to know the model's depth"
                )
            check_remote_code(finetuned_source.config, finetuned_dir, trust_remote_code)
            check_remote_code(base_source.config, base_dir, trust_remote_code)
            plan = plan_sources(finetuned_source, base_source, config)
            record = make_record(
                plan,
                config,
                kind="edit",
                base=describe_input(base_model, base_revision),
                finetuned=[describe_input(finetuned, revision)],
                command=command or python_call("edit_folder", finetuned, base_model, config),
            )

            with (
                atomic_output_dir(output, [finetuned_dir, base_dir], overwrite=overwrite) as temp,
                ScalePlot(record, temp / PLOT_NAME) as plot,
            ):
                copy_non_weight_files(finetuned_dir, temp)
                write_plan_shards(plan, base_source, finetuned_source, temp, config, max_shard_size, progress)
                _finish_folder(temp, config, record, _read_text(finetuned_dir / "README.md"), plot=plot)
        finally:
            finetuned_source.close()
            base_source.close()

        _log_summary(plan)
        LOG.info("Wrote the LiNeS-edited model to %s", output)
        return Path(output)

    # ------------------------------------------------------------------ merges

    @staticmethod
    def merge(
        finetuned: list[Any],
        base_model: Any,
        method: str = "task_arithmetic",
        config: LiNeSConfig | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> "PreTrainedModel":
        """Merge fine-tunes (models, folders or LoRA adapter folders) of one base and return the merged model.

        The task vectors are merged with ``method`` (``task_arithmetic``,
        ``ties``, ``consensus``, ``dare_linear``, ``dare_ties``), then LiNeS
        scales the merged task vector once; ``lines=False`` gives the plain
        baseline with one global ``scale``. ``config.alpha=None`` is the
        automatic alpha. Keyword arguments (``lines``, ``scale``, ``evaluate``,
        ``finetuned_accuracy``, ``grid``, ``density``, ``ties_trim``, ...) are
        those of ``lines_hf.merge.merge_models``, which documents them.
        """
        from .merge import merge_models

        config_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in LiNeSConfig.__dataclass_fields__}
        return merge_models(finetuned, base_model, method, _coerce_config(config, config_fields), **kwargs)

    @staticmethod
    def merge_folder(
        finetuned: list[str | os.PathLike],
        base_model: str | os.PathLike,
        output: str | os.PathLike,
        method: str = "task_arithmetic",
        config: LiNeSConfig | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Merge model or LoRA adapter folders into ``output``, streaming; see ``lines_hf.merge.merge_folders``."""
        from .merge import merge_folders

        config_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in LiNeSConfig.__dataclass_fields__}
        return merge_folders(finetuned, base_model, output, _coerce_config(config, config_fields), method=method, **kwargs)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _is_adapter(value: Any) -> bool:
        if _is_peft_model(value):
            return True
        if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
            return os.path.isfile(os.path.join(value, ADAPTER_CONFIG_NAME))
        if isinstance(value, str) and not os.path.exists(value) and looks_like_repo_id(value):
            return _hub_repo_has_adapter(value)
        return False


def _hub_repo_has_adapter(repo_id: str) -> bool:
    """Return true if Hub repo ``repo_id`` contains ``adapter_config.json``, checking the local cache first."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(try_to_load_from_cache(repo_id, ADAPTER_CONFIG_NAME), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return file_exists(repo_id, ADAPTER_CONFIG_NAME)
    except (HfHubHTTPError, OSError, ValueError):
        # Unreachable or private: treat it as a full model, whose loading reports the real error.
        return False


def _ties(source: Any) -> dict[str, str]:
    if isinstance(source, StateDictSource):
        return dict(source.aliases)
    return tied_weights(source.config, frozenset(spec.name for spec in source.specs()))


def plan_sources(
    finetuned_source: Any, base_source: Any, config: LiNeSConfig, *, prefix_hint: str | None = None
) -> EditPlan:
    """Check that two sources share an architecture and return the plan that edits one against the other.

    Tensors that the base ties instead of storing (an output head tied to the
    input embedding) take their task vector against the tensor they are tied to.

    Raises:
        ArchitectureMismatchError: if the configs differ in model type or depth.
        and every error of ``build_plan``.
    """
    check_same_architecture(
        finetuned_source.config,
        base_source.config,
        f"the fine-tune ({finetuned_source.location})",
        f"the base model ({base_source.location})",
    )
    return build_plan(
        finetuned_source.specs(),
        base_source.specs(),
        finetuned_source.config,
        config,
        prefix_hint=prefix_hint,
        tied_in_base=_ties(base_source),
        tied_in_finetuned=_ties(finetuned_source),
    )


def write_plan_shards(
    plan: EditPlan,
    base_source: Any,
    finetuned_source: Any,
    folder: Path,
    config: LiNeSConfig,
    max_shard_size: int | str,
    progress: bool,
) -> list[str]:
    """Run ``plan`` from the two sources into safetensors shards in ``folder``."""
    writer = ShardWriter(
        folder, [TensorSpec(a.name, a.out_dtype, a.shape) for a in plan.actions], max_shard_size=max_shard_size
    )
    order = {name: i for i, name in enumerate(writer.order)}
    plan_in_order = copy.copy(plan)
    plan_in_order.actions = sorted(plan.actions, key=lambda a: order[a.name])
    try:
        run_edit(
            plan_in_order,
            base_source,
            finetuned_source,
            writer,
            allow_non_finite=config.allow_non_finite,
            progress=progress,
            description="LiNeS edit",
        )
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    if config.out_dtype is not None:
        set_config_dtype(folder / "config.json", config.out_dtype)
    return files


def set_config_dtype(path: Path, dtype: str) -> None:
    """Record the output dtype in a saved ``config.json`` (both the new and old key)."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    data["dtype"] = dtype
    if "torch_dtype" in data:
        data["torch_dtype"] = dtype
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _finish_folder(
    folder: Path,
    config: LiNeSConfig,
    record: dict[str, Any],
    finetuned_card: str | None,
    plot: ScalePlot | None = None,
) -> None:
    from .card import write_model_card

    config.save_pretrained(folder, resolved=record)
    write_model_card(folder, config, record, finetuned_card=finetuned_card, plot=plot)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _input_paths(record: Mapping[str, Any]) -> list[str]:
    inputs = record.get("inputs", {})
    entries = [inputs.get("base_model")] + list(inputs.get("finetuned") or [])
    return [e["path"] for e in entries if e and e.get("path") and os.path.exists(e["path"])]


def _source(value: Any, *, revision: str | None, token: str | bool | None, allow_pickle: bool):
    if _is_model(value):
        return StateDictSource(value.state_dict(), config=_model_config_dict(value))
    folder = resolve_model_dir(value, revision=revision, token=token)
    return FolderSource(folder, allow_pickle=allow_pickle)


def _attach(model: Any, config: LiNeSConfig, record: dict[str, Any], source_folder: Path | None) -> None:
    model.lines_config = config
    model.lines_record = record
    model.lines_source_folder = source_folder


def _log_summary(plan: EditPlan) -> None:
    for name, scales in plan.stack_scales().items():
        shown = ", ".join(f"{s:.3g}" for s in scales)
        LOG.info("Stack %s (%d blocks): scales %s", name, len(scales), shown)
    LOG.info("Tensors outside every block: scale %.3g", plan.non_block_scale)
    missing = plan.not_in_base()
    if missing:
        LOG.info("Copied unchanged from the fine-tune (no base tensor): %s", ", ".join(missing))
