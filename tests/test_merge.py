"""The streaming merge driver against direct in-memory computations on flattened vectors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lines_hf import LiNeSConfig
from lines_hf.errors import ArchitectureMismatchError, ConfigError
from lines_hf.merge import load_task_model, merge_folders
from lines_hf.merging import dare_key, dare_uniform
from tiny import make_model, perturb, tiny_config

NUM_TASKS = 3
DEPTH = 3  # tiny BERT blocks


def _save_tasks(root: Path, num_tasks: int = NUM_TASKS) -> tuple[Path, list[Path]]:
    """Save a bare BertModel base and fine-tunes with task heads of different sizes."""
    base = make_model("bert", model_class="BertModel")
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tuned_dirs = []
    for task in range(num_tasks):
        torch.manual_seed(100 + task)
        model = transformers.BertForSequenceClassification(tiny_config("bert", num_labels=task + 2))
        model.bert.load_state_dict(base.state_dict())
        tuned = perturb(model, seed=task + 1, scale=0.05)
        folder = root / f"task{task}"
        tuned.save_pretrained(folder)
        tuned_dirs.append(folder)
    return base_dir, tuned_dirs


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[Path, list[Path]]:
    return _save_tasks(tmp_path_factory.mktemp("merge"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _pool(base_dir: Path, tuned_dirs: list[Path]) -> tuple[list[str], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Return the fine-tune names that have a base tensor, the base and each task's task vectors."""
    base = _weights(base_dir)
    tuned = [_weights(d) for d in tuned_dirs]
    names = [n for n in tuned[0] if n.removeprefix("bert.") in base and tuned[0][n].is_floating_point()]
    taus = [{n: t[n].float() - base[n.removeprefix("bert.")].float() for n in names} for t in tuned]
    return names, {n: base[n.removeprefix("bert.")] for n in names}, taus


def _flat(taus: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([taus[n].reshape(-1) for n in names])


def _unflat(vector: torch.Tensor, names: list[str], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in names:
        numel = like[name].numel()
        out[name] = vector[offset : offset + numel].reshape(like[name].shape)
        offset += numel
    return out


def _direct_ties(stacked: torch.Tensor) -> torch.Tensor:
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    return torch.where(count > 0, (stacked * agree).sum(0) / count.clamp(min=1), torch.zeros(()))


def _direct_topk(vector: torch.Tensor, density: float) -> torch.Tensor:
    d = vector.numel()
    k = d - int(density * d)
    threshold = torch.kthvalue(vector.abs(), k).values
    return vector * (vector.abs() >= threshold)


def _direct_merge(method: str, names, taus, **params) -> dict[str, torch.Tensor]:
    """Compute the merged task vector on whole flattened vectors, straight from the formulas."""
    flats = torch.stack([_flat(t, names) for t in taus])
    if method == "task_arithmetic":
        merged = flats.sum(0)
    elif method == "ties":
        if params.get("ties_trim", "global") == "global":
            trimmed = torch.stack([_direct_topk(row, params.get("density", 0.2)) for row in flats])
        else:
            per_tensor = [
                {n: _direct_topk(t[n].reshape(-1), params.get("density", 0.2)).reshape(t[n].shape) for n in names}
                for t in taus
            ]
            trimmed = torch.stack([_flat(t, names) for t in per_tensor])
        merged = _direct_ties(trimmed)
    elif method == "consensus":
        total = flats.sum(0)
        masks = flats.abs() >= params.get("consensus_lam", 0.4) * (total - flats).abs()
        merged = total * (masks.sum(0) >= params.get("consensus_k", 2))
    else:
        p = params.get("drop_rate", 0.5)
        dropped = []
        for task, t in enumerate(taus):
            parts = []
            for n in names:
                uniform = dare_uniform(dare_key(params.get("seed", 0), n.removeprefix("bert."), task), 0, t[n].numel())
                parts.append(t[n].reshape(-1) * (uniform >= p) / (1 - p))
            dropped.append(torch.cat(parts))
        stacked = torch.stack(dropped)
        merged = stacked.sum(0) if method == "dare_linear" else _direct_ties(stacked)
    return _unflat(merged, names, taus[0])


def _lines_scale(name: str, alpha: float, beta: float) -> float:
    parts = name.split(".")
    if "layer" in parts:
        block = int(parts[parts.index("layer") + 1])
        return alpha + beta * block / (DEPTH - 1)
    return alpha


def _direct_alpha(names, taus, merged) -> float:
    total = sum(_flat(t, names) for t in taus)
    return float(total.abs().sum(dtype=torch.float64)) / (len(taus) * float(_flat(merged, names).abs().sum(dtype=torch.float64)))


METHOD_CASES = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.3, "ties_trim": "per_tensor"}),
    ("consensus", {"consensus_lam": 0.4, "consensus_k": 2}),
    ("dare_linear", {"drop_rate": 0.3, "seed": 7}),
    ("dare_ties", {"drop_rate": 0.5, "seed": 3}),
]


@pytest.mark.parametrize(("method", "params"), METHOD_CASES, ids=[f"{m}-{p.get('ties_trim', '')}" for m, p in METHOD_CASES])
def test_method_matches_direct_formula(tasks, tmp_path, method, params):
    base_dir, tuned_dirs = tasks
    beta = 0.7
    out = merge_folders(
        tuned_dirs, base_dir, tmp_path / "out", LiNeSConfig(beta=beta), method=method, progress=False,
        chunk_elements=1000, **params,
    )
    names, base, taus = _pool(base_dir, tuned_dirs)
    merged = _direct_merge(method, names, taus, **params)
    alpha = _direct_alpha(names, taus, merged)

    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert record["beta"] == beta
    assert record["merge"]["method"] == method

    weights = _weights(out)
    for name in names:
        expected = base[name] + _lines_scale(name, record["alpha"], beta) * merged[name]
        torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_task_arithmetic_auto_alpha_is_one_over_t(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    out = merge_folders(tuned_dirs, base_dir, tmp_path / "out", LiNeSConfig(beta=0.5), progress=False)
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["alpha"] == 1.0 / NUM_TASKS
    assert record["merge"]["alpha_auto"] is True
    assert record["stacks"]["bert.encoder.layer"]["scales"][0] == 1.0 / NUM_TASKS


def test_baseline_uses_one_global_scale(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    out = merge_folders(
        tuned_dirs, base_dir, tmp_path / "out", method="consensus", lines=False, scale=0.3, progress=False
    )
    names, base, taus = _pool(base_dir, tuned_dirs)
    merged = _direct_merge("consensus", names, taus)
    weights = _weights(out)
    for name in names:
        torch.testing.assert_close(weights[name], base[name] + 0.3 * merged[name], rtol=1e-5, atol=1e-6)
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["merge"]["lines"] is False
    assert record["merge"]["scale"] == 0.3


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_single_model_merge_equals_edit(tasks, tmp_path, method):
    from lines_hf.editor import LiNeSEditor

    base_dir, tuned_dirs = tasks
    config = LiNeSConfig(alpha=0.4, beta=0.5)
    merged = merge_folders(
        tuned_dirs[:1], base_dir, tmp_path / "merged", config, method=method, density=1.0, progress=False
    )
    edited = LiNeSEditor.edit_folder(tuned_dirs[0], base_dir, tmp_path / "edited", config, progress=False)
    merged_weights, edited_weights = _weights(merged), _weights(edited)
    assert set(edited_weights) - set(merged_weights) == {"classifier.weight", "classifier.bias"}
    for name, tensor in merged_weights.items():
        torch.testing.assert_close(tensor, edited_weights[name], rtol=0, atol=1e-7, msg=name)


def test_single_model_merge_warns(tasks, tmp_path, caplog):
    base_dir, tuned_dirs = tasks
    with caplog.at_level(logging.WARNING, logger="lines_hf.merge"):
        merge_folders(tuned_dirs[:1], base_dir, tmp_path / "merged", LiNeSConfig(alpha=0.4, beta=0.5), progress=False)
    assert "Merging a single model" in caplog.text
    assert "lines-hf edit" in caplog.text


def test_duplicate_model_warns(tasks, tmp_path, caplog):
    base_dir, tuned_dirs = tasks
    link = tmp_path / "same-model"
    link.symlink_to(tuned_dirs[0], target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="lines_hf.merge"):
        merge_folders([tuned_dirs[0], tuned_dirs[1], link], base_dir, tmp_path / "merged",
                      LiNeSConfig(alpha=0.4, beta=0.5), progress=False)
    assert f"{link} is given twice (also as {tuned_dirs[0]})" in caplog.text
    assert "single model" not in caplog.text


def test_base_as_merge_input_warns(tasks, tmp_path, caplog):
    base_dir, tuned_dirs = tasks
    with caplog.at_level(logging.WARNING, logger="lines_hf.merge"):
        merge_folders([tuned_dirs[0], base_dir], base_dir, tmp_path / "merged", LiNeSConfig(alpha=0.4, beta=0.5),
                      progress=False)
    assert f"{base_dir} is the base model" in caplog.text


def test_distinct_models_do_not_warn(tasks, tmp_path, caplog):
    base_dir, tuned_dirs = tasks
    with caplog.at_level(logging.WARNING, logger="lines_hf.merge"):
        merge_folders(tuned_dirs, base_dir, tmp_path / "merged", LiNeSConfig(alpha=0.4, beta=0.5), progress=False)
    assert "given twice" not in caplog.text
    assert "single model" not in caplog.text
    assert "is the base model" not in caplog.text


def test_dare_is_reproducible_and_chunk_independent(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    runs = {}
    for label, seed, chunk in [("a", 5, 777), ("b", 5, 1 << 20), ("c", 6, 777)]:
        out = merge_folders(
            tuned_dirs, base_dir, tmp_path / label, LiNeSConfig(alpha=0.5, beta=0.5), method="dare_ties",
            seed=seed, progress=False, chunk_elements=chunk,
        )
        runs[label] = _weights(out)
    name = "bert.encoder.layer.1.attention.self.query.weight"
    for key in runs["a"]:
        assert torch.equal(runs["a"][key], runs["b"][key]), key
    assert not torch.equal(runs["a"][name], runs["c"][name])


def test_heads_saved_beside_backbone(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    out = merge_folders(tuned_dirs, base_dir, tmp_path / "out", LiNeSConfig(beta=0.5), progress=False)
    assert "classifier.weight" not in _weights(out)
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["merge"]["models"] == ["task0", "task1", "task2"]
    assert list(record["merge"]["heads"]["folders"]) == ["task0", "task1", "task2"]

    for task, tuned_dir in enumerate(tuned_dirs):
        head_dir = out / "heads" / f"{task}-task{task}"
        head = _weights(head_dir)
        assert set(head) == {"classifier.weight", "classifier.bias"}
        assert head["classifier.weight"].shape == (task + 2, 32)
        assert torch.equal(head["classifier.weight"], _weights(tuned_dir)["classifier.weight"])

    model = load_task_model(out, out / "heads" / "2-task2")
    assert model.config.num_labels == 4
    assert torch.equal(model.classifier.weight.detach(), _weights(tuned_dirs[2])["classifier.weight"])
    merged = _weights(out)
    assert torch.equal(model.bert.encoder.layer[2].output.dense.weight.detach(), merged["bert.encoder.layer.2.output.dense.weight"])

    loaded = transformers.AutoModel.from_pretrained(out)
    assert torch.equal(loaded.encoder.layer[0].attention.self.query.weight.detach(), merged["bert.encoder.layer.0.attention.self.query.weight"])
    # Without heads in the merged folder, its config names the base's classes, not the first task's.
    base_architectures = json.loads((base_dir / "config.json").read_text())["architectures"]
    assert base_architectures == ["BertModel"]
    assert json.loads((out / "config.json").read_text()).get("architectures") == base_architectures
    assert json.loads((head_dir / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


def test_heads_dropped_on_request(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    out = merge_folders(tuned_dirs, base_dir, tmp_path / "out", LiNeSConfig(beta=0.5), heads="drop", progress=False)
    assert not (out / "heads").exists()


def test_record_lists_method_params_and_models(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    out = merge_folders(
        tuned_dirs[::-1], base_dir, tmp_path / "out", LiNeSConfig(beta=1.0), method="ties", density=0.1, progress=False
    )
    saved = json.loads((out / "lines_config.json").read_text())
    record = saved["resolved"]
    assert record["kind"] == "merge"
    assert record["merge"]["params"] == {"density": 0.1, "ties_trim": "global"}
    assert record["merge"]["models"] == ["task2", "task1", "task0"]
    assert [entry["path"] for entry in record["inputs"]["finetuned"]] == [str(d) for d in tuned_dirs[::-1]]
    assert saved["alpha"] == record["alpha"]
    assert saved["beta"] == 1.0
    assert record["merge"]["l1_norms"]["merged_l1"] > 0
    card = (out / "README.md").read_text()
    assert "`ties` (density=0.1, ties_trim=global)" in card
    assert "`task2`, `task1`, `task0`" in card


def test_mismatched_depth_is_rejected(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    deeper = make_model("bert", num_hidden_layers=4)
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(ArchitectureMismatchError, match=r"'deeper'.*bert\.encoder\.layer\.3"):
        merge_folders(
            [tuned_dirs[0], tmp_path / "deeper"], base_dir, tmp_path / "out", LiNeSConfig(beta=0.5), progress=False
        )
    assert not (tmp_path / "out").exists()


def test_mismatched_width_is_rejected(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    wider = make_model("bert", intermediate_size=48)
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ArchitectureMismatchError, match=r"'wider'.*intermediate\.dense\.\w+' has shape \[48\]"):
        merge_folders(
            [tuned_dirs[0], tmp_path / "wider"], base_dir, tmp_path / "out", LiNeSConfig(beta=0.5), progress=False
        )


def test_missing_beta_is_rejected(tasks, tmp_path):
    base_dir, tuned_dirs = tasks
    with pytest.raises(ConfigError, match="needs beta"):
        merge_folders(tuned_dirs, base_dir, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="global scale"):
        merge_folders(tuned_dirs, base_dir, tmp_path / "out2", lines=False, progress=False)


def _save_lora(folder: Path, base: torch.nn.Module, seed: int, **lora_kwargs):
    """Save a LoRA adapter of a task model built on ``base`` with random (non-zero) B factors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(tiny_config("bert", num_labels=3))
    model.bert.load_state_dict(base.state_dict())
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value", "dense"], **lora_kwargs)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(folder)
    deltas = {}
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            name = module_name.removeprefix("base_model.model.bert.") + ".weight"
            deltas[name] = module.get_delta_weight("default").detach().float()
    return deltas


def test_lora_adapters_merge_in_weight_space(tmp_path):
    base = make_model("bert", model_class="BertModel")
    base.save_pretrained(tmp_path / "base")
    first = _save_lora(tmp_path / "lora0", base, 1, r=4, lora_alpha=8, rank_pattern={"layer.1.attention.self.query": 2})
    second = _save_lora(tmp_path / "lora1", base, 2, r=2, lora_alpha=4, use_rslora=True)
    assert len(first) > 6
    assert set(first) == set(second)

    out = merge_folders(
        [tmp_path / "lora0", tmp_path / "lora1"], tmp_path / "base", tmp_path / "out",
        LiNeSConfig(alpha=0.5, beta=0.5), progress=False,
    )
    weights = _weights(out)
    base_weights = _weights(tmp_path / "base")
    for name, delta in first.items():
        expected = base_weights[name] + _lines_scale(name, 0.5, 0.5) * (delta + second[name])
        torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    untouched = "encoder.layer.0.attention.self.key.weight"
    assert torch.equal(weights[untouched], base_weights[untouched])

    head = _weights(out / "heads" / "1-lora1")
    assert set(head) == {"classifier.weight", "classifier.bias"}
    model = transformers.AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == DEPTH


def test_lora_dora_is_rejected(tmp_path):
    from lines_hf.errors import UnsupportedAdapterError

    base = make_model("bert", model_class="BertModel")
    base.save_pretrained(tmp_path / "base")
    _save_lora(tmp_path / "dora", base, 1, r=2, lora_alpha=4, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        merge_folders([tmp_path / "dora"], tmp_path / "base", tmp_path / "out", LiNeSConfig(beta=0.5), progress=False)


def test_editor_merge_in_memory_matches_folder_merge(tasks, tmp_path):
    from lines_hf.editor import LiNeSEditor

    base_dir, tuned_dirs = tasks
    model = LiNeSEditor.merge(tuned_dirs, base_model=base_dir, method="ties", beta=0.6)
    folder = merge_folders(tuned_dirs, base_dir, tmp_path / "out", LiNeSConfig(beta=0.6), method="ties", progress=False)
    state = model.state_dict()
    for name, tensor in _weights(folder).items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert model.lines_record["merge"]["method"] == "ties"
    assert set(model.lines_heads) == {"task0", "task1", "task2"}
    assert model.lines_heads["task1"]["classifier.weight"].shape == (3, 32)


def test_editor_merge_chooses_beta_on_validation(tasks):
    from lines_hf.editor import LiNeSEditor

    base_dir, tuned_dirs = tasks
    target = _weights(tuned_dirs[0])["bert.encoder.layer.2.output.dense.weight"]
    seen = []

    def evaluate(model):
        # A stand-in accuracy that peaks when the last block is closest to task 0's fine-tune.
        weight = model.bert.encoder.layer[2].output.dense.weight.detach()
        seen.append(weight.clone())
        return {"a": 1.0 / (1.0 + float((weight - target).abs().sum()))}

    model = LiNeSEditor.merge(
        tuned_dirs, base_model=base_dir, evaluate=evaluate, finetuned_accuracy={"a": 1.0}, grid=[0.0, 0.5, 1.0, 3.0]
    )
    selection = model.lines_record["merge"]["selection"]
    assert selection["parameter"] == "beta"
    assert len(seen) == 4
    best = max(selection["points"], key=selection["points"].get)
    assert float(best) == selection["chosen"] == model.lines_record["beta"]
    assert model.lines_record["alpha"] == 1.0 / NUM_TASKS


def test_cli_merge_writes_folder(tasks, tmp_path):
    from lines_hf.cli import main

    base_dir, tuned_dirs = tasks
    out = tmp_path / "cli-out"
    status = main(
        ["merge", "--base", str(base_dir), "--models", *map(str, tuned_dirs), "--method", "ties", "--density", "0.3",
         "--ties-trim", "per_tensor", "--beta", "0.8", "--output", str(out), "--no-progress"]
    )
    assert status == 0
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["merge"]["params"] == {"density": 0.3, "ties_trim": "per_tensor"}
    assert record["command"].startswith("lines-hf merge --base")
    reference = merge_folders(
        tuned_dirs, base_dir, tmp_path / "py-out", LiNeSConfig(beta=0.8), method="ties", density=0.3,
        ties_trim="per_tensor", progress=False,
    )
    for name, tensor in _weights(reference).items():
        assert torch.equal(_weights(out)[name], tensor), name
    assert (out / "README.md").is_file()


def test_cli_merge_baseline_needs_scale(tasks, tmp_path, capsys):
    from lines_hf.cli import main

    base_dir, tuned_dirs = tasks
    status = main(["merge", "--base", str(base_dir), "--models", *map(str, tuned_dirs), "--no-lines",
                   "--output", str(tmp_path / "out"), "--no-progress"])
    assert status == 1
    assert "global scale" in capsys.readouterr().err


def test_cli_merge_dry_run_prints_scales(tasks, tmp_path, capsys):
    from lines_hf.cli import main

    base_dir, tuned_dirs = tasks
    status = main(["merge", "--base", str(base_dir), "--models", *map(str, tuned_dirs), "--beta", "0.5",
                   "--output", str(tmp_path / "out"), "--dry-run"])
    assert status == 0
    printed = capsys.readouterr().out
    assert f"alpha = {1 / NUM_TASKS:g}, beta = 0.5" in printed
    assert "bert.encoder.layer.2.output.dense.weight" in printed
    assert not (tmp_path / "out").exists()


def test_cli_merge_tasks_must_match_models(tasks, tmp_path, capsys):
    from lines_hf.cli import main

    base_dir, tuned_dirs = tasks
    status = main(["merge", "--base", str(base_dir), "--models", *map(str, tuned_dirs), "--tasks", "food_reviews",
                   "--output", str(tmp_path / "out"), "--no-progress"])
    assert status == 1
    assert "one task per model" in capsys.readouterr().err


def test_global_threshold_radix_path_is_exact(tasks, tmp_path, monkeypatch):
    import lines_hf.merge as merge_module

    base_dir, tuned_dirs = tasks
    windowed = merge_folders(tuned_dirs, base_dir, tmp_path / "window", LiNeSConfig(beta=0.5), method="ties",
                             progress=False, chunk_elements=999)
    monkeypatch.setattr(merge_module, "MAX_WINDOW", 0)  # every bracket is skipped, so radix selection runs
    radix = merge_folders(tuned_dirs, base_dir, tmp_path / "radix", LiNeSConfig(beta=0.5), method="ties",
                          progress=False, chunk_elements=999)
    for name, tensor in _weights(windowed).items():
        assert torch.equal(_weights(radix)[name], tensor), name
