"""The one pass that turns a plan into output tensors, for memory and for files alike.

Each output tensor is produced in flat chunks and handed to a sink: the
in-memory edit copies chunks into model parameters, the streaming edit appends
them to safetensors shards. Only the chunk producer differs between a single
edit and a merge.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

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

# Workspace buffers of the edit producer. apply_scale uses buffers 0, 1 and 4.
_TUNED_BUFFER = 2
_BASE_BUFFER = 3

ChunkProducer = Callable[[TensorAction, int, int], torch.Tensor]


class TensorSink(Protocol):
    def write(self, name: str, data: torch.Tensor) -> None:
        """Receive the next flat chunk of tensor ``name``.

        ``data`` may be a reused buffer of the producer: copy or write it
        before returning, never keep a reference.
        """


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
    start+count`` of the output tensor, already in ``action.out_dtype``. A
    producer with a ``prepare(steps)`` method gets the whole list of
    ``(action, start, count)`` calls first, as a context manager that lasts the
    pass, so it can read ahead. Progress is shown in output bytes;
    ``HF_HUB_DISABLE_PROGRESS_BARS=1`` silences it, as for huggingface_hub
    downloads.
    """
    steps = chunk_steps(actions, chunk_elements)
    total = sum(count * torch_dtype(action.out_dtype).itemsize for action, _, count in steps)
    prepare = getattr(produce, "prepare", None)
    with prepare(steps) if prepare is not None else nullcontext(), _progress(total, description, progress) as bar:
        for action, start, count in steps:
            chunk = produce(action, start, count)
            sink.write(action.name, chunk)
            bar.update(count * torch_dtype(action.out_dtype).itemsize)


def chunk_steps(actions: Iterable[TensorAction], chunk_elements: int) -> list[tuple[TensorAction, int, int]]:
    """Return the ``(action, start, count)`` calls that ``stream`` makes, in order.

    An empty tensor still gets one (empty) call, so sinks see every name.
    """
    steps = []
    for action in actions:
        numel = _numel(action.shape)
        for start in range(0, max(numel, 1), chunk_elements):
            steps.append((action, start, min(chunk_elements, numel - start)))
    return steps


class ReadAhead:
    """Reads the chunks of a pass in a background thread, a few steps ahead of their use.

    ``requests`` lists every read of the pass as ``(source, name, start,
    count)``, in the order ``take`` will ask for them. Each read goes into a
    buffer of its own from a fixed pool (``slots``), so memory stays bounded. A
    buffer returns to the pool when ``release`` is called. A failed read
    raises its error from the matching ``take``, so errors surface in the same
    order as without reading ahead. Use it as a context manager: leaving the
    block stops the thread.
    """

    def __init__(self, requests: Sequence[tuple[Any, str, int, int]], slots: int = 8) -> None:
        self._requests = list(requests)
        self._position = 0
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(slots):
            self._free.put(Workspace())
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lines-hf-reader", daemon=True)

    def _run(self) -> None:
        for source, name, start, count in self._requests:
            slot = self._free.get()
            if self._stopped:
                return
            try:
                data = read_into(source, name, start, count, slot, 0)
            except BaseException as error:  # raised again by take()
                self._ready.put((None, error))
                return
            self._ready.put((slot, data))

    def take(self, source: Any, name: str, start: int, count: int) -> tuple[Workspace, torch.Tensor]:
        """Return the slot and data of the next read, which must be ``(source, name, start, count)``."""
        expected = self._requests[self._position]
        if expected != (source, name, start, count):
            raise RuntimeError(
                f"read-ahead out of step: requested {name!r} [{start}, +{count}), planned {expected[1]!r} "
                f"[{expected[2]}, +{expected[3]})"
            )
        self._position += 1
        slot, data = self._ready.get()
        if slot is None:
            raise data
        return slot, data

    def release(self, slot: Workspace) -> None:
        """Give a slot back to the pool; its data must no longer be used."""
        self._free.put(slot)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stopped = True
        self._free.put(Workspace())  # wakes the thread if it waits for a slot
        self._thread.join()


def edit_producer(base, finetuned, *, allow_non_finite: bool = False) -> ChunkProducer:
    """Return the chunk producer of a single-model LiNeS edit.

    ``base`` and ``finetuned`` are ``TensorSource`` objects. Tensors with a scale
    get ``base + scale * (finetuned - base)``; tensors without one are copied
    from the fine-tune. Inputs and results live in buffers reused from chunk
    to chunk, so a returned chunk is valid only until the next call, and every
    sink copies or writes it at once. Inside ``stream`` a ``ReadAhead`` thread
    reads the inputs one chunk ahead.
    """
    return _EditProducer(base, finetuned, allow_non_finite)


class _EditProducer:
    def __init__(self, base, finetuned, allow_non_finite: bool) -> None:
        self.base = base
        self.finetuned = finetuned
        self.allow_non_finite = allow_non_finite
        self.workspace = Workspace()
        self.read_ahead: ReadAhead | None = None
        self.previous_slots: list[Workspace] = []  # read-ahead slots of the previous chunk

    def reads(self, action: TensorAction, start: int, count: int) -> list[tuple[Any, str, int, int]]:
        """Return the reads of one chunk, in the order ``__call__`` makes them."""
        if action.scale is None:
            return [(self.finetuned, action.name, start, count)]
        assert action.base_name is not None
        # Rows past the base's (new vocabulary rows) have no base value: they are copied.
        shared = count if action.base_rows is None else _shared_elements(action, start, count)
        return [(self.finetuned, action.name, start, count), (self.base, action.base_name, start, shared)]

    @contextmanager
    def prepare(self, steps: Sequence[tuple[TensorAction, int, int]]) -> Iterator[None]:
        requests = [read for step in steps for read in self.reads(*step)]
        with ReadAhead(requests) as self.read_ahead:
            try:
                yield
            finally:
                self.read_ahead = None
                self.previous_slots = []

    def _read(self, source, name: str, start: int, count: int, index: int) -> torch.Tensor:
        if self.read_ahead is None:
            return read_into(source, name, start, count, self.workspace, index)
        slot, data = self.read_ahead.take(source, name, start, count)
        self.previous_slots.append(slot)
        return data

    def __call__(self, action: TensorAction, start: int, count: int) -> torch.Tensor:
        # A copied tensor's result is its input buffer itself. The sink has consumed
        # the previous chunk by now, so its slots can go back to the pool.
        if self.read_ahead is not None:
            for slot in self.previous_slots:
                self.read_ahead.release(slot)
        self.previous_slots = []
        out_dtype = torch_dtype(action.out_dtype)
        (tuned_read, *base_read) = self.reads(action, start, count)
        tuned = self._read(*tuned_read, index=_TUNED_BUFFER)
        if action.scale is None:
            return tuned.to(out_dtype)
        (_, base_name, _, shared), = base_read
        original = self._read(self.base, base_name, start, shared, index=_BASE_BUFFER)
        edited = apply_scale(
            original,
            tuned[:shared],
            action.scale,
            out_dtype,
            name=action.name,
            allow_non_finite=self.allow_non_finite,
            workspace=self.workspace,
        )
        if shared == count:
            return edited
        return torch.cat([edited, tuned[shared:].to(out_dtype)])


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


def read_into(source, name: str, start: int, count: int, workspace: Workspace, index: int) -> torch.Tensor:
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
