"""Reading tensors from model folders and writing safetensors shards safely.

Reads parse the safetensors header here and copy each tensor (or a flat chunk
of it) into its own buffer with ``os.pread``. They do not memory-map the whole
file, because pages of a mapped file count toward the process's RSS once
touched, so a mapped read of a large checkpoint looks as large as the file.
Writes go to a hidden temporary folder beside the target that is renamed into
place only when complete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import queue
import re
import shutil
import signal
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LiNeSError,
    OutputPathError,
    OutputWriteError,
    UnsafeCheckpointError,
)
from .plan import TensorSpec
from .task_vector import Workspace, torch_dtype

LOG = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"

# Files never copied from an input folder into an output: weights of any format,
# their indexes, adapter files, and records that lines_hf writes itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".pkl", ".npz")
SKIPPED_FILES = {
    SAFE_WEIGHTS_INDEX_NAME,
    PICKLE_WEIGHTS_INDEX_NAME,
    "adapter_config.json",
    "lines_config.json",
    "lines_scales.png",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "rng_state.pth",
}
SKIPPED_DIRS = re.compile(r"^(\..*|checkpoint-\d+|runs|__pycache__)$")

# Safetensors dtype codes and the torch dtypes they hold.
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
_TORCH_TO_SAFETENSORS = {value: key for key, value in SAFETENSORS_DTYPES.items()}

# A header larger than this is rejected before it is read (the format's own
# reference implementation uses the same bound).
MAX_HEADER_BYTES = 100_000_000


# --------------------------------------------------------------------------- locating


def looks_like_repo_id(value: str) -> bool:
    """Return true for ``name`` or ``org/name`` strings that are not local paths."""
    if value.startswith((".", "/", "~")) or os.sep in value.replace("/", "", 1) or value.count("/") > 1:
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", value) is not None


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Return a local folder for a model given as a folder or a Hub repo id.

    Repo ids are resolved through huggingface_hub's cache with
    ``snapshot_download``, which honours ``HF_HUB_OFFLINE`` and ``revision``.

    Raises:
        CheckpointNotFoundError: if the folder does not exist, is empty, or the
            repo is neither cached nor downloadable.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not any(path.iterdir()):
            raise CheckpointNotFoundError(f"model folder {text!r} is empty: expected config.json and weights")
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{text!r} is a file, not a model folder: pass the folder that contains it")
    if not looks_like_repo_id(text):
        raise CheckpointNotFoundError(f"model folder {text!r} does not exist: check the path")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        folder = snapshot_download(
            text,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise CheckpointNotFoundError(
            f"{text!r} is neither a local folder nor a Hub repo in the local cache"
            f"{' at revision ' + revision if revision else ''}, and the Hub cannot be reached ({exc}). "
            "Pass a local folder, or download the repo first with network access."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointNotFoundError(f"could not resolve Hub repo {text!r}: {exc}") from None
    return Path(folder)


def read_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Return ``config.json`` of ``folder`` as a dict, or ``None`` if there is none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} must hold a JSON object")
    return data


def check_remote_code(config: Mapping[str, Any] | None, folder: str | os.PathLike, trust_remote_code: bool) -> None:
    """Reject a config whose ``auto_map`` needs remote code, unless the user trusts it."""
    if config and config.get("auto_map") and not trust_remote_code:
        raise UnsafeCheckpointError(
            f"the model in {os.fspath(folder)!r} needs custom code from the repository (config.json has "
            "auto_map). lines_hf does not run remote code unless asked: pass trust_remote_code=True "
            "(--trust-remote-code) if you trust its source."
        )


def tied_weights(config: Mapping[str, Any] | None, stored: set[str] | frozenset[str]) -> dict[str, str]:
    """Return the tensors a checkpoint ties to another one instead of storing, mapped to the stored one.

    The ties are those that the transformers class named in ``config["architectures"]``
    declares in ``_tied_weights_keys`` (for example ``lm_head.weight`` ->
    ``model.embed_tokens.weight``). Only ties whose target is missing from
    ``stored`` and whose source is in it count, and none when the config sets
    ``tie_word_embeddings`` to false. No remote code is imported.
    """
    if not config or config.get("tie_word_embeddings", True) is False:
        return {}
    import transformers

    ties: dict[str, str] = {}
    for name in config.get("architectures") or []:
        cls = getattr(transformers, str(name), None) if isinstance(name, str) else None
        declared = getattr(cls, "_tied_weights_keys", None)
        # NOTE: transformers < 5 declares ties as a list of target names only; those are not mapped here.
        if isinstance(declared, Mapping):
            ties.update({str(target): str(source) for target, source in declared.items()})
    return {target: source for target, source in ties.items() if target not in stored and source in stored}


# --------------------------------------------------------------------------- reading


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently, so a header could
    # describe one tensor twice and readers would disagree on which is meant.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _load_json(raw: bytes | str, what: str) -> Any:
    """Parse untrusted JSON text, turning every parser failure into ``CorruptCheckpointError``.

    ``what`` starts the message, for example ``"/x/model.safetensors has a header that"``.
    Besides syntax errors this catches duplicate keys, integers longer than
    Python's digit limit (``ValueError``) and nesting deep enough to exhaust the
    parser's recursion limit (``RecursionError``).
    """
    try:
        return json.loads(raw, object_pairs_hook=_reject_duplicate_keys)
    except RecursionError:
        raise CorruptCheckpointError(f"{what} is nested too deeply to be valid JSON") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{what} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class _Entry:
    path: Path
    spec: TensorSpec
    begin: int  # absolute byte offset in the file
    end: int


def _parse_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    size = path.stat().st_size
    if size < 8:
        raise CorruptCheckpointError(f"{path} is not a safetensors file: it has {size} bytes")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise CorruptCheckpointError(
                f"{path} is corrupt: its header claims {header_len} bytes but the file has {size} bytes"
            )
        raw = handle.read(header_len)
    header = _load_json(raw, f"{path} has a header that")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a header that is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"{path} has a __metadata__ entry that is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start

    entries: dict[str, _Entry] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CorruptCheckpointError(f"{path}: entry {name!r} is not a JSON object")
        code = info.get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has an invalid shape or data_offsets")
        begin, end = offsets
        spec = TensorSpec(name=name, dtype=SAFETENSORS_DTYPES[code], shape=tuple(shape))
        expected = spec.numel * torch_dtype(spec.dtype).itemsize
        if not 0 <= begin <= end <= data_size or end - begin != expected:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has data_offsets {offsets} that do not fit its shape {shape} and "
                f"dtype {code} ({expected} bytes) within the {data_size} data bytes of the file "
                "(the file may be truncated)"
            )
        entries[name] = _Entry(path=path, spec=spec, begin=data_start + begin, end=data_start + end)
        spans.append((begin, end, name))

    spans.sort()
    reach, owner = 0, None  # furthest end so far among non-empty tensors, and whose it is
    for begin, end, name in spans:
        if end == begin:
            continue
        if begin < reach:
            raise CorruptCheckpointError(f"{path}: tensors {owner!r} and {name!r} have overlapping data_offsets")
        reach, owner = end, name
    return entries, {str(k): str(v) for k, v in metadata.items()}


def load_pickle_safely(file: Path) -> Any:
    """Return the object pickled in ``file``, loaded with ``torch.load(weights_only=True)``.

    Raises:
        UnsafeCheckpointError: if the pickle refers to anything but tensors and
            plain containers, which is how code execution would be smuggled in.
        CorruptCheckpointError: if the file is truncated or not a torch pickle.
    """
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in the legacy (non-zip) format cannot be memory-mapped.
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is several paragraphs; the line naming the rejected global or opcode is the useful one.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        if "GLOBAL" not in detail:
            raise CorruptCheckpointError(
                f"{file} is not a valid torch checkpoint, or uses pickle features that loading with "
                f"weights_only=True does not accept ({detail})"
            ) from None
        raise UnsafeCheckpointError(
            f"{file} could not be loaded safely with weights_only=True: it refers to objects other than tensors, "
            f"which could run code when unpickled ({detail}). Convert it to safetensors in a sandbox you "
            "trust, or use another checkpoint."
        ) from None
    except Exception as exc:  # torch.load raises RuntimeError, KeyError, EOFError ... on broken files
        raise CorruptCheckpointError(
            f"{file} is not a valid torch checkpoint ({type(exc).__name__}: {exc}); it may be truncated"
        ) from None


def _read_exact(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise CorruptCheckpointError(f"{path} ended early while reading at byte {offset + done}")
        done += count


class TensorSource:
    """Interface of everything a LiNeS edit reads tensors from."""

    config: dict[str, Any] | None = None
    location: str = "<memory>"

    def specs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        """Return elements ``start .. start+count`` of the flattened tensor ``name``."""
        return self.read(name).reshape(-1)[start : start + count]

    def read_flat_into(self, name: str, start: int, count: int, workspace: Workspace, index: int) -> torch.Tensor:
        """Return the same elements as ``read_flat``, possibly in buffer ``index`` of ``workspace``.

        The result may be a view of that buffer, valid only until the buffer is
        requested again. Sources that read from files override this to skip an
        allocation per chunk; the default is ``read_flat``.
        """
        return self.read_flat(name, start, count)

    def close(self) -> None:
        pass


class StateDictSource(TensorSource):
    """Tensors held in memory, keyed by name. Tied tensors sharing storage are listed once."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], config: dict[str, Any] | None = None) -> None:
        seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        for name, tensor in tensors.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if tensor.device.type != "meta" and key in seen:
                self.aliases[name] = seen[key]
                continue
            seen[key] = name
            self._tensors[name] = tensor.detach()
        self.config = config

    def specs(self) -> list[TensorSpec]:
        return [
            TensorSpec(name=n, dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape))
            for n, t in self._tensors.items()
        ]

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].to("cpu")


class FolderSource(TensorSource):
    """Tensors of a model folder: ``model.safetensors``, a sharded index, or (opt-in) pickles.

    Args:
        folder: the local model folder.
        allow_pickle: allow ``pytorch_model.bin`` checkpoints, loaded with
            ``torch.load(weights_only=True)`` so that no pickled code runs.
        weights_name: the safetensors file or index to read instead of the
            default names (``adapter_model.safetensors`` for adapters).
    """

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False, weights_name: str | None = None):
        self.folder = Path(folder)
        self.location = str(self.folder)
        self.config = read_config(self.folder)
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

        files = self._weight_files(weights_name, allow_pickle)
        if self._pickled is None:
            for file in files:
                entries, metadata = _parse_header(file)
                self.metadata.update(metadata)
                for name, entry in entries.items():
                    if name in self._entries:
                        raise CorruptCheckpointError(
                            f"tensor {name!r} appears in both {self._entries[name].path.name} and {file.name} "
                            f"in {self.folder}"
                        )
                    self._entries[name] = entry
            self._check_index_names()

    def _check_index_names(self) -> None:
        # An index that lists a tensor its shard lacks describes another
        # checkpoint, or a download that stopped half way.
        index_map = getattr(self, "_index_map", None) or {}
        for name, shard in index_map.items():
            entry = self._entries.get(name)
            if entry is None:
                raise CorruptCheckpointError(
                    f"the index of {self.folder} names tensor {name!r} in shard {shard!r}, but no shard contains it: "
                    "the checkpoint is incomplete or its index belongs to another checkpoint. Download it again."
                )

    def _inside(self, name: str) -> Path:
        # Shard names come from an index file that may be hostile: only plain
        # names inside the folder are accepted. The file itself may be a
        # symlink elsewhere (the Hugging Face cache points snapshots into blobs/).
        if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise CorruptCheckpointError(f"index in {self.folder} names shard {name!r} outside the model folder")
        return self.folder / name

    def _weight_files(self, weights_name: str | None, allow_pickle: bool) -> list[Path]:
        folder = self.folder
        if weights_name is not None:
            candidate = folder / weights_name
            if weights_name.endswith(".index.json"):
                return self._from_index(candidate)
            if not candidate.is_file():
                raise CheckpointNotFoundError(f"{candidate} does not exist")
            return [candidate]

        if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
            return self._from_index(folder / SAFE_WEIGHTS_INDEX_NAME)
        if (folder / SAFE_WEIGHTS_NAME).is_file():
            return [folder / SAFE_WEIGHTS_NAME]

        pickles = [folder / PICKLE_WEIGHTS_INDEX_NAME, folder / PICKLE_WEIGHTS_NAME]
        if any(p.is_file() for p in pickles):
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{folder} contains only pickled weights (pytorch_model.bin). Unpickling can run code. To load "
                    "them with torch.load(weights_only=True), which refuses code objects, pass allow_pickle=True "
                    "(--allow-pickle). Better: convert the checkpoint to safetensors."
                )
            self._load_pickles(pickles)
            return []

        if (folder / "adapter_config.json").is_file():
            raise CheckpointNotFoundError(
                f"{folder} contains a PEFT adapter, not full model weights: pass it as an adapter (--adapter)"
            )
        raise CheckpointNotFoundError(
            f"no model weights in {folder}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}"
        )

    def _read_index(self, index_path: Path) -> tuple[dict[str, str], list[Path]]:
        """Return the ``weight_map`` of an index file and the shard paths it names, each once.

        Raises:
            CorruptCheckpointError: if the file is not JSON, has no ``weight_map``
                object, maps a tensor to anything but a file name, or names a
                shard outside the folder or one that does not exist.
        """
        try:
            raw = index_path.read_bytes()
        except OSError as exc:
            raise CorruptCheckpointError(f"{index_path} could not be read: {exc}") from None
        index = _load_json(raw, f"the index {index_path}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CorruptCheckpointError(f"{index_path} is not a valid index: it needs a weight_map object")
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CorruptCheckpointError(
                    f"{index_path} maps tensor {name!r} to {shard!r}, which is not a shard file name"
                )

        files = []
        for shard in dict.fromkeys(weight_map.values()):
            path = self._inside(shard)
            if not path.is_file():
                raise CorruptCheckpointError(f"{index_path} names shard {shard!r}, which does not exist")
            files.append(path)
        return weight_map, files

    def _from_index(self, index_path: Path) -> list[Path]:
        if not index_path.is_file():
            raise CheckpointNotFoundError(f"{index_path} does not exist")
        self._index_map, files = self._read_index(index_path)
        return files

    def _load_pickles(self, candidates: list[Path]) -> None:
        index, single = candidates
        files = [single]
        if index.is_file():
            _, files = self._read_index(index)
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            loaded = load_pickle_safely(file)
            if not isinstance(loaded, dict):
                raise CorruptCheckpointError(f"{file} does not hold a state dict")
            tensors.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
        self._pickled = StateDictSource(tensors)._tensors

    def specs(self) -> list[TensorSpec]:
        if self._pickled is not None:
            return StateDictSource(self._pickled).specs()
        return [entry.spec for entry in self._entries.values()]

    def has(self, name: str) -> bool:
        return name in (self._pickled if self._pickled is not None else self._entries)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(self, name: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[name]
        spec = self._entries[name].spec
        return self.read_flat(name, 0, spec.numel).reshape(spec.shape)

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[name].reshape(-1)[start : start + count]
        entry = self._entries[name]
        dtype = torch_dtype(entry.spec.dtype)
        itemsize = dtype.itemsize
        count = max(0, min(count, entry.spec.numel - start))
        buffer = torch.empty(count * itemsize, dtype=torch.uint8)
        if count:
            _read_exact(self._fd(entry.path), memoryview(buffer.numpy()), entry.begin + start * itemsize, entry.path)
        return buffer.view(dtype)

    def read_flat_into(self, name: str, start: int, count: int, workspace: Workspace, index: int) -> torch.Tensor:
        if self._pickled is not None:
            return self.read_flat(name, start, count)
        entry = self._entries[name]
        dtype = torch_dtype(entry.spec.dtype)
        itemsize = dtype.itemsize
        count = max(0, min(count, entry.spec.numel - start))
        buffer = workspace.buffer(index, count * itemsize, torch.uint8)
        if count:
            _read_exact(self._fd(entry.path), memoryview(buffer.numpy()), entry.begin + start * itemsize, entry.path)
        return buffer.view(dtype)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- writing


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_shard_size(value: int | str) -> int:
    """Return a maximum shard size in bytes from an int or a string such as ``"5GB"`` or ``"500MB"``.

    Units are decimal, as in huggingface_hub (``1GB`` is 10**9 bytes).

    Raises:
        ConfigError: if the value is not a positive size.
    """
    from .errors import ConfigError

    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (
        match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", value, flags=re.IGNORECASE)
    ):
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    else:
        size = 0
    if size <= 0:
        raise ConfigError(
            f"max_shard_size must be a positive number of bytes or a size such as '5GB' or '500MB', got {value!r}"
        )
    return size


class _WriteThread:
    """Runs file operations in one background thread, in the order they were submitted.

    A streaming edit computes chunk n + 1 while this thread writes chunk n.
    Writing a 2 GB output into the page cache took about 1 s of a 5 s edit on
    the benchmark machine, time that now overlaps the arithmetic. Chunks come
    in buffers that their producer reuses, so ``write`` first copies each into
    one of ``_POOL_SIZE`` pooled buffers. When all of them are in flight, it
    waits, which keeps memory bounded. The first error
    of an operation is raised again by the next call from the caller's thread,
    and every operation after it is skipped.
    """

    _POOL_SIZE = 3

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self._POOL_SIZE):
            self._free.put(bytearray())
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="lines-hf-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            function, args, buffer = task
            try:
                if self._error is None and not self._cancelled:
                    function(*args)
            except BaseException as error:  # handed to the caller's thread by check()
                self._error = error
            finally:
                if buffer is not None:
                    self._free.put(buffer)

    def check(self) -> None:
        """Raise the error of a failed operation, if any."""
        if self._error is not None:
            raise self._error

    def call(self, function, *args) -> None:
        """Run ``function(*args)`` in the thread after everything submitted before."""
        self.check()
        self._tasks.put((function, args, None))

    def write(self, handle, payload: memoryview) -> None:
        """Copy ``payload`` into a pooled buffer and write it to ``handle`` in the thread."""
        self.check()
        buffer = self._free.get()
        if len(buffer) < len(payload):
            buffer = bytearray(len(payload))
        view = memoryview(buffer)[: len(payload)]
        view[:] = payload
        self._tasks.put((_write_naming_file, (handle, view), buffer))

    def finish(self) -> None:
        """Wait for every submitted operation, stop the thread and raise the first error."""
        self._tasks.put(None)
        self._thread.join()
        self.check()

    def cancel(self) -> None:
        """Skip what is still queued, wait for the running operation and stop the thread."""
        self._cancelled = True
        self._tasks.put(None)
        self._thread.join()


def _write_naming_file(handle, data: memoryview) -> None:
    """Write ``data`` to ``handle``, and name the file in the error if the write fails."""
    try:
        handle.write(data)
    except OSError as error:
        if error.filename is None:
            error.filename = getattr(handle, "name", None)
        raise


class ShardWriter:
    """Writes tensors into safetensors shards in a folder, streaming their data.

    The header of each shard needs only names, dtypes and shapes, all known from
    the plan, so it is written first and data follows in order; tensors may
    arrive in flat chunks. Shard names and the index follow transformers
    (``model-00001-of-00002.safetensors`` and ``model.safetensors.index.json``).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        specs: Sequence[TensorSpec],
        *,
        max_shard_size: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
        weights_name: str = SAFE_WEIGHTS_NAME,
    ) -> None:
        from huggingface_hub import split_state_dict_into_shards_factory

        self.folder = Path(folder)
        self._specs = {spec.name: spec for spec in specs}
        stem, suffix = os.path.splitext(weights_name)
        split = split_state_dict_into_shards_factory(
            dict(self._specs),
            get_storage_size=lambda spec: spec.numel * torch_dtype(spec.dtype).itemsize,
            filename_pattern=stem + "{suffix}" + suffix,
            max_shard_size=parse_shard_size(max_shard_size),
        )
        self.split = split
        self.weights_name = weights_name
        self._metadata = {"format": "pt", **(metadata or {})}
        self._order = [name for names in split.filename_to_tensors.values() for name in names]
        self._position = 0
        self._written = 0  # bytes of the current tensor written so far
        self._handle = None
        self._opened: list[Any] = []  # every shard handle, closed again by abort()
        self._current_file: str | None = None
        self._io = _WriteThread()

    def _open(self, filename: str) -> None:
        if self._handle is not None:
            self._io.call(self._handle.close)
        names = self.split.filename_to_tensors[filename]
        header: dict[str, Any] = {"__metadata__": self._metadata}
        offset = 0
        for name in names:
            spec = self._specs[name]
            size = spec.numel * torch_dtype(spec.dtype).itemsize
            header[name] = {
                "dtype": _TORCH_TO_SAFETENSORS[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self._handle = open(self.folder / filename, "wb")
        self._opened.append(self._handle)
        self._io.call(self._handle.write, struct.pack("<Q", len(raw)) + raw)
        self._current_file = filename

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append ``data`` (the whole tensor or its next flat chunk) to tensor ``name``."""
        if self._position >= len(self._order) or self._order[self._position] != name:
            expected = self._order[self._position] if self._position < len(self._order) else None
            raise RuntimeError(f"ShardWriter got {name!r} but the next tensor is {expected!r}")
        filename = self.split.tensor_to_filename[name]
        if filename != self._current_file:
            self._open(filename)
        spec = self._specs[name]
        if data.dtype != torch_dtype(spec.dtype):
            raise RuntimeError(f"ShardWriter got {data.dtype} for {name!r}, which is declared {spec.dtype}")
        payload = _tensor_bytes(data)
        assert self._handle is not None
        self._io.write(self._handle, payload)
        self._written += len(payload)
        total = spec.numel * torch_dtype(spec.dtype).itemsize
        if self._written > total:
            raise RuntimeError(f"ShardWriter received more data than tensor {name!r} contains")
        if self._written == total:
            self._position += 1
            self._written = 0

    @property
    def order(self) -> list[str]:
        """The order in which tensors must be written."""
        return list(self._order)

    def close(self) -> list[str]:
        """Finish the last shard, write the index when sharded, and return the file names."""
        # Zero-size tensors at the end never reach write(); account for them here.
        while self._position < len(self._order) and self._specs[self._order[self._position]].numel == 0:
            name = self._order[self._position]
            if self.split.tensor_to_filename[name] != self._current_file:
                self._open(self.split.tensor_to_filename[name])
            self._position += 1
        if self._position != len(self._order):
            raise RuntimeError(f"ShardWriter closed before tensor {self._order[self._position]!r} was written")
        if self._handle is not None:
            self._io.call(self._handle.close)
        self._io.finish()
        self._handle = None
        files = list(self.split.filename_to_tensors)
        if self.split.is_sharded:
            stem = self.weights_name
            index = {"metadata": {"total_size": self.split.metadata.get("total_size", 0)}, "weight_map": self.split.tensor_to_filename}
            with open(self.folder / f"{stem}.index.json", "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2, sort_keys=True)
                handle.write("\n")
            files.append(f"{stem}.index.json")
        return files

    def abort(self) -> None:
        """Stop writing and close every shard. The caller removes the folder."""
        self._io.cancel()
        for handle in self._opened:
            handle.close()
        self._handle = None


def copy_non_weight_files(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
    """Copy config, tokenizer and other non-weight files (and sub-folders) of ``source``.

    Weights of any format, indexes, adapter files, Trainer state and hidden or
    ``checkpoint-N`` folders are skipped. Symlinks are followed, so files of a
    Hugging Face cache snapshot are copied as regular files.
    """
    source, destination = Path(source), Path(destination)
    copied = []
    for root, dirs, files in os.walk(source, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not SKIPPED_DIRS.match(d))
        rel = Path(root).relative_to(source)
        for name in sorted(files):
            if name in SKIPPED_FILES or name.endswith(WEIGHT_SUFFIXES) or name.startswith("adapter_"):
                continue
            target = destination / rel / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root) / name, target)
            copied.append(str(rel / name))
    return copied


# --------------------------------------------------------------------------- output folders


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def _apply_umask(folder: Path) -> None:
    # mkdtemp creates the folder as 0700 and some writers create 0600 files; the
    # finished output gets the modes a plain mkdir or open would give.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            (Path(root) / name).chmod(0o777 & ~umask)
        for name in files:
            (Path(root) / name).chmod(0o666 & ~umask)


def check_output_path(output: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool) -> Path:
    """Validate an output folder and return its resolved path.

    Raises:
        OutputPathError: if the output is empty, equals, contains or lies inside
            an input folder, or exists and is not empty while ``overwrite`` is false.
    """
    if not os.fspath(output).strip():
        raise OutputPathError("the output folder is an empty string: pass a folder path, for example --output ./edited")
    target = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if target == source or _is_within(target, source):
            raise OutputPathError(
                f"output folder {os.fspath(output)!r} is inside input folder {os.fspath(item)!r}: lines_hf never "
                "writes into an input. Choose an output folder elsewhere."
            )
        if _is_within(source, target):
            raise OutputPathError(
                f"output folder {os.fspath(output)!r} contains input folder {os.fspath(item)!r}: replacing it "
                "would delete the input. Choose an output folder elsewhere."
            )
    if target.exists():
        if not target.is_dir():
            raise OutputPathError(f"output {os.fspath(output)!r} exists and is a file: choose a folder path")
        if any(target.iterdir()) and not overwrite:
            raise OutputPathError(
                f"output folder {os.fspath(output)!r} exists and is not empty: pass overwrite=True "
                "(--overwrite) to replace it, or choose another folder"
            )
    return target


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


@contextmanager
def _signals_raise() -> Iterator[None]:
    # Turn SIGTERM and SIGHUP (a closed terminal) into an exception while writing, so
    # the temporary folder is removed as on Ctrl-C. A SIGHUP ignored by nohup stays ignored.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise _Interrupted(signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        previous[hangup] = signal.signal(hangup, handler)
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    # Hold SIGINT, SIGTERM and SIGHUP back while renaming or cleaning up, so a
    # signal cannot stop half way between moving the old output aside and
    # moving the new one in. Held signals arrive when the block ends.
    # NOTE: Windows has no pthread_sigmask, so there the renames are not shielded.
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# errno values that mean the destination cannot take the output.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _write_error(output: str | os.PathLike, exc: OSError) -> OutputWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free space there (the output needs about as much as the fine-tune's weights) or choose another output folder"
    else:
        advice = "the destination is read-only or not writable: choose another output folder"
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputWriteError(
        f"writing the output folder {os.fspath(output)!r} failed: {exc.strerror or exc}{where}. Nothing was "
        f"left there and the inputs are unchanged; {advice}."
    )


@contextmanager
def atomic_output_dir(
    output: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), *, overwrite: bool = False
) -> Iterator[Path]:
    """Yield a hidden temporary folder that becomes ``output`` only if the block succeeds.

    The temporary folder sits beside the target (same file system, so the final
    rename is atomic) and is named ``.<name>.lines-incomplete-*``. On any error,
    Ctrl-C, SIGTERM or SIGHUP it is removed and the exception propagates. An existing
    output is replaced only after the new one is complete, and it is put back
    if the replacement fails.

    Raises:
        OutputPathError: if the output location is unsafe (``check_output_path``).
        OutputWriteError: if the destination is full, read-only or not writable.
        KeyboardInterrupt: on Ctrl-C, SIGTERM or SIGHUP, with ``signum`` set to the signal.
    """
    target = check_output_path(output, inputs, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.lines-incomplete-", dir=target.parent))
    except OSError as exc:
        raise _write_error(output, exc) from exc

    trash: Path | None = None
    committed = False
    try:
        with _signals_raise():
            yield temp
            _apply_umask(temp)
            with _signals_deferred():
                if target.exists():
                    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.lines-old-", dir=target.parent))
                    os.replace(target, trash / "old")
                os.replace(temp, target)
                committed = True
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException as exc:
        with _signals_deferred():
            # Before the commit, the old output goes back. After it, the new output is
            # complete (a signal held during the renames arrived late), so the old one goes.
            if not committed and trash is not None and (trash / "old").exists() and not target.exists():
                os.replace(trash / "old", target)
            if trash is not None and (committed or not (trash / "old").exists()):
                shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, _Interrupted):
            interrupt = KeyboardInterrupt(str(exc))
            interrupt.signum = exc.signum
            raise interrupt from None
        if isinstance(exc, OSError) and not isinstance(exc, LiNeSError) and exc.errno in _WRITE_ERRNOS:
            raise _write_error(output, exc) from exc
        raise
