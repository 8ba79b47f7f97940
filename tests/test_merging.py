"""The per-chunk merge math: top-k selection, sign election, TALL masks, DARE and the automatic alpha."""

from __future__ import annotations

import pytest
import torch

from lines_hf.errors import ConfigError
from lines_hf.merging import (
    DARE_BLOCK_ELEMENTS,
    REFERENCE_GRIDS,
    MergeMethod,
    RadixSelect,
    auto_alpha,
    consensus_mask,
    dare,
    dare_key,
    dare_uniform,
    disjoint_mean,
    kth_smallest_magnitude,
    merge_chunk,
    threshold_rank,
    trim,
)


def test_threshold_rank_follows_reference():
    assert threshold_rank(10, 0.2) == 8
    assert threshold_rank(7, 0.2) == 6  # int(1.4) == 1 entry kept at least
    assert threshold_rank(5, 1.0) == 0
    assert threshold_rank(3, 0.1) == 3


@pytest.mark.parametrize("density", [0.2, 0.5, 0.01, 0.999])
def test_kth_smallest_magnitude_matches_kthvalue(density):
    values = torch.randn(200_003, generator=torch.Generator().manual_seed(0)) * 1e-3
    rank = threshold_rank(values.numel(), density)
    expected = torch.kthvalue(values.abs(), rank).values.item()
    assert kth_smallest_magnitude(values, rank) == expected


def test_radix_select_chunked_equals_whole():
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    rank = threshold_rank(values.numel(), 0.2)
    chunks = list(values.split(7_777))
    select = RadixSelect()
    for chunk in chunks:
        select.add_high(chunk)
    assert select.finish_high(rank)
    for chunk in reversed(chunks):  # pass 2 may read chunks in any order
        select.add_low(chunk)
    assert select.threshold() == torch.kthvalue(values.abs(), rank).values.item()


def test_radix_select_handles_ties_and_zeros():
    values = torch.tensor([0.0, 0.0, 0.5, -0.5, 0.5, 2.0, -3.0, 0.0])
    assert kth_smallest_magnitude(values, 1) == 0.0
    assert kth_smallest_magnitude(values, 4) == 0.5
    assert kth_smallest_magnitude(values, 6) == 0.5
    assert kth_smallest_magnitude(values, 8) == 3.0
    assert kth_smallest_magnitude(values, 0) == 0.0
    with pytest.raises(ValueError, match="outside"):
        kth_smallest_magnitude(values, 9)


def test_trim_keeps_entries_at_threshold():
    taus = torch.tensor([[0.1, -0.3, 0.2], [1.0, 0.5, -0.4]])
    trimmed = trim(taus, torch.tensor([0.2, 0.5]))
    assert trimmed.tolist() == [[0.0, -0.30000001192092896, 0.20000000298023224], [1.0, 0.5, 0.0]]


def test_disjoint_mean_table():
    trimmed = torch.tensor(
        [
            [1.0, -2.0, 0.0, 3.0, 1.0],
            [3.0, 1.0, 0.0, -3.0, -1.0],
            [0.0, -1.0, 0.0, 0.0, 0.0],
        ]
    )
    # column sums: 4, -2, 0, 0, 0 -> signs +, -, + (sum 0), + (sum 0), + (sum 0)
    expected = [2.0, -1.5, 0.0, 3.0, 1.0]
    assert disjoint_mean(trimmed).tolist() == expected


def test_consensus_mask_table():
    taus = torch.tensor([[1.0, 0.1, 0.0], [1.0, -1.0, 0.0], [0.0, 1.0, 1.0]])
    total = taus.sum(0)  # 2.0, 0.1, 1.0
    lams = torch.full((3, 1), 0.5)
    # task 0: |1|>=0.5*|1|  yes; |0.1|>=0.5*|0.0| yes; 0>=0.5*1 no
    # task 1: |1|>=0.5*|1|  yes; |-1|>=0.5*|1.1| yes; 0>=0.5*1 no
    # task 2: 0>=0.5*|2| no;  |1|>=0.5*|-0.9| yes;  1>=0.5*0 yes
    assert consensus_mask(taus, total, lams, 2).tolist() == [True, True, False]
    assert consensus_mask(taus, total, lams, 3).tolist() == [False, True, False]


def test_consensus_per_task_lams_need_one_per_task():
    method = MergeMethod("consensus", consensus_lam=[0.2, 0.6])
    assert method.lams(2).reshape(-1).tolist() == pytest.approx([0.2, 0.6])
    with pytest.raises(ConfigError, match="one value per model"):
        method.lams(3)


def test_dare_uniform_independent_of_chunking():
    key = dare_key(3, "model.layers.0.mlp.up_proj.weight", 1)
    total = DARE_BLOCK_ELEMENTS * 2 + 12_345
    whole = dare_uniform(key, 0, total)
    cuts = [0, 5, DARE_BLOCK_ELEMENTS - 1, DARE_BLOCK_ELEMENTS + 17, total]
    pieces = torch.cat([dare_uniform(key, a, b - a) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, pieces)
    assert 0.0 <= whole.min().item()
    assert whole.max().item() < 1.0


def test_dare_keys_differ_by_seed_task_and_name():
    keys = {dare_key(0, "a", 0), dare_key(1, "a", 0), dare_key(0, "a", 1), dare_key(0, "b", 0)}
    assert len(keys) == 4
    assert dare_key(0, "a", 0) == dare_key(0, "a", 0)


def test_dare_drop_rate_and_rescale():
    taus = torch.ones(1, 400_000)
    uniforms = dare_uniform(dare_key(0, "x", 0), 0, 400_000).unsqueeze(0)
    dropped = dare(taus, uniforms, 0.3)
    kept = dropped != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    torch.testing.assert_close(dropped[kept], torch.full((int(kept.sum()),), 1 / 0.7))
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(dare(taus, uniforms, 0.0), taus)


def test_merge_chunk_methods_table():
    taus = torch.tensor([[0.5, -0.1, 0.2], [0.3, 0.4, -0.6]])
    assert merge_chunk(MergeMethod("task_arithmetic"), taus).tolist() == pytest.approx([0.8, 0.3, -0.4])
    ties = merge_chunk(MergeMethod("ties"), taus, thresholds=torch.tensor([0.2, 0.4]))
    # trimmed: [0.5, 0, 0.2], [0, 0.4, -0.6]; sums 0.5, 0.4, -0.4
    assert ties.tolist() == pytest.approx([0.5, 0.4, -0.6])
    with pytest.raises(ValueError, match="thresholds"):
        merge_chunk(MergeMethod("ties"), taus)
    with pytest.raises(ValueError, match="uniform"):
        merge_chunk(MergeMethod("dare_linear"), taus)
    no_drop = torch.ones_like(taus)
    linear = merge_chunk(MergeMethod("dare_linear", drop_rate=0.5), taus, uniforms=no_drop)
    assert linear.tolist() == pytest.approx([1.6, 0.6, -0.8])


def test_auto_alpha_formula_and_zero_norm():
    assert auto_alpha(6.0, 2.0, 3) == 1.0
    assert auto_alpha(5.0, 5.0, 4) == 0.25
    with pytest.raises(ConfigError, match="pass alpha"):
        auto_alpha(1.0, 0.0, 2)


def test_task_arithmetic_norm_ratio_is_one_over_t():
    taus = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2))
    merged = merge_chunk(MergeMethod("task_arithmetic"), taus)
    l1 = float(taus.sum(0).abs().sum(dtype=torch.float64))
    assert auto_alpha(l1, float(merged.abs().sum(dtype=torch.float64)), 4) == pytest.approx(0.25, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "slerp"}, "merge method must be one of"),
        ({"name": "ties", "density": 0.0}, "density"),
        ({"name": "ties", "ties_trim": "per_layer"}, "ties_trim"),
        ({"name": "consensus", "consensus_k": 0}, "consensus_k"),
        ({"name": "consensus", "consensus_lam": -1.0}, "consensus_lam"),
        ({"name": "dare_ties", "drop_rate": 1.0}, "drop_rate"),
        ({"name": "dare_ties", "seed": 1.5}, "seed"),
    ],
)
def test_merge_method_rejects_invalid(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MergeMethod(**kwargs)


def test_merge_method_params_and_grids():
    assert MergeMethod("ties", density=0.1).params() == {"density": 0.1, "ties_trim": "global"}
    assert MergeMethod("task_arithmetic").params() == {}
    assert REFERENCE_GRIDS["ties"][-1] == 1.5
    assert REFERENCE_GRIDS["task_arithmetic"] == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_scratch_keeps_input(dtype):
    values = (torch.randn(50_001, generator=torch.Generator().manual_seed(3)) * 1e-2).to(dtype)
    before = values.clone()
    rank = threshold_rank(values.numel(), 0.2)
    expected = torch.kthvalue(values.abs().double(), rank).values.item()
    scratch = torch.empty(60_000, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    assert kth_smallest_magnitude(values, rank, scratch=scratch) == expected
    assert kth_smallest_magnitude(values, rank) == expected
    assert torch.equal(values, before)


def test_window_select_reports_a_missed_bracket():
    from lines_hf.merging import WindowSelect

    values = torch.arange(1.0, 101.0)
    inside = WindowSelect(40.0, 60.0, rank=50)
    inside.add(values)
    assert inside.threshold() == 50.0
    missed = WindowSelect(70.0, 80.0, rank=50)
    missed.add(values)
    assert missed.threshold() is None
