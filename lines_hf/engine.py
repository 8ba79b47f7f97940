"""The one pass that turns a plan into output tensors, for memory and for files alike.

Each output tensor is produced in flat chunks and handed to a sink: the
in-memory edit copies chunks into model parameters, the streaming edit appends
them to safetensors shards. Only the chunk producer differs between a single
edit and a merge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import torch

from .plan import EditPlan, TensorAction
from .task_vector import Workspace, apply_scale, torch_dtype

LOG = logging.getLogger(__name__)

# Elements per chunk: 4 MiB per float32 working buffer. The edit makes several
# passes over each chunk (convert, subtract, check, scale, add, round), and
# small reused buffers keep those passes in the CPU cache. On a 2-core VM, a
# 2.2e8-parameter edit took 0.74-0.91 s with 1Mi-element chunks and 1.30-1.92 s
# with 4Mi-element ones.
DEFAULT_CHUNK_ELEMENTS = 1024 * 1024

# Workspace buffers of the edit producer; apply_scale uses 0 and 1.
_TUNED_BUFFER = 2
_BASE_BUFFER = 3

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
    from the fine-tune. Inputs are read into buffers reused from chunk to
    chunk, and every returned chunk is a new tensor.
    """
    workspace = Workspace()

    def produce(action: TensorAction, start: int, count: int) -> torch.Tensor:
        out_dtype = torch_dtype(action.out_dtype)
        if action.scale is None:
            return finetuned.read_flat(action.name, start, count).to(out_dtype)
        assert action.base_name is not None
        tuned = _read_into(finetuned, action.name, start, count, workspace, _TUNED_BUFFER)
        # Rows past the base's (new vocabulary rows) have no base value: copy them.
        shared = count if action.base_rows is None else _shared_elements(action, start, count)
        original = _read_into(base, action.base_name, start, shared, workspace, _BASE_BUFFER)
        edited = apply_scale(
            original,
            tuned[:shared],
            action.scale,
            out_dtype,
            name=action.name,
            allow_non_finite=allow_non_finite,
            workspace=workspace,
        )
        if shared == count:
            return edited
        return torch.cat([edited, tuned[shared:].to(out_dtype)])

    return produce


def run_edit(plan: EditPlan, base, finetuned, sink: TensorSink, **kwargs) -> None:
    """Run a single-model LiNeS edit of ``plan`` from two sources into ``sink``.

    The pass runs with one torch intra-op thread, restored afterwards.
    """
    allow_non_finite = kwargs.pop("allow_non_finite", False)
    with single_threaded():
        stream(plan.actions, edit_producer(base, finetuned, allow_non_finite=allow_non_finite), sink, **kwargs)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Limit torch to one intra-op thread inside the block, then restore the previous count.

    Every op of the edit is a memory-bound pass over one small chunk (about
    0.3 ms). With several threads each op ends in a barrier, and when another
    process occupies a core the barrier waits for a scheduler slice. On a busy
    2-core VM the edit pass of a 2.2e8-parameter model took 11 s with 2 threads
    and about 1 s with one (benchmarks/README.md, "Edit speed").
    """
    # NOTE: not measured on idle machines with many cores, where more threads
    # might make the arithmetic faster; reads and writes are single-threaded anyway.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _read_into(source, name: str, start: int, count: int, workspace: Workspace, index: int) -> torch.Tensor:
    # Sources that are not TensorSource subclasses may lack read_flat_into.
    reader = getattr(source, "read_flat_into", None)
    if reader is None:
        return source.read_flat(name, start, count)
    return reader(name, start, count, workspace, index)


def _shared_elements(action: TensorAction, start: int, count: int) -> int:
    """Return how many of flat elements ``start .. start+count`` lie in the first ``action.base_rows`` rows."""
    row = _numel(action.shape[1:])
    return max(0, min(count, action.base_rows * row - start))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _nbytes(action: TensorAction) -> int:
    return _numel(action.shape) * torch_dtype(action.out_dtype).itemsize
