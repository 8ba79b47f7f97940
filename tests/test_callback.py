"""LiNeSCallback on short real Trainer runs (CPU), checked against the editor applied after training."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from lines_hf import LiNeSCallback, LiNeSConfig, LiNeSEditor
from lines_hf.errors import ConfigError, UnsupportedAdapterError
from tiny import make_model

CONFIG = LiNeSConfig(alpha=0.3, beta=0.5)


class TokenData(torch.utils.data.Dataset):
    """Random token sequences with labels equal to the inputs (causal language modelling)."""

    def __init__(self, count: int = 16, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 100, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class CaptureBeforeEdit(TrainerCallback):
    """Keeps a copy of the trained model as it is before LiNeSCallback edits it (runs first)."""

    def __init__(self) -> None:
        self.trained = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trained = copy.deepcopy(model)
        return control


def training_args(output_dir, max_steps: int = 4, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def train(model, output_dir, callback, **overrides):
    capture = CaptureBeforeEdit()
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, **overrides),
        train_dataset=TokenData(),
        callbacks=[capture, callback],
    )
    return trainer, capture


def assert_same_state(actual, expected) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(actual_state[name], tensor), name


def test_full_model_matches_editor(tmp_path, caplog):
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    callback = LiNeSCallback(CONFIG)
    trainer, capture = train(model, tmp_path / "run", callback)

    with caplog.at_level(logging.INFO, logger="lines_hf"):
        trainer.train()

    # The trained weights moved, and the callback re-read the base from disk (no copy kept).
    assert callback._snapshot is None
    assert callback._base_dir == base_dir
    reference = LiNeSEditor.from_pretrained(capture.trained, base_model=str(base_dir), config=CONFIG)
    assert_same_state(model, reference)
    assert not torch.equal(model.model.layers[3].mlp.up_proj.weight, capture.trained.model.layers[3].mlp.up_proj.weight)
    assert "scales 0.3, 0.467, 0.633, 0.8" in caplog.text

    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "lines_config.json").read_text())
    assert saved["alpha"] == 0.3
    assert saved["resolved"]["stacks"]["model.layers"]["scales"][-1] == pytest.approx(0.8)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert_same_state(reloaded, reference)


def test_full_model_without_folder_snapshots(tmp_path):
    model = make_model("llama")  # built from a config: nothing on disk to re-read
    pretrained = copy.deepcopy(model)
    callback = LiNeSCallback(CONFIG)
    trainer, capture = train(model, tmp_path / "run", callback)
    assert callback._snapshot is not None  # taken in on_init_end, before any step

    trainer.train()

    reference = LiNeSEditor.from_pretrained(capture.trained, base_model=pretrained, config=CONFIG)
    assert_same_state(model, reference)


def test_resume_edits_against_pretrained(tmp_path):
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    run_dir = tmp_path / "run"

    first = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    trainer, _ = train(first, run_dir, LiNeSCallback(CONFIG), max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    assert (run_dir / "checkpoint-2").is_dir()

    # A fresh process would build the same Trainer and resume from the step-2 checkpoint.
    for snapshot_in_memory in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        pretrained = copy.deepcopy(model)
        if snapshot_in_memory:
            model.name_or_path = ""  # forces the in-memory copy path
        callback = LiNeSCallback(CONFIG)
        resumed, capture = train(model, run_dir, callback, max_steps=4, save_strategy="no")
        resumed.train(resume_from_checkpoint=str(run_dir / "checkpoint-2"))

        assert resumed.state.global_step == 4
        reference = LiNeSEditor.from_pretrained(capture.trained, base_model=pretrained, config=CONFIG)
        assert_same_state(model, reference)


def test_resume_without_pretrained_refused(tmp_path):
    model = make_model("llama")
    callback = LiNeSCallback(CONFIG)

    class State:
        global_step = 2

    with pytest.raises(ConfigError, match="resumes at step 2"):
        callback.on_train_begin(None, State(), None, model=model)


def test_lora_model_matches_editor(tmp_path):
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    callback = LiNeSCallback(CONFIG)
    trainer, capture = train(model, tmp_path / "run", callback)
    trainer.train()

    assert callback._snapshot is None
    assert callback._base_dir is None
    reference = LiNeSEditor.from_pretrained(capture.trained, config=CONFIG)
    assert_same_state(model, reference)
    # Training moved lora_B away from its zero initialisation, so the edit is not vacuous.
    trained_b = capture.trained.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.count_nonzero(trained_b) > 0

    trainer.save_model(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lines_config.json", "README.md"} <= files
    assert json.loads((tmp_path / "saved" / "lines_config.json").read_text())["resolved"]["kind"] == "adapter"
    reloaded = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "saved")
    ids = TokenData().ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_dora_refused_before_training(tmp_path):
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        train(model, tmp_path / "run", LiNeSCallback(CONFIG))


def test_config_without_schedule_refused():
    with pytest.raises(ConfigError, match="beta is not set"):
        LiNeSCallback(LiNeSConfig(alpha=0.5))


def test_explicit_base_folder_no_copy(tmp_path):
    model = make_model("llama")  # name_or_path is empty: only base_model= points at the weights
    model.save_pretrained(tmp_path / "base")
    callback = LiNeSCallback(CONFIG, base_model=tmp_path / "base", model=model)
    assert callback._snapshot is None
    assert callback._base_dir == tmp_path / "base"

    trainer, capture = train(model, tmp_path / "run", callback)
    trainer.train()

    reference = LiNeSEditor.from_pretrained(capture.trained, base_model=str(tmp_path / "base"), config=CONFIG)
    assert_same_state(model, reference)
