"""Base and fine-tune that do not fit: resized vocabularies, tied and untied heads, other architectures.

Each rejected case checks the error class, the values named in the message,
unchanged inputs and an empty output parent. Each accepted case checks the
output tensors against a reference computed here from the saved inputs.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lines_hf import (
    ArchitectureMismatchError,
    ConfigError,
    LiNeSConfig,
    LiNeSEditor,
    NonFiniteError,
    TensorMismatchError,
)
from lines_hf.cli import main as cli_main
from test_hostile import Guard, output_entries
from tiny import make_model, perturb

ALPHA, BETA = 0.25, 0.5
NEW_TOKENS = 8


def edit(base_dir, tuned_dir, out, **kwargs):
    kwargs.setdefault("alpha", ALPHA)
    kwargs.setdefault("beta", BETA)
    return LiNeSEditor.edit_folder(tuned_dir, base_dir, out, progress=False, **kwargs)


def saved(model, folder):
    model.save_pretrained(folder)
    return folder


def read_all(folder):
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def lerp(base, tuned, scale):
    return base + scale * (tuned - base)


# --------------------------------------------------------------------------- resized vocabulary


@pytest.fixture
def resized(tmp_path):
    """A llama base (vocab 100, untied head) and a fine-tune resized to 108 tokens."""
    base = make_model("llama")
    tuned = perturb(base)
    tuned.resize_token_embeddings(100 + NEW_TOKENS)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        tuned.model.embed_tokens.weight[100:] = torch.randn(NEW_TOKENS, 32, generator=generator)
        tuned.lm_head.weight[100:] = torch.randn(NEW_TOKENS, 32, generator=generator)
    (tmp_path / "outputs").mkdir()
    return saved(base, tmp_path / "base"), saved(tuned, tmp_path / "tuned"), tmp_path / "outputs"


def test_resized_vocab_rejected_by_default(resized):
    base_dir, tuned_dir, outputs = resized
    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(TensorMismatchError) as info:
        edit(base_dir, tuned_dir, outputs / "out")
    message = str(info.value)
    assert "[108, 32]" in message
    assert "[100, 32]" in message
    assert "--new-vocab-rows finetuned" in message
    assert "resize_token_embeddings" in message
    guard.check()
    assert output_entries(outputs) == []


def check_resized_output(tensors, base_dir, tuned_dir, scale):
    base, tuned = read_all(base_dir), read_all(tuned_dir)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        got = tensors[name]
        assert got.shape == (100 + NEW_TOKENS, 32)
        assert torch.allclose(got[:100], lerp(base[name], tuned[name][:100], scale), atol=1e-6, rtol=0)
        assert torch.equal(got[100:], tuned[name][100:])
    # A block tensor gets the schedule, untouched by the vocabulary policy.
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.allclose(tensors[name], lerp(base[name], tuned[name], ALPHA + BETA), atol=1e-6, rtol=0)


def test_resized_vocab_streaming_opt_in(resized):
    base_dir, tuned_dir, outputs = resized
    guard = Guard(base_dir, tuned_dir)
    out = edit(base_dir, tuned_dir, outputs / "out", new_vocab_rows="finetuned")
    guard.check()
    check_resized_output(read_all(out), base_dir, tuned_dir, ALPHA)

    stored = json.loads((out / "lines_config.json").read_text())
    assert stored["new_vocab_rows"] == "finetuned"
    assert stored["resolved"]["new_vocab_rows"] == {
        "model.embed_tokens.weight": {"base_rows": 100, "finetuned_rows": 108},
        "lm_head.weight": {"base_rows": 100, "finetuned_rows": 108},
    }
    card = (out / "README.md").read_text()
    assert "new_vocab_rows: finetuned" in card
    assert "`model.embed_tokens.weight`" in card


def test_resized_vocab_small_chunks(resized, monkeypatch):
    """Chunks that straddle the last shared row split correctly between edited and copied elements."""
    import lines_hf.engine as engine

    base_dir, tuned_dir, outputs = resized
    monkeypatch.setattr(engine, "DEFAULT_CHUNK_ELEMENTS", 100)
    real_stream = engine.stream

    def stream_small(*args, **kwargs):
        kwargs["chunk_elements"] = 100  # 100 is not a multiple of the 32-element rows
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(engine, "stream", stream_small)
    out = edit(base_dir, tuned_dir, outputs / "out", new_vocab_rows="finetuned")
    check_resized_output(read_all(out), base_dir, tuned_dir, ALPHA)


def test_resized_vocab_in_memory_opt_in(resized):
    base_dir, tuned_dir, outputs = resized
    model = LiNeSEditor.from_pretrained(
        tuned_dir, base_model=base_dir, alpha=ALPHA, beta=BETA, new_vocab_rows="finetuned", progress=False
    )
    check_resized_output({k: v.detach() for k, v in model.state_dict().items()}, base_dir, tuned_dir, ALPHA)
    assert model.lines_record["new_vocab_rows"]["lm_head.weight"] == {"base_rows": 100, "finetuned_rows": 108}


def test_resized_vocab_cli_flag(resized, capsys):
    base_dir, tuned_dir, outputs = resized
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--alpha", str(ALPHA),
                     "--beta", str(BETA), "--new-vocab-rows", "finetuned", "--output", str(outputs / "out"),
                     "--no-progress"])
    assert code == 0
    check_resized_output(read_all(outputs / "out"), base_dir, tuned_dir, ALPHA)
    assert "--new-vocab-rows finetuned" in json.loads((outputs / "out" / "lines_config.json").read_text())[
        "resolved"]["command"]


def test_base_with_more_rows_still_rejected(resized):
    base_dir, tuned_dir, outputs = resized
    # Swapping the roles makes the base the larger one: rows cannot be removed.
    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(TensorMismatchError) as info:
        edit(tuned_dir, base_dir, outputs / "out", new_vocab_rows="finetuned")
    assert "[100, 32]" in str(info.value)
    assert "[108, 32]" in str(info.value)
    assert "never remove them" in str(info.value)
    guard.check()
    assert output_entries(outputs) == []


def test_block_tensor_with_more_rows_rejected(tmp_path):
    """The opt-in covers tensors outside blocks only: a wider block is another architecture."""
    base = make_model("bert")
    tuned = perturb(base)
    base_dir, tuned_dir = saved(base, tmp_path / "base"), saved(tuned, tmp_path / "tuned")
    tensors = load_file(tuned_dir / "model.safetensors")
    name = "bert.encoder.layer.1.intermediate.dense.bias"
    tensors[name] = torch.zeros(80)
    save_file(tensors, tuned_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TensorMismatchError, match=name):
        edit(base_dir, tuned_dir, tmp_path / "out", new_vocab_rows="finetuned")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["copy", "", None, 1, ["finetuned"]])
def test_new_vocab_rows_invalid_values(value):
    with pytest.raises(ConfigError) as info:
        LiNeSConfig(alpha=0.1, beta=0.1, new_vocab_rows=value)
    assert repr(value) in str(info.value)


# --------------------------------------------------------------------------- tied and untied heads


@pytest.fixture
def tie_pair(tmp_path):
    """A llama base that ties lm_head to embed_tokens, and an untied fine-tune of it."""
    base = make_model("llama", tie_word_embeddings=True)
    untied = make_model("llama", tie_word_embeddings=False)
    untied.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(base.model.embed_tokens.weight)
    tuned = perturb(untied)
    (tmp_path / "outputs").mkdir()
    return saved(base, tmp_path / "tied"), saved(tuned, tmp_path / "untied"), tmp_path / "outputs"


def test_tied_base_untied_finetune_maps_head(tie_pair, caplog):
    tied_dir, untied_dir, outputs = tie_pair
    assert "lm_head.weight" not in load_file(tied_dir / "model.safetensors")

    with caplog.at_level("INFO", logger="lines_hf.plan"):
        out = edit(tied_dir, untied_dir, outputs / "out")
    tie_logs = [r.message for r in caplog.records if "lm_head.weight" in r.message]
    assert len(tie_logs) == 1
    assert "model.embed_tokens.weight" in tie_logs[0]

    base, tuned, got = read_all(tied_dir), read_all(untied_dir), read_all(out)
    expected = lerp(base["model.embed_tokens.weight"], tuned["lm_head.weight"], ALPHA)
    assert torch.allclose(got["lm_head.weight"], expected, atol=1e-6, rtol=0)
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["tied_in_base"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in record["copied_from_finetuned_not_in_base"]


def test_tied_base_untied_finetune_in_memory(tie_pair):
    tied_dir, untied_dir, _ = tie_pair
    model = LiNeSEditor.from_pretrained(untied_dir, base_model=tied_dir, alpha=ALPHA, beta=BETA, progress=False)
    base, tuned = read_all(tied_dir), read_all(untied_dir)
    expected = lerp(base["model.embed_tokens.weight"], tuned["lm_head.weight"], ALPHA)
    assert torch.allclose(model.lm_head.weight.detach(), expected, atol=1e-6, rtol=0)
    assert model.lines_record["tied_in_base"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_untied_base_tied_finetune_rejected(tie_pair):
    tied_dir, untied_dir, outputs = tie_pair
    # The reverse: the base stores a separate head, the fine-tune ties it.
    guard = Guard(tied_dir, untied_dir)
    with pytest.raises(TensorMismatchError) as info:
        edit(untied_dir, tied_dir, outputs / "out")
    message = str(info.value)
    assert "'lm_head.weight'" in message
    assert "'model.embed_tokens.weight'" in message
    assert "tie_word_embeddings" in message
    assert "--allow-missing-tensors" in message
    guard.check()
    assert output_entries(outputs) == []

    out = edit(untied_dir, tied_dir, outputs / "out", allow_missing_tensors=True)
    record = json.loads((out / "lines_config.json").read_text())["resolved"]
    assert record["dropped_base_only"] == ["lm_head.weight"]
    assert "lm_head.weight" not in read_all(out)


# --------------------------------------------------------------------------- other architectures and depths


@pytest.mark.parametrize(
    "base_arch, tuned_arch, tuned_overrides, fragments",
    [
        ("bert", "bert", {"num_hidden_layers": 4}, ["num_hidden_layers=4", "num_hidden_layers=3"]),
        ("llama", "llama", {"num_hidden_layers": 3}, ["num_hidden_layers=3", "num_hidden_layers=4"]),
        ("bert", "llama", {}, ["'llama'", "'bert'"]),
        ("llama", "mistral", {}, ["'mistral'", "'llama'"]),
        ("t5", "t5", {"num_decoder_layers": 3}, ["num_decoder_layers=3", "num_decoder_layers=2"]),
    ],
)
def test_other_architecture_or_depth_rejected(tmp_path, base_arch, tuned_arch, tuned_overrides, fragments):
    base_dir = saved(make_model(base_arch), tmp_path / "base")
    tuned_dir = saved(perturb(make_model(tuned_arch, **tuned_overrides)), tmp_path / "tuned")
    (tmp_path / "outputs").mkdir()
    guard = Guard(base_dir, tuned_dir)
    for run in (
        lambda: edit(base_dir, tuned_dir, tmp_path / "outputs" / "out"),
        lambda: LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=ALPHA, beta=BETA, progress=False),
    ):
        with pytest.raises(ArchitectureMismatchError) as info:
            run()
        for fragment in fragments:
            assert fragment in str(info.value)
    guard.check()
    assert output_entries(tmp_path / "outputs") == []


def test_vision_tower_of_full_clip_allowed(tmp_path):
    """A model type nested in the base's config (CLIP's vision tower) is not another architecture."""
    from lines_hf.plan import check_same_architecture

    clip = make_model("clip").config.to_dict()
    vision = make_model("clip_vision").config.to_dict()
    check_same_architecture(vision, clip)
    check_same_architecture(clip, vision)


# --------------------------------------------------------------------------- non-finite task vectors


@pytest.fixture
def bert_pair(tmp_path):
    base = make_model("bert")
    (tmp_path / "outputs").mkdir()
    return saved(base, tmp_path / "base"), saved(perturb(base), tmp_path / "tuned"), tmp_path / "outputs"


@pytest.mark.parametrize("where", ["tuned", "base"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_names_tensor(bert_pair, where, value):
    base_dir, tuned_dir, outputs = bert_pair
    folder = tuned_dir if where == "tuned" else base_dir
    name = "bert.encoder.layer.2.attention.self.key.weight"
    tensors = load_file(folder / "model.safetensors")
    tensors[name][3, 4] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(NonFiniteError) as info:
        edit(base_dir, tuned_dir, outputs / "out")
    assert repr(name) in str(info.value)
    assert "1 NaN or infinite value" in str(info.value)
    assert "--allow-non-finite" in str(info.value)
    with pytest.raises(NonFiniteError, match=name):
        LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, alpha=ALPHA, beta=BETA, progress=False)
    guard.check()
    assert output_entries(outputs) == []

    out = edit(base_dir, tuned_dir, outputs / "out", allow_non_finite=True)
    got = load_file(out / "model.safetensors")[name]
    assert int((~torch.isfinite(got)).sum()) == 1
    assert not torch.isfinite(got[3, 4])
