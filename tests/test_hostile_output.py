"""Output safety: full disks, read-only destinations, failed replacements and real SIGINT/SIGTERM.

In every case the inputs keep their checksums and nothing that looks like a
finished output (nor the hidden ``.NAME.lines-incomplete-*`` folder) is left.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lines_hf import LiNeSEditor, OutputPathError, OutputWriteError
from lines_hf.cli import main as cli_main
from test_hostile import Guard, output_entries
from tiny import make_model, perturb

ALPHA, BETA = 0.3, 0.5
REPO = Path(__file__).resolve().parents[1]


def edit(base_dir, tuned_dir, out, **kwargs):
    kwargs.setdefault("alpha", ALPHA)
    kwargs.setdefault("beta", BETA)
    return LiNeSEditor.edit_folder(tuned_dir, base_dir, out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = make_model("bert")
    base.save_pretrained(root / "base")
    perturb(base).save_pretrained(root / "tuned")
    return root


@pytest.fixture
def pair(saved_pair, tmp_path):
    for name in ("base", "tuned"):
        shutil.copytree(saved_pair / name, tmp_path / name)
    (tmp_path / "outputs").mkdir()
    return tmp_path / "base", tmp_path / "tuned", tmp_path / "outputs"


def fail_after(monkeypatch, limit, error_number):
    """Make ShardWriter raise OSError(error_number) once ``limit`` bytes of tensor data were written."""
    import lines_hf.checkpoint as checkpoint

    written = {"bytes": 0}
    real_write = checkpoint.ShardWriter.write

    def write(self, name, data):
        written["bytes"] += data.numel() * data.element_size()
        if written["bytes"] > limit:
            raise OSError(error_number, os.strerror(error_number))
        return real_write(self, name, data)

    monkeypatch.setattr(checkpoint.ShardWriter, "write", write)
    return written


# --------------------------------------------------------------------------- full disk


def test_disk_full_mid_shard(pair, monkeypatch):
    base_dir, tuned_dir, outputs = pair
    guard = Guard(base_dir, tuned_dir)
    written = fail_after(monkeypatch, 50_000, errno.ENOSPC)
    with pytest.raises(OutputWriteError) as info:
        edit(base_dir, tuned_dir, outputs / "out")
    assert written["bytes"] > 50_000  # it failed inside the shard, not before
    message = str(info.value)
    assert str(outputs / "out") in message
    assert "No space left on device" in message
    assert "free space" in message
    assert isinstance(info.value, OSError)
    guard.check()
    assert output_entries(outputs) == []


def test_disk_full_cli_one_line(pair, monkeypatch, capsys):
    base_dir, tuned_dir, outputs = pair
    fail_after(monkeypatch, 50_000, errno.ENOSPC)
    code = cli_main(["edit", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--alpha", "0.3",
                     "--beta", "0.5", "--output", str(outputs / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "No space left on device" in err
    assert str(outputs / "out") in err
    assert "Traceback" not in err
    assert output_entries(outputs) == []


class FillingFile:
    """A shard file whose writes fail with ENOSPC once ``limit`` bytes were written."""

    def __init__(self, path, limit, seen):
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._limit = limit
        self._seen = seen

    def write(self, data):
        self._seen["threads"].add(threading.current_thread().name)
        self._seen["bytes"] += len(data)
        if self._seen["bytes"] > self._limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def close(self):
        self._handle.close()


def test_disk_full_in_the_writer_thread(pair, monkeypatch):
    """A failure in the background writer thread still reaches the caller, and the output is cleaned up."""
    import lines_hf.checkpoint as checkpoint

    base_dir, tuned_dir, outputs = pair
    guard = Guard(base_dir, tuned_dir)
    seen = {"bytes": 0, "threads": set()}
    real_open = open

    def shard_open(path, mode="r", **kwargs):
        if mode == "wb" and str(path).endswith(".safetensors"):
            return FillingFile(path, 50_000, seen)
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(checkpoint, "open", shard_open, raising=False)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        edit(base_dir, tuned_dir, outputs / "out")
    assert seen["threads"] == {"lines-hf-writer"}
    assert seen["bytes"] > 50_000
    assert not [t for t in threading.enumerate() if t.name == "lines-hf-writer"]
    guard.check()
    assert output_entries(outputs) == []


def try_mount(args, target):
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", *args, "tmpfs", str(target)], capture_output=True)
    return result.returncode == 0


def unmount(target):
    subprocess.run(["umount", str(target)], capture_output=True, check=True)


def test_disk_full_real_tmpfs(pair, tmp_path):
    """A 64 KiB tmpfs fills up part way through the 135 KB shard (needs root and mount; skipped otherwise)."""
    base_dir, tuned_dir, _ = pair
    small = tmp_path / "small"
    if not try_mount(["-t", "tmpfs", "-o", "size=64k"], small):
        pytest.skip("cannot mount a tmpfs here")
    try:
        guard = Guard(base_dir, tuned_dir)
        with pytest.raises(OutputWriteError) as info:
            edit(base_dir, tuned_dir, small / "out")
        assert "No space left on device" in str(info.value)
        assert str(small / "out") in str(info.value)
        guard.check()
        assert output_entries(small) == []
    finally:
        unmount(small)


# --------------------------------------------------------------------------- read-only destination


def test_read_only_destination_real_mount(pair, tmp_path):
    """A read-only tmpfs (root ignores chmod, so a mount is the honest test; skipped without mount)."""
    base_dir, tuned_dir, _ = pair
    readonly = tmp_path / "readonly"
    if not try_mount(["-t", "tmpfs", "-o", "size=1m,ro"], readonly):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        guard = Guard(base_dir, tuned_dir)
        with pytest.raises(OutputWriteError) as info:
            edit(base_dir, tuned_dir, readonly / "out")
        assert "Read-only file system" in str(info.value)
        assert str(readonly / "out") in str(info.value)
        assert "not writable" in str(info.value)
        guard.check()
        assert output_entries(readonly) == []
    finally:
        unmount(readonly)


@pytest.mark.parametrize("error_number", [errno.EROFS, errno.EACCES])
def test_read_only_destination_patched(pair, monkeypatch, error_number):
    """The temporary folder cannot be created: the error names the output and nothing is written."""
    import lines_hf.checkpoint as checkpoint

    base_dir, tuned_dir, outputs = pair

    def refuse(*args, **kwargs):
        raise OSError(error_number, os.strerror(error_number), str(outputs))

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", refuse)
    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(OutputWriteError) as info:
        edit(base_dir, tuned_dir, outputs / "out")
    assert os.strerror(error_number) in str(info.value)
    assert str(outputs / "out") in str(info.value)
    guard.check()
    assert output_entries(outputs) == []


def test_final_rename_refused(pair, monkeypatch):
    import lines_hf.checkpoint as checkpoint

    base_dir, tuned_dir, outputs = pair

    def refuse(source, target):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(OutputWriteError, match="Read-only file system"):
        edit(base_dir, tuned_dir, outputs / "out")
    guard.check()
    assert output_entries(outputs) == []


# --------------------------------------------------------------------------- replacing an existing output


def test_failed_overwrite_restores_old_output(pair, monkeypatch):
    """With overwrite, the old output is moved aside first; when the new one cannot move in, it comes back."""
    import lines_hf.checkpoint as checkpoint

    base_dir, tuned_dir, outputs = pair
    old = outputs / "out"
    old.mkdir()
    (old / "keep.txt").write_text("previous result")

    real_replace = os.replace
    calls = []

    def second_call_fails(source, target):
        calls.append((Path(source).name, Path(target).name))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", second_call_fails)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        edit(base_dir, tuned_dir, old, overwrite=True)
    assert calls[0] == ("out", "old")  # the old output was moved aside before the failure
    assert (old / "keep.txt").read_text() == "previous result"
    assert output_entries(outputs) == ["out"]
    assert sorted(os.listdir(old)) == ["keep.txt"]


def test_failure_during_overwrite_keeps_old_output(pair, monkeypatch):
    base_dir, tuned_dir, outputs = pair
    old = outputs / "out"
    old.mkdir()
    (old / "keep.txt").write_text("previous result")
    fail_after(monkeypatch, 50_000, errno.ENOSPC)
    with pytest.raises(OutputWriteError):
        edit(base_dir, tuned_dir, old, overwrite=True)
    assert sorted(os.listdir(old)) == ["keep.txt"]
    assert output_entries(outputs) == ["out"]


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_output_in_input_via_symlink(pair, tmp_path, where):
    """A symlink that leads into (or around) an input counts as that input."""
    base_dir, tuned_dir, outputs = pair
    link = tmp_path / "link"
    if where == "containing":
        link.symlink_to(tmp_path)
        out = link
    else:
        link.symlink_to(tuned_dir)
        out = link if where == "equal" else link / "edited"
    guard = Guard(base_dir, tuned_dir)
    with pytest.raises(OutputPathError) as info:
        edit(base_dir, tuned_dir, out, overwrite=True)
    assert str(out) in str(info.value)
    guard.check()
    assert sorted(os.listdir(tuned_dir)) == ["config.json", "model.safetensors"]


# --------------------------------------------------------------------------- real signals


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    """A llama pair of about 70 MB each (vocab 32000 x hidden 256, untied): several 8M-element chunks."""
    root = tmp_path_factory.mktemp("slow")
    base = make_model("llama", vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    base.save_pretrained(root / "base")
    perturb(base).save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


# The edit runs in a child process through the real CLI. Each chunk also sleeps 0.2 s, so the
# write lasts several seconds whatever the machine's speed and the signal lands mid-write.
# The card's plot process starts through SLOW_PLOT_PYTHON, which waits 60 s first, so it is
# still running when the signal lands.
CHILD = """
import os, sys, time
import lines_hf.engine as engine
import lines_hf.plot as plot
real = engine.apply_scale
def slow(*args, **kwargs):
    time.sleep(0.2)
    return real(*args, **kwargs)
engine.apply_scale = slow
plot.CHILD_PYTHON = os.environ["SLOW_PLOT_PYTHON"]
from lines_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""

SLOW_PYTHON = """#!{python}
import os, sys, time
time.sleep(60)
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write(slow_pair, tmp_path, signum):
    base_dir, tuned_dir = slow_pair
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    guard = Guard(base_dir, tuned_dir)
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(SLOW_PYTHON.format(python=sys.executable))
    slow_python.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_DISABLE_PROGRESS_BARS="1", SLOW_PLOT_PYTHON=str(slow_python))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "edit", "--base", str(base_dir), "--finetuned", str(tuned_dir),
         "--alpha", "0.3", "--beta", "0.5", "--output", str(outputs / "out"), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        # Wait until the hidden temporary folder contains part of a shard: the edit is mid-write.
        deadline = time.monotonic() + 120
        partial = None
        while time.monotonic() < deadline and child.poll() is None:
            shards = list(outputs.glob(".out.lines-incomplete-*/*.safetensors"))
            if shards and shards[0].stat().st_size > 0:
                partial = shards[0]
                break
            time.sleep(0.05)
        assert partial is not None, "the edit never started writing"
        assert len(plot_processes(outputs)) == 1  # the plot process, still waiting
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert child.returncode == 128 + signum
    assert f"interrupted by signal {int(signum)}" in err
    assert "Traceback" not in err
    assert output_entries(outputs) == []
    # The card's plot is drawn by a grandchild in a session of its own, so the edit must stop it itself.
    assert plot_processes(outputs) == []
    guard.check()


def plot_processes(outputs):
    """Return the command lines of running plot processes that write under ``outputs`` (Linux /proc)."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "from lines_hf.plot import main" in command and str(outputs) in command:
            found.append(command)
    return found


def test_completed_output_loads(slow_pair, tmp_path):
    """The same edit, left to finish in-process, gives a complete folder: the signal test interrupts a real write."""
    base_dir, tuned_dir = slow_pair
    out = edit(base_dir, tuned_dir, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].shape == (32000, 256)
