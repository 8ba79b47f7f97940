"""The speed paths of the streaming edit give the same bits as the plain ones."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from lines_hf import engine
from lines_hf.checkpoint import FolderSource, StateDictSource
from lines_hf.errors import NonFiniteError
from lines_hf.task_vector import Workspace, apply_scale, check_finite


def _pair(dtype: torch.dtype, numel: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(numel, generator=generator) * 0.02
    tuned = base + torch.randn(numel, generator=generator) * 0.002
    return base.to(dtype), tuned.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.0, 1.0, 0.37, 1.5])
def test_workspace_matches_plain_path(dtype, scale):
    base, tuned = _pair(dtype)
    workspace = Workspace()
    plain = apply_scale(base, tuned, scale, dtype)
    # The second call reuses the buffers that the first call grew.
    apply_scale(base[:100], tuned[:100], 0.5, dtype, workspace=workspace)
    fast = apply_scale(base, tuned, scale, dtype, workspace=workspace)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("scale", [0.0, 1.0, 0.37])
def test_workspace_result_never_aliases_inputs(scale):
    base, tuned = _pair(torch.float32)
    base_copy, tuned_copy = base.clone(), tuned.clone()
    workspace = Workspace()
    result = apply_scale(base, tuned, scale, torch.float32, workspace=workspace)
    buffers = [workspace.buffer(i, 1, torch.float32).data_ptr() for i in (0, 1)]
    assert result.data_ptr() not in (base.data_ptr(), tuned.data_ptr(), *buffers)
    result.fill_(7.0)  # a sink that scribbles on the chunk must not change the inputs
    assert torch.equal(base, base_copy)
    assert torch.equal(tuned, tuned_copy)


def test_workspace_result_buffer_is_reused():
    base, tuned = _pair(torch.bfloat16)
    workspace = Workspace()
    first = apply_scale(base, tuned, 0.37, torch.bfloat16, workspace=workspace)
    expected_first = first.clone()
    second = apply_scale(tuned, base, 0.37, torch.bfloat16, workspace=workspace)
    assert second.data_ptr() == first.data_ptr()
    assert not torch.equal(second, expected_first)


def test_workspace_keeps_a_buffer_per_dtype():
    workspace = Workspace()
    wide = workspace.buffer(4, 10, torch.float32)
    narrow = workspace.buffer(4, 10, torch.bfloat16)
    assert workspace.buffer(4, 10, torch.float32).data_ptr() == wide.data_ptr()
    assert workspace.buffer(4, 5, torch.bfloat16).data_ptr() == narrow.data_ptr()
    assert workspace.buffer(4, 11, torch.float32).data_ptr() != wide.data_ptr()


def test_workspace_equals_float32_formula():
    base, tuned = _pair(torch.bfloat16)
    fast = apply_scale(base, tuned, 0.37, torch.bfloat16, workspace=Workspace())
    formula = (base.float() + 0.37 * (tuned.float() - base.float())).to(torch.bfloat16)
    assert torch.equal(fast.view(torch.int16), formula.view(torch.int16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_counts_bad_entries(bad):
    delta = torch.zeros(1000)
    delta[10] = bad
    delta[500] = bad
    with pytest.raises(NonFiniteError, match="has 2 NaN or infinite"):
        check_finite(delta, "layer.weight")


def test_check_finite_accepts_overflowing_sum():
    # Each entry is finite but their float32 sum overflows to infinity.
    delta = torch.full((8,), 3.0e38)
    assert not torch.isfinite(delta.sum())
    check_finite(delta, "big")


def test_folder_read_into_matches_read_flat(tmp_path):
    tensors = {"a": torch.arange(1000, dtype=torch.float32).to(torch.bfloat16), "b": torch.randn(37, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = FolderSource(tmp_path)
    workspace = Workspace()
    for name, start, count in [("a", 0, 1000), ("a", 990, 50), ("b", 5, 20), ("a", 3, 0)]:
        expected = source.read_flat(name, start, count)
        got = source.read_flat_into(name, start, count, workspace, 0)
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)
    source.close()


def test_state_dict_read_into_matches_read_flat():
    source = StateDictSource({"w": torch.arange(12.0).reshape(3, 4)})
    got = source.read_flat_into("w", 2, 5, Workspace(), 0)
    assert torch.equal(got, torch.arange(2.0, 7.0))


def test_single_threaded_restores_threads():
    before = torch.get_num_threads()
    seen = []
    with engine.single_threaded():
        seen.append(torch.get_num_threads())
    assert seen == [1]
    assert torch.get_num_threads() == before


class CountingSource:
    """A source of flat float32 ranges that records its reads and fails on one name."""

    def __init__(self, fail_on=None):
        self.reads = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def read_flat_into(self, name, start, count, workspace, index):
        with self.lock:
            self.reads.append((name, start, count))
        if name == self.fail_on:
            raise OSError(f"cannot read {name}")
        buffer = workspace.buffer(index, count, torch.float32)
        return torch.arange(start, start + count, dtype=torch.float32, out=buffer)


def test_read_ahead_returns_reads_in_order():
    source = CountingSource()
    requests = [(source, f"t{i}", 10 * i, 5) for i in range(20)]
    with engine.ReadAhead(requests, slots=3) as ahead:
        for _, name, start, count in requests:
            slot, data = ahead.take(source, name, start, count)
            assert torch.equal(data, torch.arange(start, start + count, dtype=torch.float32))
            ahead.release(slot)
    assert source.reads == [(name, start, count) for _, name, start, count in requests]


def test_read_ahead_stays_within_its_slots():
    source = CountingSource()
    requests = [(source, f"t{i}", 0, 4) for i in range(10)]
    with engine.ReadAhead(requests, slots=2) as ahead:
        first_slots = [ahead.take(*requests[0])[0], ahead.take(*requests[1])[0]]
        time.sleep(0.2)  # gives the thread time to read further, if it could
        assert len(source.reads) == 2
        ahead.release(first_slots[0])
        ahead.take(*requests[2])
    assert not [t for t in threading.enumerate() if t.name == "lines-hf-reader"]


def test_read_ahead_raises_at_the_failing_read():
    source = CountingSource(fail_on="t3")
    requests = [(source, f"t{i}", 0, 4) for i in range(6)]
    with engine.ReadAhead(requests, slots=8) as ahead:
        for request in requests[:3]:
            ahead.release(ahead.take(*request)[0])
        with pytest.raises(OSError, match="cannot read t3"):
            ahead.take(*requests[3])
    assert [name for name, _, _ in source.reads] == ["t0", "t1", "t2", "t3"]


def test_read_ahead_rejects_out_of_step():
    source = CountingSource()
    requests = [(source, "a", 0, 4), (source, "b", 0, 4)]
    with engine.ReadAhead(requests) as ahead, pytest.raises(RuntimeError, match="out of step"):
        ahead.take(source, "b", 0, 4)


def test_stream_read_ahead_same_bits():
    """The edit producer reads ahead inside stream, and the result equals a producer called directly."""
    from lines_hf.plan import TensorAction

    generator = torch.Generator().manual_seed(11)
    base_tensors = {f"w{i}": torch.randn(1000 + i).to(torch.bfloat16) for i in range(5)}
    tuned_tensors = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=generator)).to(torch.bfloat16)
                     for k, v in base_tensors.items()}
    actions = [TensorAction(name=k, base_name=k, shape=tuple(v.shape), dtype="bfloat16", out_dtype="bfloat16",
                            scale=0.1 * i if i else None, reason="block") for i, (k, v) in enumerate(base_tensors.items())]
    sink = engine.DictSink(actions)
    engine.stream(actions, engine.edit_producer(StateDictSource(base_tensors), StateDictSource(tuned_tensors)),
                  sink, chunk_elements=128, progress=False)
    direct = engine.edit_producer(StateDictSource(base_tensors), StateDictSource(tuned_tensors))
    for action in actions:
        expected = direct(action, 0, action.shape[0]).clone()
        assert torch.equal(sink.tensors[action.name].view(torch.int16), expected.view(torch.int16))
