"""``LiNeSConfig``: the settings of one LiNeS edit or merge, saved as ``lines_config.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointNotFoundError, ConfigError
from .schedule import gamma_to_alpha_beta

LOG = logging.getLogger(__name__)

CONFIG_NAME = "lines_config.json"

NON_BLOCK_POLICIES = ("alpha", "keep", "base")
STACK_POLICIES = ("per_stack", "global")
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
MERGE_METHODS = ("task_arithmetic", "ties", "consensus", "dare_linear", "dare_ties")
TIES_TRIM_SCOPES = ("global", "per_tensor")
HEAD_POLICIES = ("save", "drop")
NEW_VOCAB_ROW_POLICIES = ("error", "finetuned")


def _check_number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass
class LiNeSConfig:
    """Settings of a LiNeS edit.

    A single-model edit needs ``alpha`` and ``beta``, or ``gamma`` (which sets
    ``alpha = gamma`` and ``beta = 1 - gamma``). In a merge, ``alpha=None``
    means the automatic alpha computed from L1 norms of the task vectors.
    """

    alpha: float | None = field(default=None, metadata={"help": "Scale of the first block of each stack."})
    beta: float | None = field(
        default=None, metadata={"help": "Added to alpha over depth: the last block gets alpha + beta."}
    )
    gamma: float | None = field(
        default=None, metadata={"help": "One-knob form in [0, 1]: alpha = gamma, beta = 1 - gamma."}
    )
    non_block_scale: str | float = field(
        default="alpha",
        metadata={
            "help": "Scale of tensors outside every block (embeddings, final norm, heads): 'alpha', "
            "'keep' (1.0, the fine-tuned value), 'base' (0.0, the pre-trained value) or a number."
        },
    )
    stack_policy: str = field(
        default="per_stack",
        metadata={
            "help": "'per_stack' numbers each stack from 0 with its own depth; 'global' concatenates "
            "encoder and decoder blocks in forward order (encoder-decoder models only)."
        },
    )
    layer_pattern: str | None = field(
        default=None,
        metadata={
            "help": "Regex that finds a tensor's block; its first group (or the group named 'index') "
            "is the block number and the text before that group names the stack."
        },
    )
    num_layers: int | dict[str, int] | None = field(
        default=None,
        metadata={"help": "Depth to use instead of the config's: one int, or a mapping stack name -> depth."},
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "Regexes (re.search) of tensor names to keep exactly as in the fine-tune."},
    )
    out_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the output tensors ('float32', 'bfloat16', ...); default: the fine-tune's."},
    )
    allow_missing_tensors: bool = field(
        default=False,
        metadata={"help": "Allow floating-point tensors that the base has and the fine-tune lacks (they are dropped)."},
    )
    allow_non_finite: bool = field(
        default=False, metadata={"help": "Allow NaN or infinite values in a task vector."}
    )
    new_vocab_rows: str = field(
        default="error",
        metadata={
            "help": "What to do when the fine-tune has more embedding or output-head rows than the base (after "
            "resize_token_embeddings): 'error' rejects the edit; 'finetuned' edits the rows both share and "
            "copies the fine-tune's extra rows unchanged, since they have no pre-trained value."
        },
    )

    def __post_init__(self) -> None:
        self.alpha = _check_number("alpha", self.alpha)
        self.beta = _check_number("beta", self.beta)
        self.gamma = _check_number("gamma", self.gamma)
        if self.gamma is not None and not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.gamma is not None and (self.alpha is not None or self.beta is not None):
            alpha, beta = gamma_to_alpha_beta(self.gamma)
            if (self.alpha, self.beta) != (alpha, beta):
                raise ConfigError(
                    f"gamma={self.gamma} sets alpha={alpha} and beta={beta}, which conflicts with "
                    f"alpha={self.alpha}, beta={self.beta}: pass either gamma or alpha and beta"
                )

        if isinstance(self.non_block_scale, str):
            if self.non_block_scale not in NON_BLOCK_POLICIES:
                try:
                    self.non_block_scale = float(self.non_block_scale)
                except ValueError:
                    raise ConfigError(
                        f"non_block_scale must be one of {', '.join(NON_BLOCK_POLICIES)} or a number, "
                        f"got {self.non_block_scale!r}"
                    ) from None
        if not isinstance(self.non_block_scale, str):
            self.non_block_scale = _check_number("non_block_scale", self.non_block_scale)

        if self.stack_policy not in STACK_POLICIES:
            raise ConfigError(
                f"stack_policy must be one of {', '.join(STACK_POLICIES)}, got {self.stack_policy!r}"
            )

        if self.layer_pattern is not None:
            if not isinstance(self.layer_pattern, str):
                raise ConfigError(f"layer_pattern must be a string, got {self.layer_pattern!r}")
            try:
                compiled = re.compile(self.layer_pattern)
            except re.error as exc:
                raise ConfigError(f"layer_pattern {self.layer_pattern!r} is not a valid regex: {exc}") from None
            if compiled.groups < 1:
                raise ConfigError(
                    f"layer_pattern {self.layer_pattern!r} needs a capturing group for the block number, "
                    r"for example '^model\.layers\.(\d+)\.'"
                )

        self.num_layers = self._validated_num_layers(self.num_layers)

        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(f"exclude must be a list of regex strings, got {self.exclude!r}")
        self.exclude = list(self.exclude)
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"exclude pattern {pattern!r} is not a valid regex: {exc}") from None

        if self.out_dtype is not None and self.out_dtype not in DTYPE_NAMES:
            raise ConfigError(f"out_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.out_dtype!r}")

        if self.new_vocab_rows not in NEW_VOCAB_ROW_POLICIES:
            raise ConfigError(
                f"new_vocab_rows must be one of {', '.join(NEW_VOCAB_ROW_POLICIES)}, got {self.new_vocab_rows!r}"
            )

        for name in ("allow_missing_tensors", "allow_non_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @staticmethod
    def _validated_num_layers(value: Any) -> int | dict[str, int] | None:
        def check(label: str, depth: Any) -> int:
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
                raise ConfigError(f"{label} must be a positive integer, got {depth!r}")
            return depth

        if value is None:
            return None
        if isinstance(value, dict):
            return {str(stack): check(f"num_layers[{stack!r}]", depth) for stack, depth in value.items()}
        return check("num_layers", value)

    def resolved_alpha_beta(self, *, allow_auto_alpha: bool = False) -> tuple[float | None, float]:
        """Return ``(alpha, beta)``, expanding ``gamma``.

        Raises:
            ConfigError: if the pair is incomplete. ``alpha`` may be ``None`` only
                when ``allow_auto_alpha`` is true (merges).
        """
        if self.gamma is not None:
            return gamma_to_alpha_beta(self.gamma)
        if self.beta is None:
            raise ConfigError("beta is not set: pass alpha and beta (--alpha, --beta) or gamma (--gamma)")
        if self.alpha is None and not allow_auto_alpha:
            raise ConfigError("alpha is not set: pass alpha and beta (--alpha, --beta) or gamma (--gamma)")
        return self.alpha, self.beta

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LiNeSConfig":
        """Build a config from a dict, ignoring (with a warning) keys it does not know.

        ``lines_config.json`` also stores what an edit resolved (per-layer scales,
        inputs) under keys that are not fields; those are skipped silently.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a LiNeS config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        recorded = {"resolved", "lines_hf_version", "kind"}
        unknown = sorted(set(data) - known - recorded)
        if unknown:
            LOG.warning("Ignoring unknown LiNeS config keys: %s", ", ".join(unknown))
        return cls(**{key: value for key, value in data.items() if key in known})

    def save_pretrained(self, save_directory: str | os.PathLike, resolved: dict[str, Any] | None = None) -> str:
        """Write ``lines_config.json`` into ``save_directory`` and return its path.

        ``resolved`` records what the edit computed (alpha, beta, per-layer
        scales, inputs) next to the settings, so the file documents the output.
        """
        from . import __version__

        os.makedirs(save_directory, exist_ok=True)
        payload: dict[str, Any] = {"lines_hf_version": __version__, **self.to_dict()}
        if resolved is not None:
            payload["resolved"] = resolved
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False)
            handle.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LiNeSConfig":
        """Load a config from a folder holding ``lines_config.json`` or from the file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"no LiNeS config at {path}: expected a {CONFIG_NAME} file")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except RecursionError:
            raise ConfigError(f"{path} is nested too deeply to be a LiNeS config") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or an integer past Python's digit limit
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
