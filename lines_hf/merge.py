"""Merging several fine-tunes of one base model, with LiNeS or as a plain baseline.

The merge streams over the inputs chunk by chunk, as ``lines-hf edit`` does, so
memory stays near a few chunks of ``T`` task vectors whatever the model size.
Whole-model statistics take extra reading passes before anything is written:

1. the global top-k thresholds of TIES (two passes of radix selection, exact),
2. the L1 norms behind the automatic alpha (one pass that merges chunk by
   chunk and keeps only two running sums),
3. the writing pass: ``base + scale * tau_merged`` per tensor, where ``scale`` is
   the LiNeS scale of the tensor's block (``alpha + beta * l / (L - 1)``) or, for
   the baseline, one global scale.

Tensors that the base lacks (each task's classification head) have no task
vector and cannot be merged. They are left out of the merged model and, with
``heads="save"``, written per input to ``<output>/heads/<i>-<name>/`` together
with that input's ``config.json``. ``AutoModel`` reads only the weight files at
the top of a folder, so these sub-folders never load by accident;
``load_task_model`` attaches one of them to the merged backbone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import HEAD_POLICIES  # noqa: F401 (re-exported)

from .checkpoint import FolderSource, TensorSource
from .config import LiNeSConfig
from .engine import ChunkProducer, TensorSink, read_into, stream
from .errors import ArchitectureMismatchError, CheckpointNotFoundError, ConfigError
from .layers import compile_layer_pattern, find_block
# LoraInput is not used here; it is imported so that lines_hf.merge.LoraInput still works.
from .merge_inputs import LoraInput, LoraSource, MergeInput, folder_sources, open_inputs
from .merging import (
    GrowingBuffer,
    MergeMethod,
    RadixSelect,
    WindowSelect,
    auto_alpha,
    bracket,
    dare_key,
    dare_uniform,
    kth_smallest_magnitude,
    merge_chunk,
    reference_grid,
    threshold_rank,
)
from .plan import (
    REASON_BLOCK,
    REASON_EXCLUDED,
    REASON_NOT_FLOAT,
    REASON_OUTSIDE,
    EditPlan,
    TensorAction,
    build_plan,
)
from .plan import check_same_architecture
from .task_vector import Workspace, check_finite, scale_delta, torch_dtype

if TYPE_CHECKING:
    from .selection import GridSearchResult

LOG = logging.getLogger(__name__)

# Elements per chunk of a merge. T task vectors of this many float32 entries
# (1 MB each) and the temporaries of the merge stay near the CPU cache, which
# matters more than the number of reads: each step is a cheap pass over memory.
MERGE_CHUNK_ELEMENTS = 256 * 1024

# Per-tensor TIES reads a tensor whole when it has at most this many elements
# (T float32 copies, 256 MB for four tasks); larger tensors stream in chunks.
PER_TENSOR_IN_MEMORY = 16 * 1024 * 1024

# Pass 1 of the global threshold keeps every SAMPLE_STRIDE-th magnitude (16 MB
# per task for a billion parameters), and at most MAX_SAMPLES per task. Pass 2
# keeps the magnitudes inside the bracket when about MAX_WINDOW or fewer are
# expected; otherwise radix selection, whose histograms have a fixed size,
# finds the threshold.
SAMPLE_STRIDE = 256
MAX_SAMPLES = 4 * 1024 * 1024
MAX_WINDOW = 16 * 1024 * 1024

HEADS_DIR = "heads"

# Workspace buffers of Merger._read and the per-tensor threshold
# (MergeInput.task_vector_flat reads into buffer 1).
_BASE_READ = 0
_BASE_WIDE = 2
_BASE_STORED = 5
_TASK_VECTORS = 6
_MAGNITUDES = 7

class Merger:
    """The merged task vector of several fine-tunes, produced chunk by chunk.

    Args:
        base: the base model's tensors.
        inputs: the fine-tunes, aligned to the base (``open_inputs``).
        method: the merge method and its parameters.
        config: LiNeS settings. ``config.alpha=None`` selects the automatic alpha.
        chunk_elements: elements per chunk of every pass.

    Raises:
        ConfigError: if fewer than one input is given.
        ArchitectureMismatchError: if the inputs do not share the base's tensors and shapes.
        and every error of ``build_plan`` on the first input.
    """

    def __init__(
        self,
        base: TensorSource,
        inputs: Sequence[MergeInput],
        method: MergeMethod,
        config: LiNeSConfig,
        *,
        chunk_elements: int = MERGE_CHUNK_ELEMENTS,
    ) -> None:
        if not inputs:
            raise ConfigError("a merge needs at least one fine-tuned model")
        self.base = base
        self.inputs = list(inputs)
        self.method = method
        self.config = config
        self.chunk_elements = int(chunk_elements)

        first = self.inputs[0]
        specs = first.source.specs()
        head_names = set(first.heads)
        # The structure (which tensor lies in which block) does not depend on
        # alpha and beta; scales are recomputed once they are known.
        self.structure = build_plan(
            [s for s in specs if s.name not in head_names],
            base.specs(),
            first.source.config,
            config,
            alpha=1.0,
            beta=0.0,
            name_map={own: base_name for base_name, own in first.name_map.items()},
        )
        self._check_inputs()
        # Tensor names and shapes can agree across architectures (llama and mistral), so the configs are compared too.
        for merge_input in self.inputs:
            check_same_architecture(
                merge_input.source.config,
                base.config,
                f"model {merge_input.label!r} ({merge_input.location})",
                f"the base model ({base.location})",
            )
        self.pool = [a for a in self.structure.actions if a.reason in (REASON_BLOCK, REASON_OUTSIDE)]

        self._thresholds: dict[str, torch.Tensor] = {}
        self._global_thresholds: torch.Tensor | None = None
        self._cache: tuple[str, int, torch.Tensor, torch.Tensor] | None = None
        self._workspace = Workspace()
        self._base_dtypes = {spec.name: spec.dtype for spec in base.specs()}
        self.norms: dict[str, float] | None = None

    # ------------------------------------------------------------------ checks

    def _check_inputs(self) -> None:
        base_specs = {spec.name: spec for spec in self.base.specs()}
        needed = {a.base_name for a in self.structure.actions if a.base_name is not None}
        pattern = compile_layer_pattern(self.config.layer_pattern)
        for merge_input in self.inputs:
            specs = {spec.name: spec for spec in merge_input.source.specs()}
            in_blocks = [name for name in merge_input.heads if find_block(name, pattern) is not None]
            if in_blocks:
                raise ArchitectureMismatchError(
                    f"model {merge_input.label!r} ({merge_input.location}) has tensor(s) inside transformer "
                    f"blocks that the base model lacks: {', '.join(in_blocks[:5])}. Every merged model must be "
                    "a fine-tune of the same base architecture and depth."
                )
            for base_name in sorted(needed):
                own = merge_input.name_map.get(base_name)
                if own is None:
                    raise ArchitectureMismatchError(
                        f"model {merge_input.label!r} ({merge_input.location}) has no tensor for base tensor "
                        f"{base_name!r}, which the first model has. Every merged model must be a fine-tune of "
                        "the same base architecture."
                    )
                if specs[own].shape != base_specs[base_name].shape:
                    raise ArchitectureMismatchError(
                        f"model {merge_input.label!r} ({merge_input.location}): tensor {own!r} has shape "
                        f"{list(specs[own].shape)} but base tensor {base_name!r} has "
                        f"{list(base_specs[base_name].shape)}. Every merged model must be a fine-tune of the "
                        "same base architecture."
                    )
            changed = merge_input.name_map
            if isinstance(merge_input.source, LoraSource):
                changed = {**merge_input.source.deltas, **merge_input.source.full}
            extra = sorted(b for b in changed if b not in needed and base_specs[b].is_float)
            if extra:
                raise ArchitectureMismatchError(
                    f"model {merge_input.label!r} ({merge_input.location}) has base tensor(s) that the first "
                    f"model lacks: {', '.join(extra[:5])}. Every merged model must be a fine-tune of the same "
                    "base architecture."
                )

    # ------------------------------------------------------------------ reading

    def _read(self, action: TensorAction, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the base chunk (stored dtype) and the stacked float32 task vectors ``(T, n)``.

        Both live in workspace buffers that the next read that misses the cache
        overwrites. A read longer than one chunk (a whole tensor for per-tensor
        TIES) is filled one chunk at a time, so each conversion and subtraction
        works on data still in the CPU cache.
        """
        if self._cache is not None and self._cache[0] == action.name:
            _, cached_start, base_chunk, taus = self._cache
            offset = start - cached_start
            if 0 <= offset and offset + count <= base_chunk.numel():
                return base_chunk[offset : offset + count], taus[:, offset : offset + count]
        assert action.base_name is not None
        self._cache = None
        count = max(0, min(count, _numel(action.shape) - start))
        workspace = self._workspace
        base_chunk = workspace.buffer(_BASE_STORED, count, torch_dtype(self._base_dtypes[action.base_name]))
        taus = workspace.buffer(_TASK_VECTORS, len(self.inputs) * count, torch.float32).view(len(self.inputs), count)
        for offset in range(0, count, self.chunk_elements):
            piece = min(self.chunk_elements, count - offset)
            stored = read_into(self.base, action.base_name, start + offset, piece, workspace, _BASE_READ)
            base_chunk[offset : offset + piece].copy_(stored)
            base_wide = workspace.buffer(_BASE_WIDE, piece, torch.float32).copy_(stored)
            for row, merge_input in enumerate(self.inputs):
                merge_input.task_vector_flat(
                    action.base_name, base_wide, start + offset, piece, taus[row, offset : offset + piece],
                    workspace=workspace,
                )
        # A sum is finite only if every entry is (barring overflow), so the
        # full check runs only when the cheap one fails.
        if not self.config.allow_non_finite and not bool(torch.isfinite(taus.sum())):
            check_finite(taus, action.name)
        self._cache = (action.name, start, base_chunk, taus)
        return base_chunk, taus

    def _chunks(self, action: TensorAction):
        numel = _numel(action.shape)
        for start in range(0, numel, self.chunk_elements):
            yield start, min(self.chunk_elements, numel - start)

    # ------------------------------------------------------------------ thresholds

    def _select_thresholds(self, actions: Sequence[TensorAction]) -> torch.Tensor:
        """Return the exact TIES threshold of each task over the flat elements of ``actions``.

        Pass 1 keeps every ``SAMPLE_STRIDE``-th magnitude of each task vector
        and brackets the threshold with it; pass 2 counts the magnitudes below
        the bracket and keeps those inside, which fixes the exact value. If a
        bracket misses (counting shows it), two passes of radix selection over
        the bit patterns find the value instead.
        """
        numel = sum(_numel(a.shape) for a in actions)
        rank = threshold_rank(numel, self.method.density)
        tasks = range(len(self.inputs))
        if rank == 0:
            return torch.zeros(len(self.inputs), dtype=torch.float32)

        # The stride grows with the model so that samples and window stay
        # bounded: memory does not grow with model size.
        stride = max(SAMPLE_STRIDE, -(-numel // MAX_SAMPLES))
        samples = [GrowingBuffer(numel // stride + 1024) for _ in tasks]
        for action in actions:
            for start, count in self._chunks(action):
                _, taus = self._read(action, start, count)
                picked = taus[:, (-start) % stride :: stride].abs()
                for row in tasks:
                    samples[row].append(picked[row])
        windows: list[WindowSelect | None] = []
        for row in tasks:
            sample = samples[row].values()
            low, high = bracket(sample, rank, numel)
            inside = int(torch.count_nonzero((sample >= low) & (sample <= high)))
            expected = inside * numel // max(1, sample.numel())
            windows.append(WindowSelect(low, high, rank) if expected <= MAX_WINDOW else None)
        del samples

        if any(window is not None for window in windows):
            for action in actions:
                for start, count in self._chunks(action):
                    _, taus = self._read(action, start, count)
                    magnitudes = taus.abs()
                    for row, window in enumerate(windows):
                        if window is not None:
                            window.add(magnitudes[row])
        found = [window.threshold() if window is not None else None for window in windows]
        missed = [row for row in tasks if found[row] is None]
        if missed:
            LOG.info("The sampled bracket missed the threshold of %d task(s); using radix selection", len(missed))
            radix = {row: RadixSelect() for row in missed}
            for action in actions:
                for start, count in self._chunks(action):
                    _, taus = self._read(action, start, count)
                    for row in missed:
                        radix[row].add_high(taus[row])
            for row in missed:
                radix[row].finish_high(rank)
            for action in actions:
                for start, count in self._chunks(action):
                    _, taus = self._read(action, start, count)
                    for row in missed:
                        radix[row].add_low(taus[row])
            for row in missed:
                found[row] = radix[row].threshold()
        return torch.tensor(found, dtype=torch.float32)

    def _tensor_thresholds(self, action: TensorAction) -> torch.Tensor:
        if action.name in self._thresholds:
            return self._thresholds[action.name]
        numel = _numel(action.shape)
        if numel <= PER_TENSOR_IN_MEMORY:
            # Read the whole tensor once; the chunks that follow are sliced
            # from this cached read instead of being read again.
            _, taus = self._read(action, 0, numel)
            rank = threshold_rank(numel, self.method.density)
            scratch = self._workspace.buffer(_MAGNITUDES, numel, torch.float32)
            values = [kth_smallest_magnitude(taus[row], rank, scratch=scratch) for row in range(taus.shape[0])]
            result = torch.tensor(values, dtype=torch.float32)
        else:
            result = self._select_thresholds([action])
        self._thresholds[action.name] = result
        return result

    def thresholds(self, action: TensorAction) -> torch.Tensor | None:
        """Return the TIES thresholds ``(T,)`` that apply to ``action``, or None for other methods."""
        if not self.method.trims_top_k:
            return None
        if self.method.ties_trim == "per_tensor":
            return self._tensor_thresholds(action)
        if self._global_thresholds is None:
            LOG.info("Selecting the global top-%g threshold of each task vector (two passes)", self.method.density)
            self._global_thresholds = self._select_thresholds(self.pool)
        return self._global_thresholds

    # ------------------------------------------------------------------ merged chunks

    def merged_flat(self, action: TensorAction, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the base chunk and the merged float32 task vector of one chunk of a pool tensor."""
        thresholds = self.thresholds(action)
        base_chunk, taus = self._read(action, start, count)
        uniforms = None
        if self.method.uses_dare:
            assert action.base_name is not None
            uniforms = torch.stack(
                [dare_uniform(dare_key(self.method.seed, action.base_name, row), start, count) for row in range(len(self.inputs))]
            )
        return base_chunk, merge_chunk(self.method, taus, thresholds=thresholds, uniforms=uniforms)

    def compute_norms(self) -> dict[str, float]:
        """Return ``||sum_t tau_t||_1`` and ``||tau_merged||_1`` over the pool (one reading pass)."""
        if self.norms is not None:
            return self.norms
        LOG.info("Computing the L1 norms of the %s merge for the automatic alpha", self.method.name)
        if self.method.trims_top_k and self.method.ties_trim == "global":
            self.thresholds(self.pool[0])
        sum_l1 = 0.0
        merged_l1 = 0.0
        for action in self.pool:
            for start, count in self._chunks(action):
                _, merged = self.merged_flat(action, start, count)
                _, taus = self._read(action, start, count)
                sum_l1 += float(taus.sum(dim=0).abs().sum(dtype=torch.float64))
                merged_l1 += float(merged.abs().sum(dtype=torch.float64))
        self.norms = {"sum_l1": sum_l1, "merged_l1": merged_l1}
        return self.norms

    def auto_alpha(self) -> float:
        """Return the automatic alpha ``||sum_t tau_t||_1 / (T * ||tau_merged||_1)``.

        For task arithmetic ``tau_merged`` is the sum itself, so the ratio is
        exactly ``1 / T`` and no pass is needed.
        """
        if self.method.name == "task_arithmetic":
            return 1.0 / len(self.inputs)
        norms = self.compute_norms()
        return auto_alpha(norms["sum_l1"], norms["merged_l1"], len(self.inputs))

    # ------------------------------------------------------------------ output

    def scaled_plan(self, alpha: float, beta: float, *, lines: bool = True) -> EditPlan:
        """Return the output plan with the scales of LiNeS(alpha, beta), or one global scale ``alpha``.

        The plan holds every tensor of the merged model (heads that the base
        lacks are left out). Pool tensors get their scale; excluded tensors and
        non-floating-point tensors keep ``scale=None`` and their reason.
        """
        config = self.config
        if not lines:
            config = LiNeSConfig(**{**config.to_dict(), "alpha": None, "beta": None, "gamma": None, "non_block_scale": "alpha"})
            beta = 0.0
        first = self.inputs[0]
        head_names = set(first.heads)
        return build_plan(
            [s for s in first.source.specs() if s.name not in head_names],
            self.base.specs(),
            first.source.config,
            config,
            alpha=alpha,
            beta=beta,
            name_map={own: base_name for base_name, own in first.name_map.items()},
        )

    def producer(self, plan: EditPlan) -> ChunkProducer:
        """Return the chunk producer of the merged model under ``plan``'s scales."""

        def produce(action: TensorAction, start: int, count: int) -> torch.Tensor:
            out_dtype = torch_dtype(action.out_dtype)
            if action.reason in (REASON_BLOCK, REASON_OUTSIDE):
                assert action.scale is not None
                base_chunk, merged = self.merged_flat(action, start, count)
                return scale_delta(merged, base_chunk, action.scale, out_dtype)
            if action.reason == REASON_EXCLUDED:
                # A merge has no single fine-tune to keep, so an excluded tensor
                # gets the plain mean of the fine-tuned tensors.
                base_chunk, taus = self._read(action, start, count)
                return scale_delta(taus.mean(dim=0), base_chunk, 1.0, out_dtype)
            if action.reason == REASON_NOT_FLOAT:
                return self.inputs[0].source.read_flat(action.name, start, count).to(out_dtype)
            raise AssertionError(f"tensor {action.name!r} has reason {action.reason!r}, which a merge never plans")

        return produce

    def run(self, plan: EditPlan, sink: TensorSink, *, progress: bool = False, description: str = "LiNeS merge") -> None:
        """Stream every tensor of ``plan`` (in its order) into ``sink``."""
        stream(plan.actions, self.producer(plan), sink, chunk_elements=self.chunk_elements, progress=progress, description=description)

    def merged_task_vectors(self) -> dict[str, torch.Tensor]:
        """Return ``tau_merged`` of every pool tensor as whole float32 tensors (in memory).

        Used to try many scales on a small model without re-merging: the merged
        task vector does not depend on alpha or beta.
        """
        result = {}
        for action in self.pool:
            flat = torch.empty(_numel(action.shape), dtype=torch.float32)
            for start, count in self._chunks(action):
                _, merged = self.merged_flat(action, start, count)
                flat[start : start + count] = merged
            result[action.name] = flat.reshape(action.shape)
        return result


# --------------------------------------------------------------------------- choosing a scale


def normalized_accuracy(accuracies: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, float]:
    """Return each task's accuracy divided by its fine-tuned accuracy.

    Raises:
        ConfigError: if a task has no fine-tuned accuracy or it is not positive.
    """
    result = {}
    for task, value in accuracies.items():
        reference = finetuned.get(task)
        if reference is None or not reference > 0:
            raise ConfigError(
                f"task {task!r} needs a positive fine-tuned accuracy to normalise by, got {reference!r}: "
                "pass finetuned_accuracy with one entry per task that evaluate returns"
            )
        result[task] = float(value) / float(reference)
    return result


def normalized_criterion(finetuned_accuracy: Mapping[str, float]) -> Callable[[Mapping[str, float]], float]:
    """Return the selection criterion of a merge: the mean over tasks of accuracy / fine-tuned accuracy."""

    def criterion(accuracies: Mapping[str, float]) -> float:
        normalised = normalized_accuracy(accuracies, finetuned_accuracy)
        if not normalised:
            raise ConfigError("the evaluation function returned no task accuracies")
        return sum(normalised.values()) / len(normalised)

    return criterion


def choose_scale(
    merger: Merger,
    evaluate: Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]],
    finetuned_accuracy: Mapping[str, float],
    *,
    lines: bool = True,
    alpha: float | None = None,
    grid: Sequence[float] | None = None,
    progress: bool = False,
) -> "GridSearchResult":
    """Choose beta (LiNeS) or the global scale (baseline) by mean normalised validation accuracy.

    The merged task vector is computed once and held in memory (float32, four
    bytes per parameter); each grid value only rescales it.

    Args:
        merger: the merge.
        evaluate: called with the merged state dict (output names to tensors,
            heads excluded) and returns each task's validation accuracy.
        finetuned_accuracy: each task's accuracy with its own fine-tune.
        lines: search beta with LiNeS (alpha fixed) or the baseline's scale.
        alpha: LiNeS's alpha; None computes the automatic alpha.
        grid: the values to try; default the method's reference grid.

    Returns:
        ``selection.GridSearchResult`` over the grid; ``best_value`` is the choice.
    """
    from .engine import DictSink
    from .selection import grid_search

    values = reference_grid(merger.method.name, grid)
    if lines and alpha is None:
        alpha = merger.auto_alpha()
    merged = merger.merged_task_vectors()

    def evaluate_value(value: float) -> Mapping[str, float]:
        plan = merger.scaled_plan(alpha, value, lines=True) if lines else merger.scaled_plan(value, 0.0, lines=False)
        sink = DictSink(plan.actions)
        stream(plan.actions, _cached_producer(merger, plan, merged), sink, progress=False)
        return evaluate(sink.tensors)

    return grid_search(
        values,
        evaluate_value,
        normalized_criterion(finetuned_accuracy),
        parameter="beta" if lines else "scale",
        progress=progress,
    )


def _cached_producer(merger: Merger, plan: EditPlan, merged: Mapping[str, torch.Tensor]) -> ChunkProducer:
    fallback = merger.producer(plan)

    def produce(action: TensorAction, start: int, count: int) -> torch.Tensor:
        if action.name not in merged or action.scale is None:
            return fallback(action, start, count)
        assert action.base_name is not None
        base_chunk = merger.base.read_flat(action.base_name, start, count)
        delta = merged[action.name].reshape(-1)[start : start + count]
        return scale_delta(delta, base_chunk, action.scale, torch_dtype(action.out_dtype))

    return produce


# --------------------------------------------------------------------------- helpers


def resolve_method(method: str | MergeMethod, **params: Any) -> MergeMethod:
    """Return a ``MergeMethod`` from a name and parameters, or the given one."""
    if isinstance(method, MergeMethod):
        if params:
            raise ConfigError("pass method parameters either inside the MergeMethod or as keywords, not both")
        return method
    return MergeMethod(name=method, **{k: v for k, v in params.items() if v is not None})


def warn_about_inputs(keys: Sequence[Any], names: Sequence[str], base: tuple[Any, str] | None = None) -> None:
    """Warn when a merge has one input, the same input twice (equal ``keys``) or the base ``(key, name)`` as an input."""
    if base is not None:
        for key, name in zip(keys, names):
            if key == base[0]:
                LOG.warning(
                    "%s is the base model (%s): its task vector is zero, so it only dilutes the merge "
                    "(the automatic alpha divides by the number of models). Leave it out of the models to merge.",
                    name,
                    base[1],
                )
    if len(keys) == 1:
        LOG.warning(
            "Merging a single model (%s). This is a LiNeS edit of that model; `lines-hf edit` "
            "(LiNeSEditor.from_pretrained) does it with alpha and beta given directly.",
            names[0],
        )
    first: dict[Any, str] = {}
    for key, name in zip(keys, names):
        if key in first:
            LOG.warning(
                "%s is given twice (also as %s), so its task vector counts twice in the merge. "
                "Pass each fine-tune once unless that weighting is intended.",
                name,
                first[key],
            )
        else:
            first[key] = name


def merge_record(
    merger: Merger,
    plan: EditPlan,
    *,
    lines: bool,
    alpha_auto: bool,
    selection: "GridSearchResult | None",
    base: dict[str, Any],
    finetuned: list[dict[str, Any]],
    command: str,
    heads: Mapping[str, Any],
) -> dict[str, Any]:
    """Build the record that ``lines_config.json`` and the model card store for a merge."""
    summary = plan.summary()
    summary["copied_from_finetuned_not_in_base"] = []
    merge_info: dict[str, Any] = {
        "method": merger.method.name,
        "params": merger.method.params(),
        "lines": lines,
        "alpha_auto": alpha_auto,
        "num_models": len(merger.inputs),
        "models": [i.label for i in merger.inputs],
        "heads": dict(heads),
    }
    if not lines:
        merge_info["scale"] = plan.alpha
    if merger.norms is not None:
        merge_info["l1_norms"] = dict(merger.norms)
    if selection is not None:
        merge_info["selection"] = {
            "parameter": selection.parameter,
            "chosen": selection.best_value,
            "criterion": "mean normalised validation accuracy",
            "points": {str(p.value): p.criterion for p in selection.points},
        }
    return {
        "kind": "merge",
        "library_name": "transformers",
        "inputs": {"base_model": base, "finetuned": finetuned},
        "command": command,
        **summary,
        "out_dtype": merger.config.out_dtype,
        "merge": merge_info,
    }


def head_folder_name(index: int, label: str) -> str:
    """Return the folder name of input ``index``'s head: ``<index>-<label>`` with unsafe characters replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    return f"{index}-{safe}"


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1



# --------------------------------------------------------------------------- folders and models


@dataclass
class MergeSettings:
    """Scaling of the merged task vector into a model.

    ``lines=True`` applies LiNeS with ``alpha`` (None: automatic) and ``beta``;
    ``lines=False`` is the plain baseline ``base + scale * tau_merged``.
    """

    lines: bool = True
    alpha: float | None = None
    beta: float | None = None
    scale: float | None = None

    def resolve(self, merger: Merger) -> tuple[float, float, bool]:
        """Return ``(alpha, beta, alpha_auto)`` for the plan; the baseline returns ``(scale, 0, False)``.

        Raises:
            ConfigError: if beta (LiNeS) or scale (baseline) is missing.
        """
        if not self.lines:
            if self.scale is None:
                raise ConfigError(
                    "the baseline merge (lines=False, --no-lines) needs a global scale: pass scale (--scale), "
                    "or an evaluation to choose it on validation data"
                )
            return float(self.scale), 0.0, False
        if self.beta is None:
            raise ConfigError(
                "a LiNeS merge needs beta: pass beta (--beta), or an evaluation to choose it on validation data"
            )
        if self.alpha is None:
            return merger.auto_alpha(), float(self.beta), True
        return float(self.alpha), float(self.beta), False


def fill_model(merger: Merger, plan: EditPlan, targets: Mapping[str, torch.Tensor]) -> None:
    """Write the merged tensors of ``plan`` into ``targets`` (a model's state dict) in place."""
    from .engine import MemorySink

    merger.run(plan, MemorySink(targets))


def save_heads(
    inputs: Sequence[MergeInput], folder: Path, config_files: Sequence[Path | None]
) -> dict[str, str]:
    """Write each input's tensors that the base lacks to ``folder/heads/<i>-<label>/``.

    Each head folder gets ``model.safetensors`` and, when known, that input's
    ``config.json``. Returns ``{label: relative folder}`` of the heads written.
    """
    import shutil

    from safetensors.torch import save_file

    written = {}
    for index, merge_input in enumerate(inputs):
        if not merge_input.heads:
            continue
        name = head_folder_name(index, merge_input.label)
        target = folder / HEADS_DIR / name
        target.mkdir(parents=True, exist_ok=True)
        tensors = {head: merge_input.source.read(head).contiguous() for head in merge_input.heads}
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        if index < len(config_files) and config_files[index] is not None:
            shutil.copyfile(config_files[index], target / "config.json")
        written[merge_input.label] = f"{HEADS_DIR}/{name}"
    return written


def set_config_architectures(path: Path, architectures: Sequence[str] | None) -> None:
    """Name the base model's classes in a merged ``config.json`` whose task heads were left out.

    The config comes from the first fine-tune, whose ``architectures`` names
    a class with a head (``BertForSequenceClassification``) that the merged
    weights no longer hold. Without base architectures the key is removed.
    """
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if architectures:
        data["architectures"] = list(architectures)
    else:
        data.pop("architectures", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_task_model(merged: str | os.PathLike, head: str | os.PathLike, **kwargs: Any):
    """Load a merged backbone with one task's head saved by a merge.

    Args:
        merged: the merged model folder.
        head: the head folder (``<merged>/heads/<i>-<name>``), which holds the
            task's ``config.json`` and its head tensors.
        kwargs: passed to ``from_pretrained`` (for example ``dtype``).

    Returns:
        The task's model class (from its ``config.json``) with the merged
        backbone and the task's head.

    Raises:
        CheckpointNotFoundError: if the head folder lacks its files.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .editor import _model_class

    head = Path(head)
    if not (head / "config.json").is_file() or not (head / "model.safetensors").is_file():
        raise CheckpointNotFoundError(f"{head} is not a head folder: expected config.json and model.safetensors")
    config = AutoConfig.from_pretrained(head)
    cls = _model_class(config.to_dict())
    model = cls.from_pretrained(merged, config=config, **kwargs)
    state = load_file(str(head / "model.safetensors"))
    current = model.state_dict()
    missing = [name for name in state if name not in current]
    if missing:
        raise CheckpointNotFoundError(
            f"head tensors {', '.join(missing[:5])} of {head} are not parameters of {cls.__name__}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            current[name].copy_(tensor)
    return model.eval()


def merge_folders(
    finetuned: Sequence[str | os.PathLike],
    base_model: str | os.PathLike,
    output: str | os.PathLike,
    config: LiNeSConfig | None = None,
    *,
    method: str | MergeMethod = "task_arithmetic",
    lines: bool = True,
    scale: float | None = None,
    heads: str = "save",
    choose: Callable[[Merger, float | None], "GridSearchResult"] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    chunk_elements: int = MERGE_CHUNK_ELEMENTS,
    command: str | None = None,
    **method_params: Any,
) -> Path:
    """Merge fine-tuned model folders of one base into ``output``, streaming.

    Args:
        finetuned: the fine-tuned model folders (or cached Hub ids), in order.
        base_model: the base model folder.
        output: the output folder; written atomically.
        config: LiNeS settings. ``alpha=None`` (default) is the automatic alpha;
            ``beta`` is required with LiNeS unless ``choose`` picks it.
        method: a method name of ``merging.METHODS`` or a ``MergeMethod``.
        lines: apply LiNeS (default) or the plain baseline with one global ``scale``.
        scale: the baseline's global scale.
        heads: ``save`` writes each input's tensors that the base lacks to
            ``output/heads/<i>-<name>/``; ``drop`` leaves them out.
        choose: called as ``choose(merger, alpha)`` to pick beta (LiNeS) or the
            scale (baseline) on validation data when it is not given.
        method_params: ``density``, ``ties_trim``, ``consensus_lam``,
            ``consensus_k``, ``drop_rate``, ``seed`` for a method given by name.

    Returns:
        The output folder.

    Raises:
        ConfigError: on invalid method parameters or a missing beta/scale.
        ArchitectureMismatchError: if the models do not share one architecture.
        OutputPathError: if ``output`` is an input or exists (without ``overwrite``).
    """
    from .checkpoint import (
        ShardWriter,
        atomic_output_dir,
        check_remote_code,
        copy_non_weight_files,
        resolve_model_dir,
    )
    from .editor import _finish_folder, _read_text, describe_input, set_config_dtype
    from .plan import TensorSpec
    from .plot import PLOT_NAME, ScalePlot

    if heads not in HEAD_POLICIES:
        raise ConfigError(f"heads must be one of {', '.join(HEAD_POLICIES)}, got {heads!r}")
    config = config or LiNeSConfig()
    merge_method = resolve_method(method, **method_params)
    if not finetuned:
        raise ConfigError("a merge needs at least one fine-tuned model folder")

    base_dir = resolve_model_dir(base_model)
    finetuned_dirs = [resolve_model_dir(folder) for folder in finetuned]
    warn_about_inputs(
        [os.path.realpath(d) for d in finetuned_dirs],
        [os.fspath(f) for f in finetuned],
        base=(os.path.realpath(base_dir), os.fspath(base_model)),
    )
    base_source = FolderSource(base_dir, allow_pickle=allow_pickle)
    sources = folder_sources(finetuned_dirs, base_source, allow_pickle=allow_pickle)
    try:
        for folder, source in zip([base_dir, *finetuned_dirs], [base_source, *sources]):
            check_remote_code(source.config, folder, trust_remote_code)
        labels = [Path(os.fspath(f)).name or f"model-{i}" for i, f in enumerate(finetuned)]
        merger = Merger(
            base_source, open_inputs(base_source, sources, labels), merge_method, config, chunk_elements=chunk_elements
        )
        settings = MergeSettings(lines=lines, alpha=config.alpha, beta=config.beta, scale=scale)
        selection = None
        if (lines and settings.beta is None or not lines and scale is None) and choose is not None:
            alpha_for_search = None
            if lines:
                alpha_for_search = merger.auto_alpha() if settings.alpha is None else settings.alpha
            selection = choose(merger, alpha_for_search)
            if lines:
                settings.beta = selection.best_value
            else:
                settings.scale = selection.best_value
        alpha, beta, alpha_auto = settings.resolve(merger)
        plan = merger.scaled_plan(alpha, beta, lines=lines)
        LOG.info(
            "Merging %d models with %s%s: alpha %.6g, beta %.6g",
            len(sources), merge_method.name, " and LiNeS" if lines else " (baseline, one global scale)", alpha, beta,
        )

        full_dirs = [d for d, source in zip(finetuned_dirs, sources) if not isinstance(source, LoraSource)]
        with (
            atomic_output_dir(output, [base_dir, *finetuned_dirs], overwrite=overwrite) as temp,
            ScalePlot(plan.summary(), temp / PLOT_NAME) as plot,
        ):
            # Config and tokenizer come from the first full fine-tune; a merge of
            # adapters only takes them from the base model.
            copy_non_weight_files(full_dirs[0] if full_dirs else base_dir, temp)
            writer = ShardWriter(
                temp, [TensorSpec(a.name, a.out_dtype, a.shape) for a in plan.actions], max_shard_size=max_shard_size
            )
            order = {name: i for i, name in enumerate(writer.order)}
            plan.actions.sort(key=lambda a: order[a.name])
            try:
                merger.run(plan, writer, progress=progress)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            if config.out_dtype is not None:
                set_config_dtype(temp / "config.json", config.out_dtype)
            if any(merge_input.heads for merge_input in merger.inputs):
                set_config_architectures(temp / "config.json", (base_source.config or {}).get("architectures"))
            written_heads: dict[str, str] = {}
            if heads == "save":
                config_files = [d / "config.json" if (d / "config.json").is_file() else None for d in finetuned_dirs]
                written_heads = save_heads(merger.inputs, temp, config_files)
            record_config = LiNeSConfig(**{**config.to_dict(), "alpha": alpha, "beta": beta, "gamma": None})
            record = merge_record(
                merger,
                plan,
                lines=lines,
                alpha_auto=alpha_auto,
                selection=selection,
                base=describe_input(base_model),
                finetuned=[describe_input(f) for f in finetuned],
                command=command or _python_merge_call("merge_folders", finetuned, base_model, merge_method, lines, alpha, beta),
                heads={"policy": heads, "folders": written_heads},
            )
            card_source = full_dirs[0] if full_dirs else base_dir
            _finish_folder(temp, record_config, record, _read_text(card_source / "README.md"), plot=plot)
    finally:
        base_source.close()
        for source in sources:
            source.close()

    LOG.info("Wrote the merged model to %s", output)
    return Path(output)


def _python_merge_call(
    function: str, finetuned: Sequence[Any], base: Any, method: MergeMethod, lines: bool, alpha: float, beta: float
) -> str:
    paths = [os.fspath(f) if isinstance(f, (str, os.PathLike)) else "<model>" for f in finetuned]
    base_path = os.fspath(base) if isinstance(base, (str, os.PathLike)) else "<model>"
    params = ", ".join(f"{k}={v!r}" for k, v in method.params().items())
    scaling = f"alpha={alpha!r}, beta={beta!r}" if lines else f"lines=False, scale={alpha!r}"
    return (
        f"{function}({paths!r}, base_model={base_path!r}, method={method.name!r}"
        + (f", {params}" if params else "")
        + f", {scaling})"
    )


def merge_models(
    finetuned: Sequence[Any],
    base_model: Any,
    method: str | MergeMethod = "task_arithmetic",
    config: LiNeSConfig | None = None,
    *,
    lines: bool = True,
    scale: float | None = None,
    evaluate: Callable[[Any], Mapping[str, float]] | None = None,
    finetuned_accuracy: Mapping[str, float] | None = None,
    grid: Sequence[float] | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    **method_params: Any,
):
    """Merge fine-tunes of one base in memory and return the merged ``PreTrainedModel``.

    Args:
        finetuned: fine-tuned models, each a loaded ``PreTrainedModel``, a model
            folder or a LoRA adapter folder, in order.
        base_model: the base model, loaded or as a folder.
        method, config, lines, scale, method_params: as for ``merge_folders``.
        evaluate: called with the working model after each grid value; returns
            each task's validation accuracy. Used to choose beta (LiNeS) or the
            baseline's scale when that is not given.
        finetuned_accuracy: each task's validation accuracy with its own
            fine-tune, the denominators of the normalised accuracy.
        grid: values to try; default the method's reference grid.

    Returns:
        A model of the first full fine-tune's class (the base's class when every
        input is an adapter). Its backbone is merged; tensors that the base lacks
        keep the first input's values, and every input's such tensors are in
        ``model.lines_heads`` (label to state dict). ``model.lines_config`` and
        ``model.lines_record`` describe the merge.

    Raises:
        ConfigError: if beta (or scale) is missing and no evaluation is given.
        and every error of ``merge_folders``.
    """
    import copy

    from .checkpoint import StateDictSource
    from .editor import _attach, _is_model, _load_folder_model, _model_config_dict, describe_input
    from .engine import MemorySink

    config = config or LiNeSConfig()
    merge_method = resolve_method(method, **method_params)
    if not finetuned:
        raise ConfigError("a merge needs at least one fine-tuned model")
    warn_about_inputs(
        [os.path.realpath(f) if isinstance(f, (str, os.PathLike)) else id(f) for f in finetuned],
        [os.fspath(f) if isinstance(f, (str, os.PathLike)) else f"model {i}" for i, f in enumerate(finetuned)],
    )
    load = dict(revision=None, token=None, cache_dir=None, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    base = base_model if _is_model(base_model) else _load_folder_model(base_model, **load)[0]
    base_source = StateDictSource(base.state_dict(), config=_model_config_dict(base))
    sources: list[TensorSource] = []
    working = None
    labels = []
    for index, item in enumerate(finetuned):
        from .adapters import is_adapter_folder

        if isinstance(item, (str, os.PathLike)) and is_adapter_folder(item):
            sources.append(LoraSource(item, base_source))
            labels.append(Path(os.fspath(item)).name)
            continue
        model = item if _is_model(item) else _load_folder_model(item, **load)[0]
        if working is None:
            working = copy.deepcopy(model)
        sources.append(StateDictSource(model.state_dict(), config=_model_config_dict(model)))
        labels.append(Path(os.fspath(item)).name if isinstance(item, (str, os.PathLike)) else f"model-{index}")
    if working is None:
        working = copy.deepcopy(base)

    merger = Merger(base_source, open_inputs(base_source, sources, labels), merge_method, config)
    if config.out_dtype is not None:
        working.to(torch_dtype(config.out_dtype))
        working.config.dtype = config.out_dtype
    targets = StateDictSource(working.state_dict())._tensors

    settings = MergeSettings(lines=lines, alpha=config.alpha, beta=config.beta, scale=scale)
    selection = None
    missing = settings.beta is None if lines else scale is None
    if missing and evaluate is not None:
        if finetuned_accuracy is None:
            raise ConfigError("choosing beta needs finetuned_accuracy: each task's accuracy with its own fine-tune")

        def evaluate_state(state: Mapping[str, torch.Tensor]) -> Mapping[str, float]:
            with torch.no_grad():
                for name, tensor in state.items():
                    targets[name].copy_(tensor)
            return evaluate(working)

        alpha = None if not lines else settings.alpha
        selection = choose_scale(
            merger, evaluate_state, finetuned_accuracy, lines=lines, alpha=alpha, grid=grid, progress=progress
        )
        if lines:
            settings.beta = selection.best_value
        else:
            settings.scale = selection.best_value

    alpha, beta, alpha_auto = settings.resolve(merger)
    plan = merger.scaled_plan(alpha, beta, lines=lines)
    merger.run(plan, MemorySink(targets), progress=progress)

    record_config = LiNeSConfig(**{**config.to_dict(), "alpha": alpha, "beta": beta, "gamma": None})
    record = merge_record(
        merger,
        plan,
        lines=lines,
        alpha_auto=alpha_auto,
        selection=selection,
        base=describe_input(base_model),
        finetuned=[describe_input(item) for item in finetuned],
        command=_python_merge_call("LiNeSEditor.merge", finetuned, base_model, merge_method, lines, alpha, beta),
        heads={"policy": "in memory: model.lines_heads", "folders": {}},
    )
    _attach(working, record_config, record, None)
    working.lines_heads = {
        merge_input.label: {name: merge_input.source.read(name) for name in merge_input.heads}
        for merge_input in merger.inputs
        if merge_input.heads
    }
    return working
