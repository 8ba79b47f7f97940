"""Error classes raised by lines_hf.

Each class refines the built-in exception that a caller would catch anyway, so
``except ValueError`` still works, and the CLI prints any ``LiNeSError`` as one
message without a traceback.
"""

from __future__ import annotations


class LiNeSError(Exception):
    """Base class of every error that lines_hf raises on purpose."""


class ConfigError(LiNeSError, ValueError):
    """A configuration field or command-line option has an invalid value."""


class LayerResolutionError(LiNeSError, ValueError):
    """Tensors could not be assigned to transformer blocks."""


class DepthMismatchError(LayerResolutionError):
    """The depth in the model config differs from the number of blocks found."""


class TensorMismatchError(LiNeSError, ValueError):
    """Base and fine-tuned tensors do not fit together (shape, dtype, presence)."""


class ArchitectureMismatchError(TensorMismatchError):
    """Two checkpoints come from different architectures or depths."""


class NonFiniteError(LiNeSError, ValueError):
    """A task vector contains NaN or infinite values."""


class CheckpointNotFoundError(LiNeSError, FileNotFoundError):
    """A model folder, file or Hub repo could not be found locally."""


class CorruptCheckpointError(LiNeSError, ValueError):
    """A checkpoint file is truncated, malformed or inconsistent with its index."""


class UnsafeCheckpointError(LiNeSError, PermissionError):
    """Loading would run untrusted code (pickle or remote code) without opt-in."""


class OutputPathError(LiNeSError, OSError):
    """The output location is unsafe: inside an input, or already populated."""


class OutputWriteError(OutputPathError):
    """Writing the output failed (disk full, read-only or not writable); nothing was left behind."""


class UnsupportedAdapterError(LiNeSError, ValueError):
    """A PEFT adapter type or variant that lines_hf cannot edit exactly."""


class HubError(LiNeSError, OSError):
    """Pushing to or resolving from the Hugging Face Hub failed."""


class DataNotFoundError(LiNeSError, FileNotFoundError):
    """The source of a labelled task (a PyPI or Debian package) is not installed."""
