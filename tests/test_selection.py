"""Gamma selection: the generic grid search, the criterion and the in-memory edit it relies on."""

from __future__ import annotations

import pytest
import torch
import transformers

from lines_hf import LiNeSConfig, LiNeSEditor
from lines_hf.errors import ConfigError
from lines_hf.selection import (
    DEFAULT_GAMMA_GRID,
    InMemoryEditor,
    forgetting_criterion,
    grid_search,
    select_gamma,
)
from tiny import make_model, perturb, tiny_config

EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


def tiny_pair(seed: int = 0):
    """Return a bare tiny BertModel and a perturbed classifier whose backbone starts from it."""
    base = make_model("bert", seed=seed, model_class="BertModel")
    torch.manual_seed(seed + 1)
    classifier = transformers.BertForSequenceClassification(tiny_config("bert", num_labels=2)).eval()
    classifier.bert.load_state_dict(base.state_dict())
    return base, perturb(classifier, seed=seed + 2, scale=0.1)


def test_default_grid_values():
    assert DEFAULT_GAMMA_GRID == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def test_criterion_table():
    cases = [
        # target, finetuned target, control, zero-shot control, expected
        (0.9, 0.9, {"a": 0.5}, {"a": 0.5}, 3.0),
        (0.45, 0.9, {"a": 0.25, "b": 0.6}, {"a": 0.5, "b": 0.6}, 1.0 + 0.75),
        (0.0, 0.8, {"a": 0.0}, {"a": 0.4}, 0.0),
    ]
    for target, finetuned, control, zeroshot, expected in cases:
        assert forgetting_criterion(target, finetuned, control, zeroshot) == pytest.approx(expected, abs=1e-12)


def test_criterion_rejects_zero_reference():
    with pytest.raises(ConfigError, match="zero-shot"):
        forgetting_criterion(0.5, 0.5, {"a": 0.5}, {"a": 0.0})
    with pytest.raises(ConfigError, match="target accuracy"):
        forgetting_criterion(0.5, 0.0, {"a": 0.5}, {"a": 0.5})


def test_grid_search_keeps_every_point():
    result = grid_search([3.0, 1.0, 2.0], lambda v: {"square": v * v}, lambda s: -abs(s["square"] - 4.0), progress=False)
    assert [p.value for p in result.points] == [3.0, 1.0, 2.0]
    assert [p.scores["square"] for p in result.points] == [9.0, 1.0, 4.0]
    assert [p.criterion for p in result.points] == [-5.0, -3.0, 0.0]
    assert result.best_value == 2.0
    assert result.to_dict()["points"][1] == {"value": 1.0, "criterion": -3.0, "square": 1.0}


def test_grid_search_tie_keeps_first():
    result = grid_search([0.7, 0.2, 0.5], lambda v: {}, lambda s: 1.0, progress=False)
    assert result.best_value == 0.7


def test_grid_search_rejects_empty_grid():
    with pytest.raises(ConfigError, match="empty"):
        grid_search([], lambda v: {}, lambda s: 0.0, progress=False)


def test_in_memory_edit_matches_editor():
    base, finetuned = tiny_pair()
    before = {k: v.clone() for k, v in finetuned.state_dict().items()}
    editor = InMemoryEditor(finetuned, base)
    for gamma in (0.0, 0.3, 1.0, 0.7):
        edited = editor.apply_gamma(gamma)
        reference = LiNeSEditor.from_pretrained(finetuned, base_model=base, config=LiNeSConfig(gamma=gamma), progress=False)
        expected = reference.state_dict()
        for name, tensor in edited.state_dict().items():
            assert torch.equal(tensor, expected[name]), (gamma, name)
    for name, tensor in finetuned.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_in_memory_edit_gamma_one_is_finetune():
    base, finetuned = tiny_pair()
    edited = InMemoryEditor(finetuned, base).apply_gamma(1.0)
    for name, tensor in finetuned.state_dict().items():
        assert torch.equal(edited.state_dict()[name], tensor), name


def applied_gamma(model, base, finetuned) -> float:
    """Recover alpha (= gamma) from the word embeddings, a tensor outside every block."""
    start = base.state_dict()["embeddings.word_embeddings.weight"]
    delta = finetuned.state_dict()[EMBEDDINGS] - start
    moved = model.state_dict()[EMBEDDINGS] - start
    return float((moved * delta).sum() / (delta * delta).sum())


def test_select_gamma_finds_known_best():
    base, finetuned = tiny_pair()

    def gamma_of(model) -> float:
        if isinstance(model, transformers.BertModel):
            return 0.0
        return applied_gamma(model, base, finetuned)

    # criterion(g) = 2 * (1 - (1 - g)^2 / 2) + (1 - g) peaks at g = 0.5.
    def evaluate_target(model) -> float:
        return 1.0 - 0.5 * (1.0 - gamma_of(model)) ** 2

    def evaluate_control(model) -> dict[str, float]:
        return {"control": 1.0 - gamma_of(model)}

    result = select_gamma(finetuned, base, evaluate_target, evaluate_control, progress=False)

    assert result.best_value == 0.5
    assert [p.value for p in result.points] == list(DEFAULT_GAMMA_GRID)
    assert result.extra["finetuned_target_accuracy"] == pytest.approx(1.0, abs=1e-6)
    assert result.extra["zeroshot_control_accuracies"] == {"control": 1.0}
    for point in result.points:
        g = point.value
        assert point.scores["target"] == pytest.approx(1.0 - 0.5 * (1.0 - g) ** 2, abs=1e-5)
        assert point.scores["control"]["control"] == pytest.approx(1.0 - g, abs=1e-5)
        assert point.criterion == pytest.approx(2.0 - (1.0 - g) ** 2 + 1.0 - g, abs=1e-5)


def test_select_gamma_rejects_out_of_range_grid():
    base, finetuned = tiny_pair()
    with pytest.raises(ConfigError, match="1.5"):
        select_gamma(finetuned, base, lambda m: 1.0, lambda m: {"a": 1.0}, grid=[1.5], progress=False)
