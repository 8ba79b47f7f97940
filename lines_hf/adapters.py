"""LiNeS for LoRA adapters: scale each LoRA module's ``lora_B`` by the scale of its block.

A LoRA module adds ``scaling * B @ A`` to its base weight (transposed for
``fan_in_fan_out``, with ``scaling = lora_alpha / r`` or ``lora_alpha / sqrt(r)``
under rsLoRA). Multiplying ``B`` (and the ``lora_B`` bias when ``lora_bias=True``,
or ``lora_embedding_B`` for embedding LoRA) by ``lambda`` multiplies that delta by
exactly ``lambda``, so the edited adapter is still a standard LoRA adapter.

DoRA rescales ``W + delta`` by a learned magnitude, so its output is not linear in
``B``: it is edited only in merged mode, where the task vector ``merged - base`` of
each weight is scaled. ``modules_to_save`` copies (heads) and other full tensors
stored in an adapter are tensors outside every block: they follow the non-block
policy against the base model's values.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    ADAPTER_CONFIG_NAME,
    FolderSource,
    StateDictSource,
    check_remote_code,
    load_pickle_safely,
    atomic_output_dir,
    copy_non_weight_files,
    read_config,
    resolve_model_dir,
)
from .config import LiNeSConfig
from .errors import (
    ArchitectureMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    LiNeSError,
    TensorMismatchError,
    UnsafeCheckpointError,
    UnsupportedAdapterError,
)
from .layers import LayerMap, align_names, compile_layer_pattern, find_block, resolve_layers
from .plan import non_block_value
from .schedule import linear_scale
from .task_vector import apply_scale

LOG = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"

# Prefix of every module and tensor name inside a PeftModel (and in adapter files).
PEFT_PREFIX = "base_model.model."

# Adapter-file keys of LoRA factors: ``<module>.lora_B.weight``, ``<module>.lora_embedding_B``,
# ``<module>.lora_magnitude_vector`` (DoRA). Adapter files omit the adapter name.
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?$"
)
_SCALED_PARTS = ("lora_B", "lora_embedding_B")

REASON_BLOCK = "block"
REASON_OUTSIDE = "outside blocks"
REASON_EXCLUDED = "excluded"

# PEFT task types and the transformers auto class of the model they wrap.
_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


# --------------------------------------------------------------------------- names and scales


def strip_peft_prefix(name: str) -> str:
    """Return ``name`` without PEFT's ``base_model.model.`` prefix (the name in the base model)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


@dataclass(frozen=True)
class ModuleScale:
    """The LiNeS scale of one adapted module of the base model (``model.layers.3.mlp.up_proj``)."""

    module: str
    scale: float
    reason: str
    stack: str | None = None
    block: int | None = None


@dataclass
class AdapterPlan:
    """Scales of every LoRA module and every full tensor (``modules_to_save``) of an adapter."""

    lora: dict[str, ModuleScale]
    full: dict[str, ModuleScale]
    layer_map: LayerMap | None
    alpha: float
    beta: float
    non_block_scale: float

    def summary(self) -> dict[str, Any]:
        """Return the resolved schedule as a JSON-serialisable dict (the ``stacks`` part of a record)."""
        stacks = {}
        if self.layer_map is not None:
            for name, info in self.layer_map.stacks.items():
                scales = []
                for index in range(info.depth):
                    position, depth = info.position(index)
                    scales.append(linear_scale(position, depth, self.alpha, self.beta))
                stacks[name] = {
                    "depth": info.depth,
                    "depth_source": info.depth_source,
                    "schedule_offset": info.offset,
                    "schedule_depth": info.schedule_depth or info.depth,
                    "scales": scales,
                }
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "non_block_scale": self.non_block_scale,
            "stacks": stacks,
            "excluded": sorted(
                name for name, item in {**self.lora, **self.full}.items() if item.reason == REASON_EXCLUDED
            ),
        }


def plan_adapter(
    lora_modules: Iterable[str],
    full_tensors: Iterable[str],
    model_config: Mapping[str, Any] | None,
    config: LiNeSConfig,
) -> AdapterPlan:
    """Assign a LiNeS scale to each LoRA module and each full tensor of an adapter.

    Args:
        lora_modules: names of the adapted modules in the base model
            (``model.layers.0.self_attn.q_proj``), without the PEFT prefix.
        full_tensors: names of full tensors the adapter replaces (``classifier.weight``).
        model_config: the *base* model's config as a dict: depths come from it,
            because an adapter may touch only some blocks (``layers_to_transform``).
        config: the LiNeS settings; ``exclude`` patterns match ``<module>.weight``.

    Raises:
        ConfigError: if alpha or beta is missing.
        LayerResolutionError, DepthMismatchError: as ``resolve_layers``.
    """
    alpha, beta = config.resolved_alpha_beta()
    assert alpha is not None
    outside = non_block_value(config.non_block_scale, alpha)
    lora_modules = list(dict.fromkeys(lora_modules))
    full_tensors = list(dict.fromkeys(full_tensors))

    # Block numbers are found on tensor names, as for a full model: ``<module>.weight``.
    # An adapter that touches only non-block modules (a head, the embeddings) has
    # no block to find, and every tensor then gets the non-block scale.
    names = [f"{module}.weight" for module in lora_modules] + full_tensors
    pattern = compile_layer_pattern(config.layer_pattern)
    layer_map = None
    if any(find_block(name, pattern) is not None for name in names):
        layer_map = resolve_layers(
            names,
            model_config,
            layer_pattern=config.layer_pattern,
            num_layers=config.num_layers,
            stack_policy=config.stack_policy,
            require_all_blocks=False,
        )
    excludes = [re.compile(p) for p in config.exclude]

    def scale_of(label: str, tensor_name: str) -> ModuleScale:
        if any(p.search(tensor_name) for p in excludes):
            return ModuleScale(label, 1.0, REASON_EXCLUDED)
        located = layer_map.locate(tensor_name) if layer_map is not None else None
        if located is None:
            return ModuleScale(label, outside, REASON_OUTSIDE)
        ref, info = located
        position, depth = info.position(ref.index)
        return ModuleScale(label, linear_scale(position, depth, alpha, beta), REASON_BLOCK, ref.stack, ref.index)

    return AdapterPlan(
        lora={module: scale_of(module, f"{module}.weight") for module in lora_modules},
        full={name: scale_of(name, name) for name in full_tensors},
        layer_map=layer_map,
        alpha=float(alpha),
        beta=float(beta),
        non_block_scale=float(outside),
    )


def scale_tensor(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``scale * tensor`` computed in float32 (float64 stays float64), in the input dtype.

    A scale of exactly 1 returns ``tensor`` itself.
    """
    if scale == 1.0:
        return tensor
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return (tensor.to(wide) * scale).to(tensor.dtype)


# --------------------------------------------------------------------------- adapter configs


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Return true if ``path`` is a folder holding a PEFT ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def is_peft_model(model: Any) -> bool:
    """Return true if ``model`` is a ``peft.PeftModel`` (peft is imported only if already loaded)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Return ``adapter_config.json`` of ``folder`` as a dict.

    Raises:
        CheckpointNotFoundError: if the file is missing.
        UnsupportedAdapterError: if the file is not valid JSON.
    """
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise CheckpointNotFoundError(f"{os.fspath(folder)!r} is not a PEFT adapter folder: {ADAPTER_CONFIG_NAME} is missing")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except RecursionError:
        raise UnsupportedAdapterError(f"{path} is nested too deeply to be valid JSON") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or an integer past Python's digit limit
        raise UnsupportedAdapterError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UnsupportedAdapterError(f"{path} must hold a JSON object")
    return data


def check_adapter_config(adapter_config: Mapping[str, Any], name: str, *, merge: bool) -> None:
    """Reject adapters that LiNeS cannot edit exactly by scaling ``lora_B``.

    Raises:
        UnsupportedAdapterError: for a PEFT type other than LoRA; for DoRA outside
            merged mode; for trainable-token deltas, which are neither LoRA factors
            nor full modules.
    """
    peft_type = str(adapter_config.get("peft_type", "")).split(".")[-1].upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"adapter {name!r} is a {peft_type or 'unknown'} adapter; lines_hf edits only LoRA adapters "
            "(peft_type LORA). Merge it into the base model first (merge_and_unload) and edit the full "
            "model with LiNeSEditor.from_pretrained(merged_model, base_model=...)."
        )
    if adapter_config.get("use_dora") and not merge:
        raise UnsupportedAdapterError(
            f"adapter {name!r} uses DoRA (use_dora=True): its output is not linear in lora_B, so scaling the "
            "adapter cannot apply LiNeS exactly. Use merged mode instead (merge=True, CLI --merge), which "
            "scales the merged task vector of each weight and returns a plain model."
        )
    if adapter_config.get("trainable_token_indices"):
        raise UnsupportedAdapterError(
            f"adapter {name!r} trains token embeddings (trainable_token_indices), which lines_hf does not "
            "edit. Merge the adapter (merge_and_unload) and edit the full model instead."
        )


def _peft_config_dict(peft_config: Any) -> dict[str, Any]:
    data = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(vars(peft_config))
    peft_type = data.get("peft_type")
    data["peft_type"] = getattr(peft_type, "value", peft_type)
    return data


# --------------------------------------------------------------------------- quantized bases


def is_quantized(model: Any) -> bool:
    """Return true if ``model`` (or a PeftModel's base) has quantized weights.

    Checks, in order: bitsandbytes' ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``
    flags, a transformers ``hf_quantizer``, a ``quantization_config`` in the config
    other than GGUF (GGUF checkpoints are dequantised to float on load), and
    bitsandbytes layer or parameter classes anywhere in the model.
    """
    inner = model.get_base_model() if is_peft_model(model) else model
    if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False):
        return True
    if getattr(inner, "hf_quantizer", None) is not None:
        return True
    quantization = getattr(getattr(inner, "config", None), "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
        if str(getattr(method, "value", method)).lower() != "gguf":
            return True
    quantized_classes = {"Linear4bit", "Linear8bitLt", "Params4bit", "Int8Params"}
    for module in inner.modules():
        if type(module).__name__ in quantized_classes:
            return True
    return any(type(param).__name__ in quantized_classes for param in inner.parameters())


def _reject_quantized_merge(model: Any) -> None:
    if is_quantized(model):
        raise UnsupportedAdapterError(
            "merged mode needs a full-precision base model, but this base is quantized (bitsandbytes 4-bit or "
            "8-bit, as in QLoRA): merging into quantized weights would round the edit away. Either keep the "
            "adapter (merge=False, the default: it works with a quantized base), or load the base model in "
            "float16/bfloat16/float32 without quantization_config and merge into it, e.g. "
            "LiNeSEditor.from_pretrained(adapter_dir, base_model=full_precision_base, config=cfg, merge=True) "
            "or lines-hf edit --base FULL_PRECISION_DIR --adapter ADAPTER_DIR --merge ..."
        )


# --------------------------------------------------------------------------- PeftModel in memory


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _saved_module_wrappers(model: Any) -> list[tuple[str, Any]]:
    from peft.utils.other import ModulesToSaveWrapper

    return [(name, module) for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]


def select_adapters(model: Any, adapter_names: Sequence[str] | None, *, merge: bool) -> list[str]:
    """Return the adapters of a PeftModel to edit: all of them, or ``adapter_names``.

    Raises:
        ConfigError: if a requested adapter does not exist.
        UnsupportedAdapterError: if a selected adapter is not an editable LoRA adapter.
    """
    available = list(model.peft_config)
    if adapter_names is None:
        selected = available
    else:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        missing = [name for name in adapter_names if name not in available]
        if missing:
            raise ConfigError(f"adapter(s) {missing} not found in the PeftModel; it has {available}")
        selected = list(dict.fromkeys(adapter_names))
    for name in selected:
        check_adapter_config(_peft_config_dict(model.peft_config[name]), name, merge=merge)
    return selected


def _adapter_uses_dora(model: Any, adapter: str) -> bool:
    if getattr(model.peft_config[adapter], "use_dora", False):
        return True
    return any(adapter in layer.lora_magnitude_vector for _, layer in _lora_layers(model))


def _check_variants(model: Any, adapters: Sequence[str], *, merge: bool) -> None:
    # A LoRA variant replaces the plain ``x @ A.T @ B.T * scaling`` forward; only
    # DoRA is known here, and only merged mode edits it exactly.
    for name, layer in _lora_layers(model):
        for adapter in adapters:
            variant = getattr(layer, "lora_variant", {}).get(adapter)
            if variant is None:
                continue
            kind = type(variant).__name__
            if "Dora" in kind and merge:
                continue
            raise UnsupportedAdapterError(
                f"module {strip_peft_prefix(name)!r} of adapter {adapter!r} uses the LoRA variant {kind}, whose "
                "delta is not linear in lora_B: scaling the adapter cannot apply LiNeS exactly. "
                + (
                    "Use merged mode (merge=True, CLI --merge)."
                    if "Dora" in kind
                    else "Merge it (merge_and_unload) and edit the full model instead."
                )
            )


def _saved_tensor_names(model: Any, adapters: Sequence[str]) -> list[str]:
    """Return the base-model names of the tensors of every ``modules_to_save`` copy of ``adapters``."""
    names = []
    for name, wrapper in _saved_module_wrappers(model):
        for adapter in adapters:
            if adapter in wrapper.modules_to_save:
                for param_name, _ in wrapper.modules_to_save[adapter].named_parameters():
                    names.append(f"{strip_peft_prefix(name)}.{param_name}")
    return list(dict.fromkeys(names))


def _in_base_checkpoint(base_model: Any, names: Sequence[str]) -> set[str] | None:
    """Return which of ``names`` the base model's checkpoint folder holds.

    A head that the base checkpoint lacks was initialised at random when the base
    was loaded, so it has no pre-trained value to scale against. Returns ``None``
    when the base has no local folder to check (then every tensor counts as present).
    """
    path = getattr(base_model, "name_or_path", None)
    if not names or not path or not Path(path).is_dir():
        return None
    try:
        source = FolderSource(path)
    except LiNeSError as exc:  # no readable safetensors: trust the loaded values
        LOG.debug("Could not list the tensors of %s: %s", path, exc)
        return None
    on_disk = [spec.name for spec in source.specs()]
    source.close()
    mapping = align_names(list(names), on_disk, prefix_hint=getattr(base_model, "base_model_prefix", None))
    return {name for name, found in mapping.items() if found is not None}


def plan_peft_model(
    model: Any,
    config: LiNeSConfig,
    adapters: Sequence[str],
) -> AdapterPlan:
    """Plan the scales of every LoRA module and ``modules_to_save`` tensor of ``adapters``."""
    lora_modules = []
    for name, layer in _lora_layers(model):
        if any(adapter in layer.lora_A or adapter in layer.lora_embedding_A for adapter in adapters):
            lora_modules.append(strip_peft_prefix(name))
    full_tensors = _saved_tensor_names(model, adapters)
    base_config = model.get_base_model().config.to_dict()
    return plan_adapter(lora_modules, full_tensors, base_config, config)


@torch.no_grad()
def scale_lora_layer(layer: Any, adapter: str, scale: float) -> None:
    """Multiply the delta of ``adapter`` in one LoRA layer by ``scale``, in place.

    Scales ``lora_B`` (its weight, and its bias when ``lora_bias=True``) or
    ``lora_embedding_B``. Not exact for DoRA: callers check that first.
    """
    if scale == 1.0:
        return
    if adapter in layer.lora_B:
        for param in layer.lora_B[adapter].parameters():
            param.copy_(scale_tensor(param.detach(), scale))
    if adapter in layer.lora_embedding_B:
        param = layer.lora_embedding_B[adapter]
        param.copy_(scale_tensor(param.detach(), scale))


@torch.no_grad()
def _scale_saved_modules(
    model: Any, adapters: Sequence[str], plan: AdapterPlan, base_names: set[str] | None, record: dict[str, Any]
) -> None:
    """Move each ``modules_to_save`` copy to ``original + scale * (copy - original)``."""
    for name, wrapper in _saved_module_wrappers(model):
        originals = dict(wrapper.original_module.named_parameters())
        for adapter in adapters:
            if adapter not in wrapper.modules_to_save:
                continue
            for param_name, param in wrapper.modules_to_save[adapter].named_parameters():
                tensor_name = f"{strip_peft_prefix(name)}.{param_name}"
                item = plan.full[tensor_name]
                original = originals.get(param_name)
                if original is None or (base_names is not None and tensor_name not in base_names):
                    record["copied_from_finetuned_not_in_base"].append(tensor_name)
                    continue
                if original.shape != param.shape:
                    raise TensorMismatchError(
                        f"modules_to_save tensor {tensor_name!r} of adapter {adapter!r} has shape {list(param.shape)} "
                        f"but the base model's has {list(original.shape)}"
                    )
                edited = apply_scale(original.detach(), param.detach(), item.scale, param.dtype, name=tensor_name)
                param.copy_(edited)


def _new_record(kind: str, library_name: str, plan: AdapterPlan, adapters: Sequence[str], merged: bool) -> dict[str, Any]:
    summary = plan.summary()
    return {
        "kind": kind,
        "library_name": library_name,
        "inputs": {"base_model": {}, "finetuned": []},
        "command": "",
        "alpha": summary["alpha"],
        "beta": summary["beta"],
        "non_block_scale": summary["non_block_scale"],
        "out_dtype": None,
        "stacks": summary["stacks"],
        "copied_from_finetuned_not_in_base": [],
        "excluded": summary["excluded"],
        "dropped_base_only": [],
        "adapter": {
            "peft_type": "LORA",
            "adapter_names": list(adapters),
            "merged": merged,
            "module_scales": {module: item.scale for module, item in plan.lora.items()},
            "full_tensor_scales": {name: item.scale for name, item in plan.full.items()},
        },
    }


def scale_peft_model(
    model: Any,
    config: LiNeSConfig,
    *,
    adapter_names: Sequence[str] | None = None,
    base_tensor_names: set[str] | None = None,
) -> dict[str, Any]:
    """Apply LiNeS in place to the LoRA adapters of a PeftModel and return the record.

    Every LoRA module in block ``l`` gets its ``lora_B`` multiplied by ``lambda(l)``;
    LoRA modules outside the blocks and ``modules_to_save`` copies get the
    non-block scale (a copy moves to ``original + scale * (copy - original)``).

    Args:
        model: a ``peft.PeftModel`` with LoRA adapters; modified in place.
        config: the LiNeS settings.
        adapter_names: the adapters to edit; default every adapter.
        base_tensor_names: names (without the PEFT prefix) of the tensors the base
            checkpoint holds. A ``modules_to_save`` tensor outside this set was
            initialised at random and is kept as trained. ``None`` trusts the
            loaded original module.

    Raises:
        UnsupportedAdapterError: non-LoRA adapters, DoRA, trainable tokens, or a
            LoRA variant whose delta is not linear in ``lora_B``.
        ConfigError: if ``adapter_names`` names an adapter the model lacks.
    """
    adapters = select_adapters(model, adapter_names, merge=False)
    _check_variants(model, adapters, merge=False)
    plan = plan_peft_model(model, config, adapters)
    record = _new_record("adapter", "peft", plan, adapters, merged=False)
    _apply_lora_scales(model, adapters, plan)
    _scale_saved_modules(model, adapters, plan, base_tensor_names, record)
    _log_plan(plan, adapters, merged=False)
    return record


def _apply_lora_scales(model: Any, adapters: Sequence[str], plan: AdapterPlan) -> None:
    for name, layer in _lora_layers(model):
        item = plan.lora.get(strip_peft_prefix(name))
        if item is None:
            continue
        for adapter in adapters:
            scale_lora_layer(layer, adapter, item.scale)


def _log_plan(plan: AdapterPlan, adapters: Sequence[str], merged: bool) -> None:
    scales = [item.scale for item in plan.lora.values()]
    LOG.info(
        "LiNeS %s adapter(s) %s: %d LoRA module(s), scales %.4g to %.4g (alpha=%g, beta=%g); %d full tensor(s) "
        "outside blocks at scale %g",
        "merged" if merged else "scaled",
        ", ".join(adapters),
        len(scales),
        min(scales, default=float("nan")),
        max(scales, default=float("nan")),
        plan.alpha,
        plan.beta,
        len(plan.full),
        plan.non_block_scale,
    )


@torch.no_grad()
def merge_scaled(
    model: Any,
    config: LiNeSConfig,
    *,
    adapter_names: Sequence[str] | None = None,
    base_tensor_names: set[str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Merge the LiNeS-scaled adapters into the base model and return ``(plain_model, record)``.

    Plain LoRA: ``lora_B`` is scaled as in adapter mode and PEFT's
    ``merge_and_unload`` adds the scaled delta, so the weights equal
    ``base + lambda * delta``. When a selected adapter uses DoRA, every adapted
    weight (and bias) becomes ``base + lambda * (merged - base)``, where
    ``merged`` is PEFT's merge of the unscaled adapters. ``model`` is consumed:
    its LoRA layers are unloaded. Adapters not selected are dropped.

    Raises:
        UnsupportedAdapterError: for a quantized base, non-LoRA adapters or
            LoRA variants other than DoRA.
    """
    _reject_quantized_merge(model)
    adapters = select_adapters(model, adapter_names, merge=True)
    _check_variants(model, adapters, merge=True)
    dropped = [name for name in model.peft_config if name not in adapters]
    if dropped:
        LOG.warning("Adapters %s are not selected: merged mode drops them", dropped)
    uses_dora = any(_adapter_uses_dora(model, adapter) for adapter in adapters)
    plan = plan_peft_model(model, config, adapters)
    record = _new_record("adapter", "transformers", plan, adapters, merged=True)
    record["adapter"]["method"] = "merged task vector" if uses_dora else "scaled lora_B"
    _scale_saved_modules(model, adapters, plan, base_tensor_names, record)

    if not uses_dora:
        _apply_lora_scales(model, adapters, plan)
        merged = model.merge_and_unload(adapter_names=adapters)
    else:
        # Keep the pre-trained values of every adapted layer (only those, not the model).
        originals: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
        for name, layer in _lora_layers(model):
            item = plan.lora.get(strip_peft_prefix(name))
            if item is None:
                continue
            params = {key: value.detach().clone() for key, value in layer.get_base_layer().named_parameters()}
            originals[strip_peft_prefix(name)] = (item.scale, params)
        merged = model.merge_and_unload(adapter_names=adapters)
        modules = dict(merged.named_modules())
        for module_name, (scale, params) in originals.items():
            target = modules[module_name]
            for key, original in params.items():
                param = target.get_parameter(key)
                edited = apply_scale(original, param.detach(), scale, param.dtype, name=f"{module_name}.{key}")
                param.copy_(edited)

    _log_plan(plan, adapters, merged=True)
    return merged, record


# --------------------------------------------------------------------------- loading


def _adapter_specs(adapter_dir: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    if (adapter_dir / ADAPTER_WEIGHTS_NAME).is_file():
        source = FolderSource(adapter_dir, weights_name=ADAPTER_WEIGHTS_NAME)
        source.close()
        return {spec.name: spec.shape for spec in source.specs()}
    if (adapter_dir / ADAPTER_PICKLE_NAME).is_file():
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{adapter_dir} contains only a pickled adapter ({ADAPTER_PICKLE_NAME}); pass allow_pickle=True "
                "(--allow-pickle) to load it with torch.load(weights_only=True)"
            )
        tensors = load_pickle_safely(adapter_dir / ADAPTER_PICKLE_NAME)
        if not isinstance(tensors, dict):
            raise CorruptCheckpointError(f"{adapter_dir / ADAPTER_PICKLE_NAME} does not hold a state dict")
        return {str(k): tuple(v.shape) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    raise CheckpointNotFoundError(f"no adapter weights in {adapter_dir}: expected {ADAPTER_WEIGHTS_NAME}")


def _base_specs(base: Any, allow_pickle: bool) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Return ``name -> (shape, is floating point)`` of the base's tensors, from headers or a loaded model."""
    if isinstance(base, (str, os.PathLike)):
        source = FolderSource(base, allow_pickle=allow_pickle)
        source.close()
    else:
        source = StateDictSource(base.state_dict())
    return {spec.name: (spec.shape, spec.is_float) for spec in source.specs()}


def check_adapter_fits_base(adapter_dir: Path, base: Any, *, allow_pickle: bool = False) -> None:
    """Check an adapter's weights file and that every LoRA module fits a weight of the base model.

    Only safetensors headers are read (or, with ``allow_pickle``, a pickle
    loaded with ``weights_only=True``). A module fits when the base has its
    ``<module>.weight`` and, for 2-D floating-point weights, the factors' outer
    sizes (``lora_A`` in-features, ``lora_B`` out-features) are the weight's two
    sizes in either order (``fan_in_fan_out`` layers store them transposed).

    Args:
        adapter_dir: the adapter folder.
        base: the base model's folder, or a loaded model.

    Raises:
        CorruptCheckpointError: if the adapter or base weights file is malformed.
        UnsafeCheckpointError: for pickled weights without ``allow_pickle``, or a pickle that refers to code.
        ArchitectureMismatchError: if a module has no weight in the base, or its sizes differ.
    """
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in _adapter_specs(adapter_dir, allow_pickle).items():
        match = _LORA_KEY.match(key)
        if match is not None and match.group("param") != "bias":
            factors.setdefault(strip_peft_prefix(match.group("module")), {})[match.group("part")] = shape
    if not factors:
        return
    base_specs = _base_specs(base, allow_pickle)
    weights = [f"{module}.weight" for module in factors]
    aligned = align_names(weights, base_specs)
    where = f"the base model ({base if isinstance(base, (str, os.PathLike)) else type(base).__name__})"
    for module, parts in factors.items():
        base_name = aligned.get(f"{module}.weight")
        if base_name is None:
            raise ArchitectureMismatchError(
                f"the adapter in {os.fspath(adapter_dir)!r} has LoRA module {module!r}, which {where} lacks: "
                "the adapter was trained on another model. Pass the base model it was trained on."
            )
        shape, is_float = base_specs[base_name]
        a_part = parts.get("lora_A") or parts.get("lora_embedding_A")
        b_part = parts.get("lora_B") or parts.get("lora_embedding_B")
        if not is_float or len(shape) != 2 or a_part is None or b_part is None or len(a_part) != 2 or len(b_part) != 2:
            continue  # quantized, convolutional or partial modules: presence is all that is checked
        if sorted((a_part[1], b_part[0])) != sorted(shape):
            raise ArchitectureMismatchError(
                f"the adapter in {os.fspath(adapter_dir)!r} has LoRA module {module!r} with factors of shapes "
                f"{list(a_part)} and {list(b_part)}, which do not fit the base weight {base_name!r} of shape "
                f"{list(shape)} in {where}: the adapter was trained on another model. Pass the base model it "
                "was trained on."
            )


def _auto_class_for(adapter_config: Mapping[str, Any], base_config: Mapping[str, Any] | None) -> Any:
    import transformers

    task = adapter_config.get("task_type")
    task = getattr(task, "value", task)
    if task in _TASK_AUTO_CLASSES:
        return getattr(transformers, _TASK_AUTO_CLASSES[task])
    architectures = (base_config or {}).get("architectures") or []
    if architectures and hasattr(transformers, architectures[0]):
        return getattr(transformers, architectures[0])
    return transformers.AutoModel


def _head_labels(adapter_dir: Path, adapter_config: Mapping[str, Any]) -> int | None:
    """Return the number of labels of a sequence-classification head saved in the adapter, if any."""
    if adapter_config.get("task_type") != "SEQ_CLS":
        return None
    try:
        source = FolderSource(adapter_dir, weights_name=ADAPTER_WEIGHTS_NAME)
    except CheckpointNotFoundError:
        return None
    for spec in source.specs():
        if _LORA_KEY.match(spec.name) is None and re.search(r"(classifier|score)(\.out_proj)?\.weight$", spec.name):
            return spec.shape[0]
    return None


def resolve_base_path(adapter_dir: Path, base_model: Any, adapter_config: Mapping[str, Any], **hub: Any) -> Path:
    """Return the local folder of the base model named by ``base_model`` or by the adapter config.

    Raises:
        CheckpointNotFoundError: if neither names a base that can be found.
    """
    name = base_model if base_model is not None else adapter_config.get("base_model_name_or_path")
    if not name:
        raise CheckpointNotFoundError(
            f"the adapter in {os.fspath(adapter_dir)!r} does not name its base model (base_model_name_or_path "
            "is empty): pass base_model=... (CLI --base DIR)"
        )
    try:
        return resolve_model_dir(name, **hub)
    except CheckpointNotFoundError as exc:
        if base_model is None:
            raise CheckpointNotFoundError(
                f"the adapter names base model {name!r}, which cannot be found ({exc}). Pass base_model=... "
                "(CLI --base DIR) with a local copy."
            ) from None
        raise


def load_peft_model(
    adapter: str | os.PathLike,
    base_model: Any = None,
    *,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Path, Any]:
    """Load a LoRA adapter folder (or Hub repo) onto its base model.

    The adapter's files are checked against the base first
    (``check_adapter_fits_base``), so a corrupt file, a pickle without
    ``allow_pickle`` or an adapter trained on another model fails with a clear
    error before PEFT loads anything.

    ``base_model`` may be a loaded model (it is wrapped, so it is modified), a
    folder or repo id, or ``None`` to use the adapter's ``base_model_name_or_path``.

    Returns:
        ``(peft_model, adapter_dir, base_ref)`` where ``base_ref`` is the base's
        folder, or the loaded base model itself.

    Raises:
        CheckpointNotFoundError, UnsupportedAdapterError: see ``resolve_base_path``
            and ``check_adapter_config``.
    """
    from peft import PeftModel

    adapter_dir = resolve_model_dir(adapter, revision=revision, token=token, cache_dir=cache_dir)
    adapter_config = read_adapter_config(adapter_dir)
    peft_type = str(adapter_config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        check_adapter_config(adapter_config, os.fspath(adapter), merge=True)

    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        base_dir = resolve_base_path(
            adapter_dir, base_model, adapter_config, revision=base_revision, token=token, cache_dir=cache_dir
        )
        base_config = read_config(base_dir)

        check_remote_code(base_config, base_dir, trust_remote_code)
        check_adapter_fits_base(adapter_dir, base_dir, allow_pickle=allow_pickle)
        auto_class = _auto_class_for(adapter_config, base_config)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        labels = _head_labels(adapter_dir, adapter_config)
        if labels is not None:
            kwargs["num_labels"] = labels
        LOG.info("Loading base model %s with %s", base_dir, auto_class.__name__)
        loaded = auto_class.from_pretrained(base_dir, **kwargs)
        base_ref: Any = base_dir
    else:
        check_adapter_fits_base(adapter_dir, base_model, allow_pickle=allow_pickle)
        loaded = base_model
        base_ref = base_model

    try:
        model = PeftModel.from_pretrained(loaded, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        # The checks above catch the usual causes; this keeps any other PEFT failure one clear error.
        raise ArchitectureMismatchError(
            f"PEFT could not load the adapter in {os.fspath(adapter_dir)!r} onto the base model "
            f"({type(exc).__name__}: {exc}). Check that adapter_config.json is valid and that the adapter was "
            "trained on this base model."
        ) from None
    return model, adapter_dir, base_ref


def edit_adapter(
    finetuned: Any,
    base_model: Any = None,
    config: LiNeSConfig | None = None,
    *,
    merge: bool = False,
    adapter_names: Sequence[str] | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Any:
    """Apply LiNeS to a LoRA adapter; the adapter entry point of ``LiNeSEditor.from_pretrained``.

    Args:
        finetuned: an adapter folder or Hub repo (with ``adapter_config.json``) or
            a ``PeftModel``. A PeftModel passed in is not modified: it is copied
            first, which needs memory for a second model.
        base_model: the base model (folder, repo id or loaded model). Optional
            for adapter folders whose config names a base that can be found;
            ignored for a PeftModel, which carries its base.
        config: the LiNeS settings.
        merge: return the base model with the scaled delta merged in, as a plain
            transformers model, instead of a PeftModel.
        adapter_names: adapters of a PeftModel to edit (default: all).

    Returns:
        A ``PeftModel`` (or, with ``merge=True``, a ``PreTrainedModel``) with
        attributes ``lines_config`` and ``lines_record``.

    Raises:
        UnsupportedAdapterError: see ``scale_peft_model`` and ``merge_scaled``.
        CheckpointNotFoundError: if the adapter or its base cannot be found.
    """
    if config is None:
        raise ConfigError("config is required: pass config=LiNeSConfig(alpha=..., beta=...)")
    config.resolved_alpha_beta()
    _warn_out_dtype(config)

    source_folder: Path | None = None
    if is_peft_model(finetuned):
        # NOTE: the copy keeps a second full model in memory; pass an adapter folder to avoid it.
        model = copy.deepcopy(finetuned)
        adapter_ref: Any = finetuned
        base_ref: Any = finetuned.get_base_model()
    else:
        model, adapter_dir, base_ref = load_peft_model(
            finetuned,
            base_model,
            revision=revision,
            base_revision=base_revision,
            token=token,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
        adapter_ref = adapter_dir
        source_folder = adapter_dir

    base_names = _in_base_checkpoint(model.get_base_model(), _saved_tensor_names(model, list(model.peft_config)))
    if merge:
        result, record = merge_scaled(model, config, adapter_names=adapter_names, base_tensor_names=base_names)
    else:
        record = scale_peft_model(model, config, adapter_names=adapter_names, base_tensor_names=base_names)
        result = model

    from .editor import describe_input, python_call

    record["inputs"] = {
        "base_model": describe_input(base_ref, base_revision),
        "finetuned": [describe_input(adapter_ref, revision)],
    }
    command = python_call("from_pretrained", adapter_ref, base_ref, config)
    if merge:
        command = command.removesuffix(")") + ", merge=True)"
    if adapter_names is not None:
        command = command.removesuffix(")") + f", adapter_names={list(adapter_names)!r})"
    record["command"] = command
    result.lines_config = config
    result.lines_record = record
    # LiNeSEditor.save_pretrained copies tokenizer files and the card from here.
    result.lines_source_folder = source_folder
    return result


def _warn_out_dtype(config: LiNeSConfig) -> None:
    if config.out_dtype is not None:
        LOG.warning("out_dtype=%s is ignored for LoRA adapters: every tensor keeps its dtype", config.out_dtype)


# --------------------------------------------------------------------------- saving


def write_record_files(folder: str | os.PathLike, config: LiNeSConfig, record: dict[str, Any]) -> None:
    """Write ``lines_config.json`` and the model card for an edited model already saved in ``folder``.

    The existing ``README.md`` (PEFT's adapter card, for instance) is passed to
    the card writer as the fine-tune's card.
    """
    from .card import write_model_card

    config.save_pretrained(folder, resolved=record)
    readme = Path(folder) / "README.md"
    previous = readme.read_text(encoding="utf-8") if readme.is_file() else None
    write_model_card(folder, config, record, finetuned_card=previous)


# --------------------------------------------------------------------------- adapter folders, no base model


@dataclass
class AdapterFolder:
    """An adapter folder read from disk: its tensors, its plan and where its base model is."""

    adapter_dir: Path
    base_dir: Path
    adapter_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    full_tensors: dict[str, str]  # adapter key -> name in the base model
    plan: AdapterPlan


def read_adapter_folder(
    adapter: str | os.PathLike,
    config: LiNeSConfig,
    *,
    base: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
) -> AdapterFolder:
    """Read a LoRA adapter folder and plan its edit, reading only ``config.json`` of the base.

    Raises:
        UnsupportedAdapterError: for non-LoRA adapters, DoRA or trainable tokens.
        CheckpointNotFoundError: if the adapter, its weights or the base's config cannot be found.
        UnsafeCheckpointError: for a pickled adapter without ``allow_pickle``.
    """
    adapter_dir = resolve_model_dir(adapter, revision=revision, token=token)
    adapter_config = read_adapter_config(adapter_dir)
    check_adapter_config(adapter_config, os.fspath(adapter), merge=False)
    base_dir = resolve_base_path(adapter_dir, base, adapter_config, revision=base_revision, token=token)
    base_config = read_config(base_dir)
    if base_config is None:
        raise CheckpointNotFoundError(f"the base model folder {os.fspath(base_dir)!r} has no config.json")
    check_adapter_fits_base(adapter_dir, base_dir, allow_pickle=allow_pickle)

    if (adapter_dir / ADAPTER_WEIGHTS_NAME).is_file():
        source = FolderSource(adapter_dir, weights_name=ADAPTER_WEIGHTS_NAME)
        tensors = {spec.name: source.read(spec.name) for spec in source.specs()}
        source.close()
    elif (adapter_dir / ADAPTER_PICKLE_NAME).is_file():
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{adapter_dir} contains only a pickled adapter ({ADAPTER_PICKLE_NAME}); pass allow_pickle=True "
                "(--allow-pickle) to load it with torch.load(weights_only=True)"
            )
        tensors = load_pickle_safely(adapter_dir / ADAPTER_PICKLE_NAME)
    else:
        raise CheckpointNotFoundError(f"no adapter weights in {adapter_dir}: expected {ADAPTER_WEIGHTS_NAME}")

    lora_modules, full_tensors = [], {}
    for key in tensors:
        match = _LORA_KEY.match(key)
        if match is None:
            # A full tensor; an embedding layer saved with its LoRA is stored as ``<module>.base_layer.weight``.
            full_tensors[key] = strip_peft_prefix(key).replace(".base_layer.", ".")
            continue
        if match.group("part") == "lora_magnitude_vector":
            check_adapter_config({**adapter_config, "use_dora": True}, os.fspath(adapter), merge=False)
        lora_modules.append(strip_peft_prefix(match.group("module")))

    plan = plan_adapter(lora_modules, full_tensors.values(), base_config, config)
    return AdapterFolder(adapter_dir, base_dir, adapter_config, tensors, full_tensors, plan)


def edit_adapter_folder(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    config: LiNeSConfig,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Write a LiNeS-scaled copy of a LoRA adapter folder without loading the base model.

    Reads the adapter's tensors, the base's ``config.json`` (for depths) and only
    the base tensors that the adapter stores in full (``modules_to_save`` heads,
    saved embedding layers). LoRA factors ``lora_B`` / ``lora_embedding_B`` are
    scaled; full tensors become ``base + scale * (adapter - base)``, or are copied
    when the base lacks them. Returns the record also stored in ``lines_config.json``.

    Raises:
        UnsupportedAdapterError: for non-LoRA adapters, DoRA or trainable tokens.
        CheckpointNotFoundError: if the adapter, its weights or the base cannot be found.
        TensorMismatchError: if a full tensor's shape differs from the base's.
        OutputPathError: see ``atomic_output_dir``.
    """
    from safetensors.torch import save_file

    _warn_out_dtype(config)
    folder = read_adapter_folder(
        adapter, config, base=base, allow_pickle=allow_pickle, revision=revision, base_revision=base_revision, token=token
    )
    plan = folder.plan
    record = _new_record("adapter", "peft", plan, [], merged=False)
    edited = _edit_folder_tensors(folder, allow_pickle, record)

    record["inputs"] = {
        "base_model": {"path": os.fspath(folder.base_dir), "hub_id": None, "revision": base_revision},
        "finetuned": [{"path": os.fspath(folder.adapter_dir), "hub_id": None, "revision": revision}],
    }
    record["command"] = command or (
        f"lines-hf edit --base {os.fspath(folder.base_dir)} --adapter {os.fspath(folder.adapter_dir)} "
        f"--alpha {plan.alpha} --beta {plan.beta} --output {os.fspath(output)}"
    )

    with atomic_output_dir(output, [folder.adapter_dir], overwrite=overwrite) as temp:
        save_file({k: v.contiguous() for k, v in edited.items()}, temp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        copy_non_weight_files(folder.adapter_dir, temp)
        (temp / ADAPTER_CONFIG_NAME).write_bytes((folder.adapter_dir / ADAPTER_CONFIG_NAME).read_bytes())
        write_record_files(temp, config, record)
    _log_plan(plan, [os.fspath(folder.adapter_dir)], merged=False)
    return record


def _edit_folder_tensors(folder: AdapterFolder, allow_pickle: bool, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return the adapter's tensors with ``lora_B`` scaled and full tensors moved toward the base."""
    plan = folder.plan
    base_source = FolderSource(folder.base_dir, allow_pickle=allow_pickle) if folder.full_tensors else None
    base_names = [spec.name for spec in base_source.specs()] if base_source is not None else []
    full_map = align_names(list(folder.full_tensors.values()), base_names) if folder.full_tensors else {}

    edited: dict[str, torch.Tensor] = {}
    for key, tensor in folder.tensors.items():
        match = _LORA_KEY.match(key)
        if match is not None:
            item = plan.lora[strip_peft_prefix(match.group("module"))]
            edited[key] = scale_tensor(tensor, item.scale) if match.group("part") in _SCALED_PARTS else tensor
            continue
        name = folder.full_tensors[key]
        base_name = full_map.get(name)
        if base_name is None or not tensor.is_floating_point():
            record["copied_from_finetuned_not_in_base"].append(name)
            edited[key] = tensor
            continue
        assert base_source is not None
        original = base_source.read(base_name)
        if original.shape != tensor.shape:
            raise TensorMismatchError(
                f"adapter tensor {key!r} has shape {list(tensor.shape)} but base tensor {base_name!r} has "
                f"{list(original.shape)}: check that the adapter was trained on this base model"
            )
        edited[key] = apply_scale(original, tensor, plan.full[name].scale, tensor.dtype, name=name)
    if base_source is not None:
        base_source.close()
    return edited


# --------------------------------------------------------------------------- command line


def print_adapter_plan(plan: AdapterPlan, stream: Any = None) -> None:
    """Print each LoRA module's and full tensor's stack, block and scale, then per-stack scales."""
    import sys

    stream = stream or sys.stdout
    rows = [("module or tensor", "stack", "block", "scale")]
    for item in list(plan.lora.values()) + list(plan.full.values()):
        block = "-" if item.block is None else str(item.block)
        rows.append((item.module, item.stack or "-", block, f"{item.scale:.6g} ({item.reason})"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=stream)
    print(file=stream)
    print(f"alpha = {plan.alpha:g}, beta = {plan.beta:g}, outside blocks = {plan.non_block_scale:g}", file=stream)
    for name, info in plan.summary()["stacks"].items():
        shown = ", ".join(f"{s:.4g}" for s in info["scales"])
        print(f"stack {name}: {info['depth']} blocks ({info['depth_source']}); scales {shown}", file=stream)


def run_cli(args: Any, config: LiNeSConfig, command: str) -> int:
    """Run ``lines-hf edit --adapter DIR``: scale the adapter, or merge it with ``--merge``.

    Adapter mode reads the adapter, the base's config and only the base tensors
    that ``modules_to_save`` replaces; ``--merge`` loads the base model.
    """
    if args.dry_run:
        folder = read_adapter_folder(
            args.adapter,
            config,
            base=args.base,
            allow_pickle=args.allow_pickle,
            revision=args.revision,
            base_revision=args.base_revision,
            token=args.token,
        )
        print_adapter_plan(folder.plan)
        return 0

    if args.merge:
        from .editor import LiNeSEditor

        model = edit_adapter(
            args.adapter,
            base_model=args.base,
            config=config,
            merge=True,
            revision=args.revision,
            base_revision=args.base_revision,
            token=args.token,
            trust_remote_code=args.trust_remote_code,
        )
        model.lines_record["command"] = command
        LiNeSEditor.save_pretrained(model, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
        print(f"Saved the base model with the LiNeS-scaled adapter merged in to {args.output}")
        return 0

    edit_adapter_folder(
        args.adapter,
        args.output,
        config,
        base=args.base,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        command=command,
    )
    print(f"Saved the LiNeS-scaled adapter to {args.output}")
    return 0
