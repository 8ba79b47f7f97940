"""Pushing outputs to the Hub with an injected HfApi: one commit, file list, options, README protection, failures."""

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled

from lines_hf import HubError, LiNeSConfig, LiNeSEditor
from lines_hf.cli import main as cli_main
from lines_hf.hub import maybe_push, push_folder, retry_command
from tiny import save_pair

TOKEN = "hf_SecretTokenValue0123456789abcdef"
EXPECTED_EDIT_FILES = {"config.json", "README.md", "lines_scales.png", "lines_config.json"}


@pytest.fixture
def online(monkeypatch):
    """Turn off the offline mode that conftest sets, for tests whose HfApi is a mock."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def api():
    client = mock.create_autospec(HfApi, instance=True)
    client.file_exists.return_value = False
    client.upload_folder.return_value = CommitInfo(
        commit_url="https://huggingface.co/me/bert-lines/commit/abc123",
        commit_message="Upload",
        commit_description="",
        oid="abc123",
    )
    return client


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), "bert")


@pytest.fixture
def edited(pair, tmp_path):
    """A real streamed edit of a tiny BERT, in two shards."""
    base_dir, tuned_dir = pair
    return LiNeSEditor.edit_folder(
        tuned_dir, base_dir, tmp_path / "out", LiNeSConfig(alpha=0.2, beta=0.8), max_shard_size="40KB", progress=False
    )


def uploaded_files(call):
    """Return the relative paths that an upload_folder call would send."""
    kwargs = call.kwargs
    folder = Path(kwargs["folder_path"])
    ignored = set(kwargs.get("ignore_patterns") or [])
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return files - ignored


def folder_digest(folder):
    digest = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def test_push_is_one_commit(edited, api, online):
    commit = push_folder(edited, "me/bert-lines", api=api)

    assert commit.oid == "abc123"
    assert api.upload_folder.call_count == 1
    assert api.create_commit.call_count == 0
    assert api.upload_file.call_count == 0
    api.create_repo.assert_called_once_with(
        "me/bert-lines", token=None, private=None, repo_type="model", exist_ok=True
    )
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/bert-lines"
    assert Path(kwargs["folder_path"]) == edited
    assert kwargs["repo_type"] == "model"
    assert kwargs["revision"] is None
    assert kwargs["create_pr"] is False
    assert kwargs["ignore_patterns"] is None
    assert kwargs["commit_message"].startswith("Upload LiNeS model (alpha=0.2, beta=0.8)")


def test_push_uploads_expected_files(edited, api, online):
    push_folder(edited, "me/bert-lines", api=api)

    files = uploaded_files(api.upload_folder.call_args)
    shards = {name for name in files if name.endswith(".safetensors")}
    assert len(shards) >= 2
    assert all(name.startswith("model-") for name in shards)
    assert files == EXPECTED_EDIT_FILES | shards | {"model.safetensors.index.json"}
    assert not any(name.startswith("adapter_") for name in files)


def test_repo_options_passed_through(edited, api, online):
    push_folder(
        edited,
        "me/bert-lines",
        api=api,
        private=True,
        revision="lines-v1",
        commit_message="LiNeS gamma sweep",
        token=TOKEN,
    )

    api.create_repo.assert_called_once_with("me/bert-lines", token=TOKEN, private=True, repo_type="model", exist_ok=True)
    api.create_branch.assert_called_once_with(
        "me/bert-lines", branch="lines-v1", token=TOKEN, repo_type="model", exist_ok=True
    )
    api.file_exists.assert_called_once_with(
        "me/bert-lines", "README.md", repo_type="model", revision="lines-v1", token=TOKEN
    )
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["revision"] == "lines-v1"
    assert kwargs["commit_message"] == "LiNeS gamma sweep"
    assert kwargs["token"] == TOKEN


def test_create_pr_targets_existing_branch(edited, api, online):
    push_folder(edited, "me/bert-lines", api=api, revision="dev", create_pr=True)

    api.create_branch.assert_not_called()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["create_pr"] is True
    assert kwargs["revision"] == "dev"


def test_existing_readme_kept(edited, api, online, caplog):
    api.file_exists.return_value = True

    with caplog.at_level(logging.WARNING, logger="lines_hf.hub"):
        push_folder(edited, "me/bert-lines", api=api)

    assert api.upload_folder.call_args.kwargs["ignore_patterns"] == ["README.md"]
    assert "README.md" not in uploaded_files(api.upload_folder.call_args)
    assert "lines_scales.png" in uploaded_files(api.upload_folder.call_args)
    assert "--overwrite-readme" in caplog.text
    # The local card is still there.
    assert (edited / "README.md").is_file()


def test_overwrite_readme_on_request(edited, api, online):
    api.file_exists.return_value = True

    push_folder(edited, "me/bert-lines", api=api, overwrite_readme=True)

    api.file_exists.assert_not_called()
    assert api.upload_folder.call_args.kwargs["ignore_patterns"] is None
    assert "README.md" in uploaded_files(api.upload_folder.call_args)


def test_failed_upload_keeps_folder(edited, api, online):
    before = folder_digest(edited)
    api.upload_folder.side_effect = RuntimeError(f"500 Server Error for token {TOKEN}")

    with pytest.raises(HubError) as raised:
        push_folder(edited, "me/bert-lines", api=api, revision="lines-v1", token=TOKEN)
    message = str(raised.value)

    assert folder_digest(edited) == before
    assert f"intact at {edited.resolve()}" in message
    assert retry_command(edited, "me/bert-lines", revision="lines-v1") in message
    assert "lines-hf push" in message
    assert "500 Server Error" in message
    assert TOKEN not in message


def test_failed_create_repo_is_hub_error(edited, api, online):
    api.create_repo.side_effect = PermissionError("403 Forbidden: you cannot create a repo under org")

    with pytest.raises(HubError, match="403 Forbidden") as raised:
        push_folder(edited, "org/bert-lines", api=api)

    assert "lines-hf push" in str(raised.value)
    api.upload_folder.assert_not_called()


def test_token_never_logged(edited, api, online, caplog):
    api.file_exists.return_value = True

    with caplog.at_level(logging.DEBUG):
        push_folder(edited, "me/bert-lines", api=api, token=TOKEN)

    assert caplog.records
    assert TOKEN not in caplog.text
    assert not any(TOKEN in path.read_bytes().decode("latin-1") for path in edited.rglob("*") if path.is_file())


def test_offline_mode_gives_clear_error(edited, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # A real HfApi: the check must fire before any request is attempted.
    with pytest.raises(HubError, match="offline mode") as raised:
        push_folder(edited, "me/bert-lines")

    assert "HF_HUB_OFFLINE" in str(raised.value)
    assert "lines-hf push" in str(raised.value)


def test_offline_error_from_client(edited, api, online):
    api.create_repo.side_effect = OfflineModeIsEnabled("offline")

    with pytest.raises(HubError, match="offline mode"):
        push_folder(edited, "me/bert-lines", api=api)


def test_offline_cli_push_exits_with_message(edited):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "import sys; from lines_hf.cli import main; sys.exit(main(sys.argv[1:]))"

    # The timeout only guards against a hang, because the command should return at once.
    result = subprocess.run(
        [sys.executable, "-c", code, "push", str(edited), "--repo-id", "me/bert-lines"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "offline mode" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_repo_id_rejected(edited, api, online):
    with pytest.raises(HubError, match="invalid Hub repo id"):
        push_folder(edited, "me/bert lines", api=api)

    api.create_repo.assert_not_called()


def test_missing_folder_rejected(tmp_path, api, online):
    with pytest.raises(HubError, match="folder not found"):
        push_folder(tmp_path / "missing", "me/bert-lines", api=api)


def test_maybe_push_without_flag(edited, api):
    import argparse

    assert maybe_push(argparse.Namespace(push_to_hub=None), edited, api=api) is None
    api.upload_folder.assert_not_called()


# --------------------------------------------------------------------------- editor and CLI


def test_editor_pushes_model_with_card(pair, api, online):
    base_dir, tuned_dir = pair
    model = LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, config=LiNeSConfig(gamma=0.5), progress=False)
    seen = {}

    def record_files(**kwargs):
        seen["files"] = uploaded_files(mock.call(**kwargs))
        seen["folder"] = Path(kwargs["folder_path"])
        return api.upload_folder.return_value

    api.upload_folder.side_effect = record_files

    LiNeSEditor.push_to_hub(model, "me/bert-lines", api=api, private=True)

    assert api.upload_folder.call_count == 1
    assert seen["files"] >= EXPECTED_EDIT_FILES | {"model.safetensors"}
    # The temporary folder is removed after a successful push.
    assert not seen["folder"].exists()


def test_editor_failed_push_keeps_saved_model(pair, api, online):
    base_dir, tuned_dir = pair
    model = LiNeSEditor.from_pretrained(tuned_dir, base_model=base_dir, config=LiNeSConfig(gamma=0.5), progress=False)
    api.upload_folder.side_effect = RuntimeError("connection reset")

    with pytest.raises(HubError) as raised:
        LiNeSEditor.push_to_hub(model, "me/bert-lines", api=api)

    folder = Path(api.upload_folder.call_args.kwargs["folder_path"])
    try:
        assert str(folder.resolve()) in str(raised.value)
        assert (folder / "README.md").is_file()
        assert (folder / "lines_config.json").is_file()
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_editor_pushes_folder(edited, api, online):
    LiNeSEditor.push_to_hub(edited, "me/bert-lines", api=api, create_pr=True)

    assert Path(api.upload_folder.call_args.kwargs["folder_path"]) == edited
    assert api.upload_folder.call_args.kwargs["create_pr"] is True


def test_cli_edit_push_to_hub(pair, api, online, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = pair
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *args, **kwargs: api)
    output = tmp_path / "cli-out"

    status = cli_main([
        "edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--output", str(output),
        "--gamma", "0.5", "--no-progress", "--push-to-hub", "me/bert-lines", "--private",
        "--push-revision", "lines", "--commit-message", "LiNeS edit", "--create-pr", "--token", TOKEN,
    ])

    assert status == 0
    assert api.upload_folder.call_count == 1
    kwargs = api.upload_folder.call_args.kwargs
    assert Path(kwargs["folder_path"]) == output
    assert kwargs["revision"] == "lines"
    assert kwargs["create_pr"] is True
    assert kwargs["commit_message"] == "LiNeS edit"
    assert kwargs["token"] == TOKEN
    assert api.create_repo.call_args.kwargs["private"] is True
    assert "Pushed" in capsys.readouterr().out
    for name in ("README.md", "lines_config.json"):
        text = (output / name).read_text()
        assert "--push-to-hub me/bert-lines" in text
        assert TOKEN not in text


def test_cli_push_command(edited, api, online, monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *args, **kwargs: api)

    status = cli_main(["push", str(edited), "--repo", "me/bert-lines", "--revision", "v2", "--overwrite-readme"])

    assert status == 0
    api.create_branch.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["revision"] == "v2"
    assert kwargs["ignore_patterns"] is None
    api.file_exists.assert_not_called()


def test_cli_offline_push_fails_before_edit(pair, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = pair
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "never-written"

    status = cli_main([
        "edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--output", str(output),
        "--gamma", "0.5", "--push-to-hub", "me/bert-lines",
    ])

    assert status == 1
    assert "offline mode" in capsys.readouterr().err
    assert not output.exists()


def test_cli_failed_push_keeps_output(pair, api, online, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = pair
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *args, **kwargs: api)
    api.upload_folder.side_effect = RuntimeError("502 Bad Gateway")
    output = tmp_path / "cli-out"

    status = cli_main([
        "edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--output", str(output),
        "--gamma", "0.5", "--no-progress", "--push-to-hub", "me/bert-lines",
    ])
    err = capsys.readouterr().err

    assert status == 1
    assert (output / "README.md").is_file()
    assert any(output.glob("*.safetensors"))
    assert f"lines-hf push {output} --repo-id me/bert-lines" in err


def test_merged_adapter_push_has_no_adapter_files(tmp_path, api, online):
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny import make_model

    torch.manual_seed(5)
    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    merged = LiNeSEditor.from_pretrained(peft_model, config=LiNeSConfig(alpha=0.2, beta=0.8), merge=True)
    output = LiNeSEditor.save_pretrained(merged, tmp_path / "merged")

    push_folder(output, "me/llama-lines", api=api)
    files = uploaded_files(api.upload_folder.call_args)

    assert EXPECTED_EDIT_FILES | {"model.safetensors"} <= files
    assert not any(name.startswith("adapter_") for name in files)
    assert files - EXPECTED_EDIT_FILES - {"model.safetensors"} <= {"generation_config.json"}
    message = api.upload_folder.call_args.kwargs["commit_message"]
    assert message.startswith("Upload LiNeS model with a merged adapter (alpha=0.2, beta=0.8)")


def test_merge_push_file_list(tmp_path, api, online):
    from lines_hf.merge import merge_folders
    from tiny import make_model, perturb

    base = make_model("bert")
    base.save_pretrained(tmp_path / "base")
    tuned_dirs = []
    for seed in (1, 2):
        perturb(base, seed=seed).save_pretrained(tmp_path / f"task{seed}")
        tuned_dirs.append(tmp_path / f"task{seed}")
    output = merge_folders(
        tuned_dirs, tmp_path / "base", tmp_path / "out", LiNeSConfig(beta=0.5), max_shard_size="40KB", progress=False
    )

    push_folder(output, "me/bert-merge", api=api)
    files = uploaded_files(api.upload_folder.call_args)
    shards = {name for name in files if name.endswith(".safetensors")}

    assert len(shards) >= 2
    assert files == EXPECTED_EDIT_FILES | shards | {"model.safetensors.index.json"}
    assert api.upload_folder.call_args.kwargs["commit_message"].startswith("Upload LiNeS merged model (alpha=0.5")
