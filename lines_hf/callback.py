"""``LiNeSCallback``: apply LiNeS at the end of ``transformers.Trainer`` training.

For a plain model the callback needs the pre-trained weights at the end of
training. It re-reads them from the model's local folder (``name_or_path``) or
from ``base_model`` when it can, and only otherwise keeps a CPU copy taken
before any training step. Both happen before ``resume_from_checkpoint`` loads a
checkpoint, so a resumed run is still edited against the pre-trained weights.
For a ``PeftModel`` the base weights stay frozen, so LiNeS only scales the
LoRA adapters and no copy is needed.

After the edit, ``model.save_pretrained`` (which ``trainer.save_model()`` and
``push_to_hub`` call) also writes ``lines_config.json`` and the model card.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from . import adapters
from .checkpoint import FolderSource, StateDictSource, resolve_model_dir
from .config import LiNeSConfig
from .engine import MemorySink, run_edit
from .errors import ConfigError, TensorMismatchError
from .plan import EditPlan, build_plan

LOG = logging.getLogger(__name__)


def _weight_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Return ``{file name: (size, mtime_ns)}`` of the weight files of ``folder``."""
    stamps = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            stat = path.stat()
            stamps[path.name] = (stat.st_size, stat.st_mtime_ns)
    return stamps


class LiNeSCallback(TrainerCallback):
    """Apply LiNeS in place when training ends, to a plain model or to a PeftModel's LoRA adapters.

    Args:
        config: the LiNeS settings (``alpha`` and ``beta``, or ``gamma``).
        base_model: folder or Hub repo id of the pre-trained model, read from disk
            at the end of training. Default: the model's own ``name_or_path`` when
            it is a local folder with safetensors weights. Ignored for a PeftModel.
        model: the model to train. Passing it here snapshots what is needed
            right away; otherwise this happens in ``on_init_end``, when the
            ``Trainer`` is built.
        adapter_names: LoRA adapters of a PeftModel to edit (default: all).

    The edit runs in ``on_train_end`` of every ``trainer.train()`` call, after
    ``load_best_model_at_end``, so ``trainer.save_model()`` afterwards saves the
    edited model. The edited model carries ``lines_config`` and ``lines_record``.

    Raises:
        ConfigError: at construction, if ``config`` lacks alpha and beta; in
            ``on_train_begin``, if training resumes from a checkpoint and the
            pre-trained weights were never captured.
        UnsupportedAdapterError: before training, for PEFT adapters that cannot
            be edited by scaling ``lora_B`` (non-LoRA types, DoRA).
    """

    def __init__(
        self,
        config: LiNeSConfig,
        *,
        base_model: str | os.PathLike | None = None,
        model: Any = None,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(config, LiNeSConfig):
            raise ConfigError(f"config must be a LiNeSConfig, got {type(config).__name__}")
        config.resolved_alpha_beta()
        self.config = config
        self.base_model = base_model
        self.adapter_names = list(adapter_names) if adapter_names is not None else None
        self._prepared_for: int | None = None
        self._base_dir: Path | None = None
        self._base_stamps: dict[str, tuple[int, int]] = {}
        self._snapshot: dict[str, torch.Tensor] | None = None
        self.record: dict[str, Any] | None = None
        if model is not None:
            self._prepare(model)

    # ------------------------------------------------------------------ before training

    def _prepare(self, model: Any) -> None:
        """Find or capture the pre-trained weights of ``model`` (or check its adapters)."""
        if self._prepared_for == id(model):
            return
        self._prepared_for = id(model)

        if adapters.is_peft_model(model):
            # Fail now rather than after hours of training.
            chosen = adapters.select_adapters(model, self.adapter_names, merge=False)
            adapters._check_variants(model, chosen, merge=False)
            LOG.info("LiNeS will scale the LoRA adapter(s) %s when training ends", ", ".join(chosen))
            return

        trained = StateDictSource(model.state_dict(), config=model.config.to_dict())
        folder = self._base_folder(model)
        if folder is not None:
            source = FolderSource(folder)
            try:
                # A dry run on names and shapes only, so a mismatch shows now and not after training.
                self._plan(trained, source, model)
            except TensorMismatchError as exc:
                if self.base_model is not None:
                    raise
                LOG.warning("The weights in %s do not match the model's tensors (%s): keeping a copy instead", folder, exc)
                folder = None
            finally:
                source.close()
        if folder is not None:
            self._base_dir = folder
            self._base_stamps = _weight_files(folder)
            LOG.info("LiNeS will re-read the pre-trained weights from %s when training ends", folder)
            return

        # NOTE: no folder to re-read from, so this copy doubles the model's memory on the CPU.
        self._snapshot = {}
        for name, tensor in StateDictSource(model.state_dict())._tensors.items():
            if tensor.is_floating_point():
                self._snapshot[name] = tensor.detach().to("cpu", copy=True)
        self._plan(trained, StateDictSource(self._snapshot), model)
        size = sum(t.numel() * t.element_size() for t in self._snapshot.values())
        LOG.warning(
            "LiNeS keeps a CPU copy of the pre-trained weights (%.1f MB) because the model has no local folder to "
            "re-read them from; pass base_model=FOLDER to LiNeSCallback to avoid it",
            size / 1e6,
        )

    def _base_folder(self, model: Any) -> Path | None:
        if self.base_model is not None:
            folder = resolve_model_dir(self.base_model)
            FolderSource(folder).close()  # raises now if the folder has no readable weights
            return folder
        path = getattr(model, "name_or_path", None)
        if not path or not Path(path).is_dir():
            return None
        try:
            FolderSource(path).close()
        except (OSError, ValueError) as exc:
            LOG.info("The model folder %s cannot be re-read (%s): keeping a copy instead", path, exc)
            return None
        return Path(path)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._prepare(model)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or self._prepared_for == id(model):
            return control
        if state.global_step > 0 and not adapters.is_peft_model(model) and self.base_model is None:
            raise ConfigError(
                f"training resumes at step {state.global_step}, but LiNeSCallback never saw the pre-trained model: "
                "pass it when building the Trainer (Trainer(callbacks=[LiNeSCallback(...)])) or give "
                "base_model=FOLDER of the pre-trained weights"
            )
        self._prepare(model)
        return control

    # ------------------------------------------------------------------ after training

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            LOG.warning("LiNeSCallback.on_train_end got no model: nothing was edited")
            return control
        self._prepare(model)
        if adapters.is_peft_model(model):
            self.record = self._edit_adapters(model)
        else:
            self.record = self._edit_full(model)
        self.record["command"] = f"LiNeSCallback({self.config!r}) at the end of training (step {state.global_step})"
        model.lines_config = self.config
        model.lines_record = self.record
        _write_record_on_save(model)
        return control

    def _edit_adapters(self, model: Any) -> dict[str, Any]:
        base = model.get_base_model()
        saved = adapters._saved_tensor_names(model, list(model.peft_config))
        record = adapters.scale_peft_model(
            model,
            self.config,
            adapter_names=self.adapter_names,
            base_tensor_names=adapters._in_base_checkpoint(base, saved),
        )
        record["inputs"] = {
            "base_model": {"path": getattr(base, "name_or_path", None) or None, "hub_id": None, "revision": None},
            "finetuned": [{"path": None, "hub_id": None, "revision": None}],
        }
        return record

    @torch.no_grad()
    def _edit_full(self, model: Any) -> dict[str, Any]:
        finetuned = StateDictSource(model.state_dict(), config=model.config.to_dict())
        base, base_path = self._base_source(model)
        plan = self._plan(finetuned, base, model)
        run_edit(
            plan,
            base,
            finetuned,
            MemorySink(finetuned._tensors),
            allow_non_finite=self.config.allow_non_finite,
            progress=False,
        )
        base.close()
        for name, scales in plan.stack_scales().items():
            LOG.info("LiNeS edited stack %s (%d blocks): scales %s", name, len(scales), ", ".join(f"{s:.3g}" for s in scales))
        LOG.info("LiNeS: tensors outside every block got scale %.3g", plan.non_block_scale)
        return {
            "kind": "edit",
            "library_name": "transformers",
            "inputs": {
                "base_model": {"path": base_path, "hub_id": None, "revision": None},
                "finetuned": [{"path": None, "hub_id": None, "revision": None}],
            },
            "command": "",
            **plan.summary(),
            "out_dtype": self.config.out_dtype,
        }

    def _base_source(self, model: Any):
        if self._base_dir is None:
            if self._snapshot is None:
                raise ConfigError("LiNeSCallback has no pre-trained weights to edit against")
            return StateDictSource(self._snapshot, config=model.config.to_dict()), None
        if _weight_files(self._base_dir) != self._base_stamps:
            raise TensorMismatchError(
                f"the pre-trained weights in {self._base_dir} changed during training (was the model saved into "
                "the folder it was loaded from?). Point base_model= at an unchanged copy of the pre-trained model."
            )
        return FolderSource(self._base_dir), os.fspath(self._base_dir)

    def _plan(self, finetuned: StateDictSource, base, model: Any) -> EditPlan:
        config = self.config
        base_dtypes = {spec.dtype for spec in base.specs() if spec.is_float}
        model_dtypes = {spec.dtype for spec in finetuned.specs() if spec.is_float}
        if config.out_dtype is None and base_dtypes != model_dtypes and len(model_dtypes) == 1:
            # A base stored in bfloat16 and trained in float32: compute in float32, keep the model's dtype.
            config = dataclasses.replace(config, out_dtype=next(iter(model_dtypes)))
        try:
            return build_plan(
                finetuned.specs(),
                base.specs(),
                finetuned.config,
                config,
                prefix_hint=getattr(model, "base_model_prefix", None),
            )
        except TensorMismatchError as exc:
            where = getattr(base, "location", "<memory>")
            raise TensorMismatchError(
                f"{exc} (LiNeSCallback compares the model in memory with the pre-trained weights in {where}.)"
            ) from None


def _write_record_on_save(model: Any) -> None:
    """Make ``model.save_pretrained`` also write ``lines_config.json`` and the model card."""
    if getattr(model, "_lines_save_hooked", False):
        return
    save_pretrained = model.save_pretrained

    def save_with_record(save_directory, *args, **kwargs):
        result = save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            adapters.write_record_files(save_directory, model.lines_config, model.lines_record)
            LOG.info("Wrote lines_config.json and the model card to %s", save_directory)
        return result

    save_with_record.__doc__ = save_pretrained.__doc__
    model.save_pretrained = save_with_record
    model._lines_save_hooked = True

