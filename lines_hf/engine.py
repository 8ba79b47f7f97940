"""The one pass that turns a plan into output tensors, for memory and for files alike.

Each output tensor is produced in flat chunks and handed to a sink: the
in-memory edit copies chunks into model parameters, the streaming edit appends
them to safetensors shards. Only the chunk producer differs between a single
edit and a merge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch

from .plan import EditPlan, TensorAction
from .task_vector import apply_scale, torch_dtype

LOG = logging.getLogger(__name__)

# Elements per chunk: about 32 MB of float32 per working buffer, so a few
# buffers stay well under the memory of one large tensor.
DEFAULT_CHUNK_ELEMENTS = 8 * 1024 * 1024

ChunkProducer = Callable[[TensorAction, int, int], torch.Tensor]


class TensorSink(Protocol):
    def write(self, name: str, data: torch.Tensor) -> None:
        """Receive the next flat chunk of tensor ``name``."""


class MemorySink:
    """Copies chunks into existing tensors (model parameters and buffers) in place."""

    def __init__(self, targets: Mapping[str, torch.Tensor]) -> None:
        self._targets = targets
        self._offsets: dict[str, int] = {}

    def write(self, name: str, data: torch.Tensor) -> None:
        target = self._targets[name]
        start = self._offsets.get(name, 0)
        flat = target.data.view(-1)
        flat[start : start + data.numel()].copy_(data)
        self._offsets[name] = start + data.numel()


class DictSink:
    """Collects chunks into new tensors, keyed by name."""

    def __init__(self, plan_actions: Iterable[TensorAction]) -> None:
        self.tensors = {
            a.name: torch.empty(a.shape, dtype=torch_dtype(a.out_dtype)) for a in plan_actions
        }
        self._sink = MemorySink(self.tensors)

    def write(self, name: str, data: torch.Tensor) -> None:
        self._sink.write(name, data)


def _progress(total: int, description: str, enabled: bool):
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=not enabled)


def stream(
    actions: Iterable[TensorAction],
    produce: ChunkProducer,
    sink: TensorSink,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    description: str = "LiNeS",
    progress: bool = True,
) -> None:
    """Produce every tensor of ``actions`` chunk by chunk and write it to ``sink``, in order.

    ``produce(action, start, count)`` returns flat elements ``start ..
    start+count`` of the output tensor, already in ``action.out_dtype``.
    Progress is shown in output bytes; ``HF_HUB_DISABLE_PROGRESS_BARS=1``
    silences it, as for huggingface_hub downloads.
    """
    actions = list(actions)
    total = sum(_nbytes(a) for a in actions)
    with _progress(total, description, progress) as bar:
        for action in actions:
            numel = _numel(action.shape)
            # An empty tensor still gets one (empty) write, so sinks see every name.
            for start in range(0, max(numel, 1), chunk_elements):
                count = min(chunk_elements, numel - start)
                chunk = produce(action, start, count)
                sink.write(action.name, chunk)
                bar.update(count * torch_dtype(action.out_dtype).itemsize)


def edit_producer(base, finetuned, *, allow_non_finite: bool = False) -> ChunkProducer:
    """Return the chunk producer of a single-model LiNeS edit.

    ``base`` and ``finetuned`` are ``TensorSource`` objects. Tensors with a scale
    get ``base + scale * (finetuned - base)``; tensors without one are copied
    from the fine-tune.
    """

    def produce(action: TensorAction, start: int, count: int) -> torch.Tensor:
        out_dtype = torch_dtype(action.out_dtype)
        tuned = finetuned.read_flat(action.name, start, count)
        if action.scale is None:
            return tuned.to(out_dtype)
        assert action.base_name is not None
        original = base.read_flat(action.base_name, start, count)
        return apply_scale(
            original, tuned, action.scale, out_dtype, name=action.name, allow_non_finite=allow_non_finite
        )

    return produce


def run_edit(plan: EditPlan, base, finetuned, sink: TensorSink, **kwargs) -> None:
    """Run a single-model LiNeS edit of ``plan`` from two sources into ``sink``."""
    allow_non_finite = kwargs.pop("allow_non_finite", False)
    stream(plan.actions, edit_producer(base, finetuned, allow_non_finite=allow_non_finite), sink, **kwargs)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _nbytes(action: TensorAction) -> int:
    return _numel(action.shape) * torch_dtype(action.out_dtype).itemsize
