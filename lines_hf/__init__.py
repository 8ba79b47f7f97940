"""lines_hf: LiNeS (layer-increasing network scaling) for Hugging Face transformers and PEFT.

LiNeS edits a fine-tuned model after training: the task vector
``finetuned - base`` of block ``l`` (of ``L``) is scaled by
``alpha + beta * l / (L - 1)``, so shallow blocks stay near the pre-trained
weights and deep blocks keep the task skill (Wang et al., "LiNeS: Post-training
Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025,
arXiv:2410.17146).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import LiNeSConfig
from .errors import (
    ArchitectureMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DepthMismatchError,
    HubError,
    LayerResolutionError,
    LiNeSError,
    NonFiniteError,
    OutputPathError,
    OutputWriteError,
    TensorMismatchError,
    UnsafeCheckpointError,
    UnsupportedAdapterError,
)
from .schedule import gamma_to_alpha_beta, linear_scale, linear_scales

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .callback import LiNeSCallback
    from .editor import LiNeSEditor

# Heavy modules (transformers, peft) load on first use, so `lines-hf --help`
# and the pure core stay quick to import.
_LAZY = {"LiNeSEditor": "editor", "LiNeSCallback": "callback"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lines_hf' has no attribute {name!r}")


__all__ = [
    "ArchitectureMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "DepthMismatchError",
    "HubError",
    "LayerResolutionError",
    "LiNeSCallback",
    "LiNeSConfig",
    "LiNeSEditor",
    "LiNeSError",
    "NonFiniteError",
    "OutputPathError",
    "OutputWriteError",
    "TensorMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedAdapterError",
    "__version__",
    "gamma_to_alpha_beta",
    "linear_scale",
    "linear_scales",
]
