"""Model cards: metadata, the per-block table, the plot and the fine-tune's card, read back with ModelCard.load."""

import json
import logging
import re
import sys

import pytest
from huggingface_hub import ModelCard

from lines_hf import LiNeSConfig, __version__
from lines_hf.card import (
    FINETUNED_CARD_HEADING,
    PAPER_URL,
    PLOT_NAME,
    build_model_card,
    lines_metadata,
    redact_command,
    write_model_card,
)
from lines_hf.config import CONFIG_NAME
from lines_hf.plot import ScalePlot, draw_scales
from lines_hf.schedule import linear_scales

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(kind="edit", *, alpha=0.2, beta=0.8, non_block=None, stacks=None, base=None, finetuned=None, **extra):
    """Build a record as LiNeSEditor does, with scales from the schedule."""
    stacks = stacks or {"bert.encoder.layer": 4}
    record = {
        "kind": kind,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "inputs": {
            "base_model": base or {"path": "google-bert/bert-base-uncased", "hub_id": "google-bert/bert-base-uncased", "revision": None},
            "finetuned": finetuned or [{"path": "/data/runs/bert-sst2", "hub_id": None, "revision": None}],
        },
        "command": "lines-hf edit --base google-bert/bert-base-uncased --finetuned /data/runs/bert-sst2 --alpha 0.2 --beta 0.8",
        "alpha": alpha,
        "beta": beta,
        "non_block_scale": alpha if non_block is None else non_block,
        "stacks": {
            name: {"depth": depth, "depth_source": "config", "schedule_offset": 0, "schedule_depth": depth,
                   "scales": linear_scales(depth, alpha, beta)}
            for name, depth in stacks.items()
        },
        "copied_from_finetuned_not_in_base": ["classifier.weight", "classifier.bias"],
        "excluded": [],
        "dropped_base_only": [],
        "out_dtype": None,
    }
    record.update(extra)
    return record


def table_rows(text):
    """Return ``(stack, block, scale)`` from the card's per-block table."""
    rows = []
    for match in re.finditer(r"^\| `([^`]+)` \| (\d+) \| ([-+0-9.e]+) \|$", text, flags=re.MULTILINE):
        rows.append((match.group(1), int(match.group(2)), float(match.group(3))))
    return rows


def load_back(folder):
    return ModelCard.load(folder / "README.md")


def test_edit_card_metadata_matches_config(tmp_path):
    config = LiNeSConfig(alpha=0.2, beta=0.8, exclude=["classifier"], out_dtype="bfloat16")
    record = make_record(out_dtype="bfloat16")

    write_model_card(tmp_path, config, record)
    card = load_back(tmp_path)
    data = card.data.to_dict()

    # The fine-tune is a local path, so only the base model's Hub id is listed.
    assert data["base_model"] == ["google-bert/bert-base-uncased"]
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers"
    assert "lines" in data["tags"]
    lines = data["lines"]
    assert lines["kind"] == "edit"
    assert lines["alpha"] == config.alpha
    assert lines["beta"] == config.beta
    assert "gamma" not in lines
    assert lines["schedule"] == "linear"
    assert lines["non_block_scale"] == {"policy": "alpha", "value": 0.2}
    assert lines["stack_policy"] == config.stack_policy
    assert lines["exclude"] == config.exclude
    assert lines["out_dtype"] == "bfloat16"
    assert lines["depths"] == {"bert.encoder.layer": 4}
    assert lines["lines_hf_version"] == __version__
    assert lines["finetuned"] == [{"path": "/data/runs/bert-sst2"}]
    assert lines["base_model"] == {"path": "google-bert/bert-base-uncased", "hub_id": "google-bert/bert-base-uncased"}
    assert "merge" not in lines


def test_edit_card_table_matches_schedule(tmp_path):
    config = LiNeSConfig(alpha=0.1, beta=0.7)
    record = make_record(alpha=0.1, beta=0.7, stacks={"encoder.block": 3, "decoder.block": 2})

    write_model_card(tmp_path, config, record)
    rows = table_rows(load_back(tmp_path).text)

    expected = [("encoder.block", i, s) for i, s in enumerate(linear_scales(3, 0.1, 0.7))]
    expected += [("decoder.block", i, s) for i, s in enumerate(linear_scales(2, 0.1, 0.7))]
    assert [(stack, block) for stack, block, _ in rows] == [(stack, block) for stack, block, _ in expected]
    for (_, _, got), (_, _, want) in zip(rows, expected):
        assert got == pytest.approx(want, rel=1e-5)
    # First block alpha, last block alpha + beta, in both stacks.
    assert rows[0][2] == pytest.approx(0.1)
    assert rows[2][2] == pytest.approx(0.8)
    assert rows[4][2] == pytest.approx(0.8)


def test_card_body_sections(tmp_path):
    config = LiNeSConfig(alpha=0.2, beta=0.8)
    record = make_record()

    write_model_card(tmp_path, config, record)
    text = load_back(tmp_path).text

    assert PAPER_URL in text
    assert "alpha + beta * l / (L - 1)" in text
    assert "```bash\n" + record["command"] + "\n```" in text
    assert f"![LiNeS scale against block depth]({PLOT_NAME})" in text
    assert "Tensors outside every block: scale 0.2 (alpha" in text
    assert "2 tensor(s) absent from the pre-trained model were copied unchanged" in text
    assert CONFIG_NAME in text
    assert FINETUNED_CARD_HEADING not in text


def test_gamma_and_policies_recorded():
    config = LiNeSConfig(gamma=0.3, non_block_scale="keep", stack_policy="global", num_layers={"encoder.block": 3})
    record = make_record(alpha=0.3, beta=0.7, non_block=1.0)

    lines = lines_metadata(config, record)

    assert lines["gamma"] == 0.3
    assert lines["alpha"] == 0.3
    assert lines["beta"] == 0.7
    assert lines["non_block_scale"] == {"policy": "keep", "value": 1.0}
    assert lines["stack_policy"] == "global"
    assert lines["num_layers"] == {"encoder.block": 3}


def test_merge_card_metadata(tmp_path):
    config = LiNeSConfig(beta=0.5)
    finetuned = [
        {"path": "org/bert-sst2", "hub_id": "org/bert-sst2", "revision": "v2"},
        {"path": "/local/bert-mnli", "hub_id": None, "revision": None},
    ]
    merge = {"method": "ties", "params": {"density": 0.2}, "alpha_auto": True}
    record = make_record("merge", alpha=0.375, beta=0.5, finetuned=finetuned, merge=merge)

    write_model_card(tmp_path, config, record)
    card = load_back(tmp_path)
    data = card.data.to_dict()

    assert data["base_model"] == ["google-bert/bert-base-uncased", "org/bert-sst2"]
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers"
    assert data["tags"][:2] == ["lines", "merge"]
    assert data["lines"]["merge"] == {"method": "ties", "params": {"density": 0.2}, "alpha_auto": True}
    assert data["lines"]["alpha"] == 0.375
    assert data["lines"]["finetuned"] == [
        {"path": "org/bert-sst2", "hub_id": "org/bert-sst2", "revision": "v2"},
        {"path": "/local/bert-mnli"},
    ]
    assert "`ties` (density=0.2)" in card.text
    assert "computed automatically" in card.text


def test_adapter_card_lists_only_base():
    config = LiNeSConfig(alpha=0.0, beta=1.0)
    finetuned = [{"path": "org/llama-lora", "hub_id": "org/llama-lora", "revision": None}]
    base = {"path": "meta-llama/Llama-3.2-1B", "hub_id": "meta-llama/Llama-3.2-1B", "revision": None}
    record = make_record("adapter", alpha=0.0, beta=1.0, base=base, finetuned=finetuned)

    data = build_model_card(config, record).data.to_dict()

    assert data["base_model"] == ["meta-llama/Llama-3.2-1B"]
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    assert data["lines"]["finetuned"] == [{"path": "org/llama-lora", "hub_id": "org/llama-lora"}]


@pytest.mark.parametrize(
    ("base_hub", "finetuned_hub", "expected_ids", "relation"),
    [
        (None, None, None, None),
        ("org/base", None, ["org/base"], "finetune"),
        (None, "org/ft", ["org/ft"], "finetune"),
        ("org/base", "org/ft", ["org/base", "org/ft"], "merge"),
    ],
)
def test_edit_relation_follows_known_ids(base_hub, finetuned_hub, expected_ids, relation):
    base = {"path": base_hub or "/local/base", "hub_id": base_hub, "revision": None}
    finetuned = [{"path": finetuned_hub or "/local/ft", "hub_id": finetuned_hub, "revision": None}]
    record = make_record(base=base, finetuned=finetuned)

    data = build_model_card(LiNeSConfig(alpha=0.2, beta=0.8), record).data.to_dict()

    assert data.get("base_model") == expected_ids
    assert data.get("base_model_relation") == relation


def test_cache_snapshot_path_names_repo():
    base = {"path": "/home/u/.cache/huggingface/hub/models--google-bert--bert-base-uncased/snapshots/86b5e", "hub_id": None}
    record = make_record(base=base)

    data = build_model_card(LiNeSConfig(alpha=0.2, beta=0.8), record).data.to_dict()

    assert data["base_model"] == ["google-bert/bert-base-uncased"]


FINETUNED_CARD = """---
license: apache-2.0
language:
- en
datasets:
- glue
tags:
- text-classification
base_model: google-bert/bert-base-uncased
model-index:
- name: bert-sst2
  results: []
---

# bert-sst2

Fine-tuned on SST-2 for 3 epochs. Accuracy 0.92.
"""


def test_finetuned_card_kept_below(tmp_path):
    config = LiNeSConfig(alpha=0.2, beta=0.8)

    write_model_card(tmp_path, config, make_record(), finetuned_card=FINETUNED_CARD)
    card = load_back(tmp_path)
    data = card.data.to_dict()

    # Our sections come first, and the fine-tune's body follows under its own heading.
    heading = card.text.index(f"## {FINETUNED_CARD_HEADING}")
    assert card.text.index("## Scale per block") < heading
    assert card.text.index("Fine-tuned on SST-2 for 3 epochs. Accuracy 0.92.") > heading
    assert "# bert-sst2" in card.text[heading:]
    assert "model-index" not in card.content.split("---")[1]
    # Metadata that still applies is merged in, but base_model is ours.
    assert data["license"] == "apache-2.0"
    assert data["language"] == ["en"]
    assert data["datasets"] == ["glue"]
    assert data["tags"] == ["lines", "text-classification"]
    assert data["base_model"] == ["google-bert/bert-base-uncased"]


def test_finetuned_card_from_readme_in_folder(tmp_path):
    (tmp_path / "README.md").write_text(FINETUNED_CARD, encoding="utf-8")

    write_model_card(tmp_path, LiNeSConfig(alpha=0.2, beta=0.8), make_record())
    card = load_back(tmp_path)

    assert card.text.count(f"## {FINETUNED_CARD_HEADING}") == 1
    assert "Fine-tuned on SST-2" in card.text

    # Writing again over our own card does not nest it.
    write_model_card(tmp_path, LiNeSConfig(alpha=0.2, beta=0.8), make_record())
    assert FINETUNED_CARD_HEADING not in load_back(tmp_path).text


def test_unfilled_template_in_folder_dropped(tmp_path):
    template = "---\nlibrary_name: peft\n---\n# Model Card for Model ID\n\n" + "- **Developed by:** [More Information Needed]\n" * 8
    (tmp_path / "README.md").write_text(template, encoding="utf-8")

    write_model_card(tmp_path, LiNeSConfig(alpha=0.2, beta=0.8), make_record())

    assert "[More Information Needed]" not in load_back(tmp_path).text


def test_merge_cards_disagreeing_license(tmp_path, caplog):
    finetuned = [{"path": "org/a", "hub_id": "org/a"}, {"path": "org/b", "hub_id": "org/b"}]
    record = make_record("merge", finetuned=finetuned, merge={"method": "task_arithmetic", "params": {}})
    cards = ["---\nlicense: mit\nlanguage: en\n---\n# A\n\nCard A.", "---\nlicense: apache-2.0\nlanguage: de\n---\n# B\n\nCard B."]

    with caplog.at_level(logging.WARNING, logger="lines_hf.card"):
        write_model_card(tmp_path, LiNeSConfig(beta=0.5), record, finetuned_card=cards)
    card = load_back(tmp_path)
    data = card.data.to_dict()

    assert "license" not in data
    assert data["language"] == ["en", "de"]
    assert "disagree on license" in caplog.text
    assert f"## {FINETUNED_CARD_HEADING} `org/a`" in card.text
    assert f"## {FINETUNED_CARD_HEADING} `org/b`" in card.text
    assert card.text.index("Card A.") < card.text.index("Card B.")


def test_plot_written_as_png(tmp_path):
    write_model_card(tmp_path, LiNeSConfig(alpha=0.2, beta=0.8), make_record())

    plot = tmp_path / PLOT_NAME
    assert plot.is_file()
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_card_without_matplotlib(tmp_path, monkeypatch, caplog):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    with caplog.at_level(logging.WARNING, logger="lines_hf.plot"):
        write_model_card(tmp_path, LiNeSConfig(alpha=0.2, beta=0.8), make_record())
    card = load_back(tmp_path)

    assert not (tmp_path / PLOT_NAME).exists()
    assert PLOT_NAME not in card.text
    assert "matplotlib is not installed" in caplog.text
    assert len(table_rows(card.text)) == 4


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("lines-hf edit --token hf_abc --alpha 1", "lines-hf edit --token <token> --alpha 1"),
        ("lines-hf edit --token=secret --alpha 1", "lines-hf edit --token=<token> --alpha 1"),
        ("LiNeSEditor.push_to_hub(m, 'me/x', token='secret')", "LiNeSEditor.push_to_hub(m, 'me/x', token='<token>')"),
        ("HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz lines-hf edit", "HF_TOKEN=<token> lines-hf edit"),
        ("lines-hf edit --alpha 1", "lines-hf edit --alpha 1"),
    ],
)
def test_redact_command(command, expected):
    assert redact_command(command) == expected


def test_card_never_contains_token(tmp_path):
    record = make_record(command="lines-hf edit --base b --finetuned f --token hf_abcdefghijklmnopqrstuvwxyz12")

    write_model_card(tmp_path, LiNeSConfig(alpha=0.2, beta=0.8), record)

    assert "hf_abcdefghijklmnopqrstuvwxyz12" not in (tmp_path / "README.md").read_text()


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="record kind"):
        build_model_card(LiNeSConfig(alpha=0.2, beta=0.8), make_record("quantize"))


# --------------------------------------------------------------------------- real tiny edits


def test_tiny_bert_streaming_edit_card(tmp_path):
    from lines_hf import LiNeSEditor
    from tiny import save_pair

    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    (tuned_dir / "README.md").write_text(FINETUNED_CARD, encoding="utf-8")
    config = LiNeSConfig(alpha=0.25, beta=0.5)
    plan = LiNeSEditor.plan(tuned_dir, base_dir, config)

    output = LiNeSEditor.edit_folder(tuned_dir, base_dir, tmp_path / "out", config, progress=False)
    card = load_back(output)
    data = card.data.to_dict()

    # Both inputs are local folders: no Hub ids, the paths go in the lines mapping.
    assert "base_model" not in data
    assert "base_model_relation" not in data
    assert data["lines"]["base_model"]["path"] == str(base_dir)
    assert data["lines"]["finetuned"] == [{"path": str(tuned_dir)}]
    assert data["lines"]["alpha"] == 0.25
    assert data["lines"]["beta"] == 0.5
    assert data["lines"]["depths"] == {name: info.depth for name, info in plan.layer_map.stacks.items()}
    assert data["license"] == "apache-2.0"

    rows = table_rows(card.text)
    expected = [(name, i, s) for name, scales in plan.stack_scales().items() for i, s in enumerate(scales)]
    assert [(stack, block) for stack, block, _ in rows] == [(stack, block) for stack, block, _ in expected]
    assert [scale for _, _, scale in rows] == pytest.approx([scale for _, _, scale in expected], rel=1e-5)
    assert "Fine-tuned on SST-2" in card.text

    # lines_config.json stores the settings that re-run the edit.
    assert LiNeSConfig.from_pretrained(output) == config
    stored = json.loads((output / CONFIG_NAME).read_text())
    assert stored["resolved"]["stacks"] == plan.summary()["stacks"]
    assert (output / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC


def test_tiny_bert_in_memory_edit_card(tmp_path):
    from lines_hf import LiNeSEditor
    from tiny import save_pair

    base_dir, tuned_dir = save_pair(tmp_path, "bert")
    config = LiNeSConfig(gamma=0.4, non_block_scale="base")

    model = LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, config=config, progress=False)
    output = LiNeSEditor.save_pretrained(model, tmp_path / "out")
    card = load_back(output)
    lines = card.data.to_dict()["lines"]

    assert lines["gamma"] == 0.4
    assert lines["alpha"] == pytest.approx(0.4)
    assert lines["beta"] == pytest.approx(0.6)
    assert lines["non_block_scale"] == {"policy": "base", "value": 0.0}
    assert "reset to their pre-trained values" in card.text
    assert "```python\nLiNeSEditor.from_pretrained(" in card.text
    rows = table_rows(card.text)
    assert [scale for _, _, scale in rows] == pytest.approx(linear_scales(3, 0.4, 0.6), rel=1e-5)


def save_merge_inputs(root):
    """Save a tiny BERT base and two fine-tunes made with different noise."""
    from tiny import make_model, perturb

    base = make_model("bert")
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tuned_dirs = []
    for seed in (1, 2):
        tuned_dir = root / f"task{seed}"
        perturb(base, seed=seed).save_pretrained(tuned_dir)
        tuned_dirs.append(tuned_dir)
    return base_dir, tuned_dirs


def test_tiny_bert_merge_card(tmp_path):
    from lines_hf.merge import merge_folders

    base_dir, tuned_dirs = save_merge_inputs(tmp_path)
    (tuned_dirs[0] / "README.md").write_text(FINETUNED_CARD, encoding="utf-8")

    output = merge_folders(
        tuned_dirs, base_dir, tmp_path / "out", LiNeSConfig(beta=0.5), method="ties", density=0.2, progress=False
    )
    card = load_back(output)
    data = card.data.to_dict()
    record = json.loads((output / CONFIG_NAME).read_text())["resolved"]

    assert data["tags"][:2] == ["lines", "merge"]
    assert data["library_name"] == "transformers"
    assert "base_model" not in data
    assert data["lines"]["kind"] == "merge"
    assert data["lines"]["merge"]["method"] == "ties"
    assert data["lines"]["merge"]["params"]["density"] == 0.2
    assert data["lines"]["merge"]["alpha_auto"] is True
    assert data["lines"]["alpha"] == record["alpha"]
    assert data["lines"]["beta"] == 0.5
    assert [f["path"] for f in data["lines"]["finetuned"]] == [str(d) for d in tuned_dirs]
    rows = table_rows(card.text)
    assert [scale for _, _, scale in rows] == pytest.approx(linear_scales(3, record["alpha"], 0.5), rel=1e-5)
    assert "merges 2 fine-tuned models" in card.text
    assert "Fine-tuned on SST-2" in card.text


def test_tiny_merge_baseline_card(tmp_path):
    from lines_hf.merge import merge_folders

    base_dir, tuned_dirs = save_merge_inputs(tmp_path)

    output = merge_folders(tuned_dirs, base_dir, tmp_path / "out", LiNeSConfig(), lines=False, scale=0.3, progress=False)
    card = load_back(output)

    assert card.data.to_dict()["lines"]["merge"]["lines"] is False
    assert "scaled by 0.3 in every tensor, without LiNeS" in card.text
    assert card.text.startswith("\n# Merge of 2 fine-tuned models")


def tiny_lora(arch="llama"):
    from peft import LoraConfig, get_peft_model
    from tiny import make_model

    import torch

    base = make_model(arch)
    torch.manual_seed(5)
    return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_adapter_card_drops_peft_template(tmp_path):
    from lines_hf import LiNeSEditor

    edited = LiNeSEditor.from_pretrained(tiny_lora(), config=LiNeSConfig(alpha=0.2, beta=0.8))
    output = LiNeSEditor.save_pretrained(edited, tmp_path / "out")
    card = load_back(output)
    data = card.data.to_dict()

    assert data["library_name"] == "peft"
    assert "lora" in data["tags"]
    assert data["lines"]["adapter"]["merged"] is False
    assert "module_scales" not in data["lines"]["adapter"]
    assert "[More Information Needed]" not in card.text
    assert FINETUNED_CARD_HEADING not in card.text
    assert [scale for _, _, scale in table_rows(card.text)] == pytest.approx(linear_scales(4, 0.2, 0.8), rel=1e-5)


def test_merged_adapter_card(tmp_path):
    from lines_hf import LiNeSEditor

    edited = LiNeSEditor.from_pretrained(tiny_lora(), config=LiNeSConfig(alpha=0.2, beta=0.8), merge=True)
    output = LiNeSEditor.save_pretrained(edited, tmp_path / "out")
    card = load_back(output)
    data = card.data.to_dict()

    assert data["library_name"] == "transformers"
    assert data["lines"]["adapter"]["merged"] is True
    assert "merged in after LiNeS" in card.text
    assert not any(path.name.startswith("adapter_") for path in output.iterdir())


def test_relation_of_merged_adapter():
    base = {"path": "org/llama", "hub_id": "org/llama"}
    finetuned = [{"path": "org/llama-lora", "hub_id": "org/llama-lora"}]
    record = make_record("adapter", base=base, finetuned=finetuned, adapter={"peft_type": "LORA", "merged": True})
    record["library_name"] = "transformers"

    data = build_model_card(LiNeSConfig(alpha=0.2, beta=0.8), record).data.to_dict()

    assert data["base_model"] == ["org/llama"]
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers"


# --------------------------------------------------------------------------- plot in a child process


def test_plot_child_matches_in_process(tmp_path):
    record = make_record()
    (tmp_path / "here").mkdir()
    (tmp_path / "child").mkdir()
    draw_scales(record, tmp_path / "here" / PLOT_NAME)
    with ScalePlot(record, tmp_path / "child" / PLOT_NAME) as plot:
        assert plot._process is not None  # drawn by a child process, not here
        path = plot.result()
    assert path == tmp_path / "child" / PLOT_NAME
    assert path.read_bytes() == (tmp_path / "here" / PLOT_NAME).read_bytes()


def test_card_links_background_plot(tmp_path):
    record = make_record()
    with ScalePlot(record, tmp_path / PLOT_NAME) as plot:
        write_model_card(tmp_path, LiNeSConfig(alpha=0.2, beta=0.8), record, plot=plot)
    assert (tmp_path / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    assert f"]({PLOT_NAME})" in load_back(tmp_path).text


def test_plot_failure_drops_only_plot(tmp_path, caplog):
    record = make_record()
    missing = tmp_path / "no-such-folder" / PLOT_NAME
    with caplog.at_level(logging.WARNING, logger="lines_hf.plot"), ScalePlot(record, missing) as plot:
        assert plot.result() is None
    assert "drawing the scale plot failed (exit status 1)" in caplog.text
    assert "No such file or directory" in caplog.text


def test_background_plot_stopped_on_error(tmp_path):
    with pytest.raises(KeyboardInterrupt), ScalePlot(make_record(), tmp_path / PLOT_NAME) as plot:
        process = plot._process
        raise KeyboardInterrupt
    assert process.poll() is not None
    assert not (tmp_path / PLOT_NAME).exists()


def test_background_plot_without_matplotlib(tmp_path, monkeypatch, caplog):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    with caplog.at_level(logging.WARNING, logger="lines_hf.plot"), ScalePlot(make_record(), tmp_path / PLOT_NAME) as plot:
        assert plot.result() is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / PLOT_NAME).exists()


def test_background_plot_skipped_without_blocks(tmp_path):
    record = {**make_record(), "stacks": {}}
    with ScalePlot(record, tmp_path / PLOT_NAME) as plot:
        assert plot.result() is None
    assert not (tmp_path / PLOT_NAME).exists()


def test_plot_stopped_on_interrupted_wait(tmp_path, monkeypatch):
    """Ctrl-C while result() waits for the child stops the child too (it has a session of its own)."""
    plot = ScalePlot(make_record(), tmp_path / PLOT_NAME)
    process = plot._process

    def interrupted_wait(timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(process, "wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt), plot:
        plot.result()
    monkeypatch.undo()
    assert process.wait(timeout=10) is not None
    assert process.returncode < 0  # killed, not finished
    assert not (tmp_path / PLOT_NAME).exists()


def test_plot_ignores_working_directory_modules(tmp_path, monkeypatch):
    """A lines_hf/ or matplotlib.py in the working directory never runs in the plot process."""
    trap = tmp_path / "cwd"
    (trap / "lines_hf").mkdir(parents=True)
    (trap / "lines_hf" / "__init__.py").write_text("raise RuntimeError('imported from the working directory')\n")
    (trap / "matplotlib.py").write_text("raise RuntimeError('imported from the working directory')\n")
    monkeypatch.chdir(trap)
    monkeypatch.setenv("PYTHONPATH", str(trap))
    with ScalePlot(make_record(), tmp_path / PLOT_NAME) as plot:
        path = plot.result()
    assert path is not None
    assert path.read_bytes()[:8] == PNG_MAGIC
