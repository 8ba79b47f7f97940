"""The speed paths of the streaming edit give the same bits as the plain ones."""

from __future__ import annotations

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
def test_workspace_result_is_new_tensor(scale):
    base, tuned = _pair(torch.float32)
    workspace = Workspace()
    result = apply_scale(base, tuned, scale, torch.float32, workspace=workspace)
    buffers = [workspace.buffer(i, 1, torch.float32).data_ptr() for i in (0, 1)]
    assert result.data_ptr() not in (base.data_ptr(), tuned.data_ptr(), *buffers)


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
