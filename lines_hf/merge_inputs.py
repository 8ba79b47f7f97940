"""Merge inputs: each fine-tune's tensors aligned with the base model, from a full model folder or a LoRA adapter.

A LoRA adapter is read through ``LoraSource``, which presents it as a full model, and ``LoraInput``, whose task vector is ``scaling * B @ A``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import FolderSource, TensorSource
from .engine import read_into
from .errors import ArchitectureMismatchError, CheckpointNotFoundError, UnsupportedAdapterError
from .layers import align_names
from .plan import TensorSpec
from .task_vector import Workspace

# Workspace buffer that MergeInput.task_vector_flat reads the fine-tune into.
_TUNED_READ = 1


@dataclass
class MergeInput:
    """One fine-tune to merge: its tensors and how they map onto the base model's names.

    ``name_map`` maps each base tensor name to this input's name for it;
    ``heads`` lists this input's tensors that the base lacks.
    """

    label: str
    source: TensorSource
    name_map: dict[str, str]
    heads: list[str] = field(default_factory=list)

    def task_vector_flat(
        self,
        base_name: str,
        base_chunk: torch.Tensor,
        start: int,
        count: int,
        out: torch.Tensor,
        *,
        workspace: Workspace | None = None,
    ) -> None:
        """Write the float32 task vector of flat elements ``start .. start+count`` of ``base_name`` into ``out``.

        With a ``workspace``, the fine-tuned chunk is read into its buffer 1.
        """
        name = self.name_map[base_name]
        if workspace is None:
            tuned = self.source.read_flat(name, start, count)
        else:
            tuned = read_into(self.source, name, start, count, workspace, _TUNED_READ)
        # Converting first and subtracting in float32 is several times faster
        # in torch on CPU than one mixed-dtype subtraction.
        out.copy_(tuned).sub_(base_chunk)

    @property
    def location(self) -> str:
        return getattr(self.source, "location", self.label)


def open_inputs(
    base: TensorSource, sources: Sequence[TensorSource], labels: Sequence[str] | None = None
) -> list[MergeInput]:
    """Align every fine-tune's tensor names with the base and wrap them as ``MergeInput``s."""
    base_names = [spec.name for spec in base.specs()]
    inputs = []
    for index, source in enumerate(sources):
        label = labels[index] if labels else Path(getattr(source, "location", f"model-{index}")).name
        if isinstance(source, LoraSource):
            inputs.append(LoraInput(label, source))
            continue
        names = [spec.name for spec in source.specs()]
        mapping = align_names(names, base_names)
        name_map = {base_name: own for own, base_name in mapping.items() if base_name is not None}
        heads = [own for own, base_name in mapping.items() if base_name is None]
        inputs.append(MergeInput(label=label, source=source, name_map=name_map, heads=heads))
    return inputs


class LoraSource(TensorSource):
    """A LoRA adapter folder seen as a full model: base tensors plus the adapter's deltas.

    ``specs`` lists the base model's tensors and the adapter's full tensors
    that the base lacks (heads kept in ``modules_to_save``). ``read_flat`` of a
    base tensor returns ``base + delta`` in the base dtype; merges read the
    delta itself through ``LoraInput.task_vector_flat``.
    """

    def __init__(self, folder: str | os.PathLike, base: TensorSource) -> None:
        from .adapters import check_adapter_config, read_adapter_config, strip_peft_prefix

        self.folder = Path(folder)
        self.location = str(self.folder)
        self.base = base
        self.config = base.config
        adapter_config = read_adapter_config(self.folder)
        check_adapter_config(adapter_config, self.folder.name, merge=False)
        if adapter_config.get("use_dora"):
            raise UnsupportedAdapterError(
                f"adapter {self.folder.name!r} uses DoRA, whose delta is not scaling * B @ A: merge it into its "
                "base first (merge_and_unload), save the full model and merge that folder"
            )
        self.fan_in_fan_out = bool(adapter_config.get("fan_in_fan_out"))
        self.use_rslora = bool(adapter_config.get("use_rslora"))
        self.lora_alpha = float(adapter_config.get("lora_alpha", 8))
        self.alpha_pattern = dict(adapter_config.get("alpha_pattern") or {})
        self._weights = FolderSource(self.folder, weights_name=_adapter_weights_name(self.folder))

        base_names = {spec.name for spec in base.specs()}
        factors: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        for spec in self._weights.specs():
            name = strip_peft_prefix(spec.name)
            match = re.match(r"^(.*)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$", name)
            if match:
                factors.setdefault(match.group(1), {})[match.group(2)] = spec.name
            elif ".lora_" in name:
                raise UnsupportedAdapterError(f"adapter tensor {spec.name!r} is not a LoRA factor that lines_hf knows")
            else:
                full[name] = spec.name

        # Adapter names follow the task model (``bert.encoder...``); align them
        # with the base's names as a fine-tune's names are aligned.
        targets = [f"{module}.weight" for module in factors] + [f"{module}.bias" for module, f in factors.items() if "lora_B.bias" in f]
        mapping = align_names(targets + list(full), base_names)
        self.deltas: dict[str, tuple[str, dict[str, str]]] = {}
        for module, parts in factors.items():
            for kind in ("weight", "bias"):
                if kind == "bias" and "lora_B.bias" not in parts:
                    continue
                base_name = mapping.get(f"{module}.{kind}")
                if base_name is None:
                    raise ArchitectureMismatchError(
                        f"adapter {self.folder.name!r} adapts module {module!r}, which the base model lacks: "
                        "pass the base model the adapter was trained on"
                    )
                self.deltas[base_name] = (kind, {**parts, "module": module})
        self.full = {mapping[name]: stored for name, stored in full.items() if mapping.get(name) is not None}
        self.heads = {name: stored for name, stored in full.items() if mapping.get(name) is None}

    def specs(self) -> list[TensorSpec]:
        heads = {name: spec for spec in self._weights.specs() for name in self.heads if self.heads[name] == spec.name}
        result = list(self.base.specs())
        result += [TensorSpec(name, spec.dtype, spec.shape) for name, spec in heads.items()]
        return result

    def scaling(self, module: str, rank: int) -> float:
        """Return ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) of ``module``, honouring ``alpha_pattern``."""
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def delta_flat(self, base_name: str, shape: Sequence[int], start: int, count: int) -> torch.Tensor:
        """Return the float32 delta of flat elements ``start .. start+count`` of ``base_name`` (zeros if untouched)."""
        if base_name in self.full:
            tuned = self._weights.read_flat(self.full[base_name], start, count).to(torch.float32)
            return tuned - self.base.read_flat(base_name, start, count).to(torch.float32)
        if base_name not in self.deltas:
            return torch.zeros(count, dtype=torch.float32)
        kind, parts = self.deltas[base_name]
        embedding = "lora_embedding_A" in parts
        a = self._weights.read(parts["lora_embedding_A" if embedding else "lora_A.weight"]).to(torch.float32)
        scale = self.scaling(parts["module"], a.shape[0])
        if kind == "bias":
            bias = self._weights.read(parts["lora_B.bias"]).to(torch.float32)
            return (bias * scale)[start : start + count]
        b = self._weights.read(parts["lora_embedding_B" if embedding else "lora_B.weight"]).to(torch.float32)
        if len(shape) != 2:
            raise UnsupportedAdapterError(
                f"LoRA on tensor {base_name!r} of shape {list(shape)}: only 2-D weights (linear, embedding) are supported"
            )
        columns = shape[1]
        first_row, end_row = start // columns, -(-(start + count) // columns)
        # The delta is computed as the product B @ A, never from the factors
        # separately; only the rows that the chunk covers are formed.
        if embedding or self.fan_in_fan_out:
            rows = (b @ a[:, first_row:end_row]).T
        else:
            rows = b[first_row:end_row] @ a
        offset = start - first_row * columns
        return rows.reshape(-1)[offset : offset + count] * scale

    def read(self, name: str) -> torch.Tensor:
        if name in self.heads:
            return self._weights.read(self.heads[name])
        spec = next(s for s in self.base.specs() if s.name == name)
        return self.read_flat(name, 0, spec.numel).reshape(spec.shape)

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        if name in self.heads:
            return self._weights.read_flat(self.heads[name], start, count)
        base_chunk = self.base.read_flat(name, start, count)
        if not base_chunk.is_floating_point():
            return base_chunk
        shape = next(s.shape for s in self.base.specs() if s.name == name)
        delta = self.delta_flat(name, shape, start, count)
        return (base_chunk.to(torch.float32) + delta).to(base_chunk.dtype)

    def close(self) -> None:
        self._weights.close()


class LoraInput(MergeInput):
    """A LoRA adapter as a merge input: its task vector is ``scaling * B @ A`` per adapted weight."""

    def __init__(self, label: str, source: LoraSource) -> None:
        base_specs = source.base.specs()
        super().__init__(
            label=label,
            source=source,
            name_map={spec.name: spec.name for spec in base_specs},
            heads=list(source.heads),
        )
        self._shapes = {spec.name: spec.shape for spec in base_specs}

    def task_vector_flat(
        self,
        base_name: str,
        base_chunk: torch.Tensor,
        start: int,
        count: int,
        out: torch.Tensor,
        *,
        workspace: Workspace | None = None,
    ) -> None:
        assert isinstance(self.source, LoraSource)
        out.copy_(self.source.delta_flat(base_name, self._shapes[base_name], start, count))


def _adapter_weights_name(folder: Path) -> str:
    for name in ("adapter_model.safetensors",):
        if (folder / name).is_file():
            return name
    raise CheckpointNotFoundError(
        f"no adapter_model.safetensors in {folder}: lines_hf merges LoRA adapters saved as safetensors"
    )


def folder_sources(
    folders: Sequence[str | os.PathLike], base: TensorSource, *, allow_pickle: bool = False
) -> list[TensorSource]:
    """Open each folder as a ``FolderSource``, or as a ``LoraSource`` when it contains a LoRA adapter."""
    from .adapters import is_adapter_folder

    return [
        LoraSource(folder, base) if is_adapter_folder(folder) else FolderSource(folder, allow_pickle=allow_pickle)
        for folder in folders
    ]
