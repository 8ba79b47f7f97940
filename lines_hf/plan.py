"""The edit plan: for every output tensor, where it comes from and which scale it gets.

Built from tensor names, dtypes and shapes only, so the same plan drives an
in-memory edit, a streaming edit of safetensors files and a dry run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import LiNeSConfig
from .errors import ArchitectureMismatchError, TensorMismatchError
from .layers import LayerMap, align_names, resolve_layers
from .schedule import linear_scale

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})

# Reasons for a tensor's action, recorded in dry runs and lines_config.json.
LOG = logging.getLogger(__name__)

REASON_BLOCK = "block"
REASON_OUTSIDE = "outside blocks"
REASON_EXCLUDED = "excluded"
REASON_NOT_IN_BASE = "not in base"
REASON_NOT_FLOAT = "not floating point"


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (torch name such as ``bfloat16``) and shape of a stored tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class TensorAction:
    """The action planned for one output tensor.

    ``scale`` is ``None`` when the tensor has no task vector and is copied from
    the fine-tune unchanged (a new head, an integer buffer). Otherwise the output
    is ``base + scale * (finetuned - base)``. ``base_rows`` is set when the
    fine-tune has more rows (dimension 0) than the base, as after
    ``resize_token_embeddings``: only the first ``base_rows`` rows are edited and
    the rest are copied from the fine-tune.
    """

    name: str
    base_name: str | None
    shape: tuple[int, ...]
    dtype: str
    out_dtype: str
    scale: float | None
    reason: str
    stack: str | None = None
    block: int | None = None
    base_rows: int | None = None


@dataclass
class EditPlan:
    """The actions for every output tensor, in the fine-tune's order, and the resolved schedule."""

    actions: list[TensorAction]
    layer_map: LayerMap
    alpha: float
    beta: float
    non_block_scale: float
    dropped: list[str] = field(default_factory=list)
    tied_in_base: dict[str, str] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def by_name(self) -> dict[str, TensorAction]:
        return {action.name: action for action in self.actions}

    def stack_scales(self) -> dict[str, list[float]]:
        """Return, per stack, the scale of each of its blocks in order."""
        result = {}
        for name, info in self.layer_map.stacks.items():
            scales = []
            for index in range(info.depth):
                position, depth = info.position(index)
                scales.append(linear_scale(position, depth, self.alpha, self.beta))
            result[name] = scales
        return result

    def not_in_base(self) -> list[str]:
        return [a.name for a in self.actions if a.reason == REASON_NOT_IN_BASE]

    def summary(self) -> dict[str, Any]:
        """Return a JSON-serialisable record of the resolved schedule."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "non_block_scale": self.non_block_scale,
            "stacks": {
                name: {
                    "depth": info.depth,
                    "depth_source": info.depth_source,
                    "schedule_offset": info.offset,
                    "schedule_depth": info.schedule_depth or info.depth,
                    "scales": self.stack_scales()[name],
                }
                for name, info in self.layer_map.stacks.items()
            },
            "copied_from_finetuned_not_in_base": self.not_in_base(),
            "excluded": [a.name for a in self.actions if a.reason == REASON_EXCLUDED],
            "dropped_base_only": list(self.dropped),
            "tied_in_base": dict(self.tied_in_base),
            "new_vocab_rows": {
                a.name: {"base_rows": a.base_rows, "finetuned_rows": a.shape[0]}
                for a in self.actions
                if a.base_rows is not None
            },
        }

    def rows(self) -> list[tuple[str, str, str, str]]:
        """Return ``(name, stack, block, scale)`` strings for a dry-run table."""
        rows = []
        for action in self.actions:
            stack = action.stack or "-"
            block = "-" if action.block is None else str(action.block)
            scale = "copy" if action.scale is None else f"{action.scale:.6g}"
            rows.append((action.name, stack, block, f"{scale} ({action.reason})"))
        return rows


DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")


def _model_types(config: Mapping[str, Any]) -> set[str]:
    """Return the ``model_type`` of a config and of every sub-config nested in it."""
    found = set()
    if isinstance(config.get("model_type"), str):
        found.add(config["model_type"])
    for value in config.values():
        if isinstance(value, Mapping):
            found |= _model_types(value)
    return found


def _depths(config: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """Return every depth field of a config and of its sub-configs, keyed by dotted path."""
    found = {}
    for key, value in config.items():
        if key in DEPTH_KEYS and isinstance(value, int) and not isinstance(value, bool):
            found[prefix + key] = value
        elif isinstance(value, Mapping):
            found.update(_depths(value, f"{prefix}{key}."))
    return found


def check_same_architecture(
    finetuned: Mapping[str, Any] | None,
    base: Mapping[str, Any] | None,
    finetuned_location: str = "the fine-tune",
    base_location: str = "the base model",
) -> None:
    """Check that two ``config.json`` dicts describe the same architecture and depth.

    A ``model_type`` that differs passes only when one config nests the other's
    (a ``CLIPVisionModel`` fine-tune of a ``CLIPModel`` base). With equal model
    types, every depth field present in both (``num_hidden_layers``, ``n_layer``
    and the like, also in sub-configs) must agree.

    Raises:
        ArchitectureMismatchError: naming both values and both locations.
    """
    if not finetuned or not base:
        return
    tuned_type, base_type = finetuned.get("model_type"), base.get("model_type")
    if isinstance(tuned_type, str) and isinstance(base_type, str) and tuned_type != base_type:
        if tuned_type not in _model_types(base) and base_type not in _model_types(finetuned):
            raise ArchitectureMismatchError(
                f"{finetuned_location} is a {tuned_type!r} model but {base_location} is a {base_type!r} model: "
                "LiNeS edits a fine-tune against the pre-trained model it was trained from. Pass that base model."
            )
        return
    tuned_depths, base_depths = _depths(finetuned), _depths(base)
    for key in sorted(set(tuned_depths) & set(base_depths)):
        if tuned_depths[key] != base_depths[key]:
            raise ArchitectureMismatchError(
                f"{finetuned_location} has {key}={tuned_depths[key]} but {base_location} has "
                f"{key}={base_depths[key]}: both models must have the same depth. Pass the base model the "
                "fine-tune was trained from."
            )


def non_block_value(policy: str | float, alpha: float) -> float:
    """Return the scale of tensors outside every block under ``policy``."""
    if policy == "alpha":
        return alpha
    if policy == "keep":
        return 1.0
    if policy == "base":
        return 0.0
    return float(policy)


def build_plan(
    finetuned: Sequence[TensorSpec],
    base: Sequence[TensorSpec],
    model_config: Mapping[str, Any] | None,
    config: LiNeSConfig,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    prefix_hint: str | None = None,
    name_map: Mapping[str, str | None] | None = None,
    tied_in_base: Mapping[str, str] | None = None,
    tied_in_finetuned: Mapping[str, str] | None = None,
) -> EditPlan:
    """Plan a LiNeS edit of ``finetuned`` against ``base``.

    Args:
        finetuned: the fine-tune's tensors; the output has exactly these names.
        base: the base model's tensors.
        model_config: the fine-tune's ``config.json`` as a dict (depths).
        config: the LiNeS settings.
        alpha, beta: override the config's values (merges pass the computed alpha).
        prefix_hint: the task model's ``base_model_prefix``, when known.
        name_map: an explicit fine-tuned-to-base name mapping, instead of aligning.
        tied_in_base: tensors that the base ties to another one and does not
            store, mapped to the stored tensor (``lm_head.weight`` ->
            ``model.embed_tokens.weight``). A fine-tuned tensor of such a name
            takes its task vector against the stored tensor.
        tied_in_finetuned: the same for the fine-tune; used to explain a base
            tensor that the fine-tune lacks because it ties it.

    Raises:
        ConfigError: if alpha or beta is missing.
        TensorMismatchError: on shape or dtype mismatches, or base tensors the
            fine-tune lacks (unless ``config.allow_missing_tensors``).
        LayerResolutionError: if the blocks cannot be found.
    """
    if alpha is None or beta is None:
        config_alpha, config_beta = config.resolved_alpha_beta()
        alpha = config_alpha if alpha is None else alpha
        beta = config_beta if beta is None else beta
    assert alpha is not None and beta is not None

    base_by_name = {spec.name: spec for spec in base}
    # Tied names resolve to the stored tensor's spec, so alignment can match them.
    ties = {
        alias: stored
        for alias, stored in (tied_in_base or {}).items()
        if alias not in base_by_name and stored in base_by_name
    }
    base_by_name.update({alias: base_by_name[stored] for alias, stored in ties.items()})
    if name_map is None:
        name_map = align_names([s.name for s in finetuned], base_by_name, prefix_hint=prefix_hint)
    tied: dict[str, str] = {}

    layer_map = resolve_layers(
        [s.name for s in finetuned],
        model_config,
        layer_pattern=config.layer_pattern,
        num_layers=config.num_layers,
        stack_policy=config.stack_policy,
    )
    outside_scale = non_block_value(config.non_block_scale, alpha)
    excludes = [re.compile(p) for p in config.exclude]

    actions: list[TensorAction] = []
    used_base: set[str] = set()
    for spec in finetuned:
        base_name = name_map.get(spec.name)
        base_spec = base_by_name.get(base_name) if base_name is not None else None
        if base_spec is not None and base_name in ties and spec.is_float:
            tied[spec.name] = base_spec.name
            LOG.info(
                "Tensor %s has no separate tensor in the base model, which ties %s to %s: its task vector is "
                "taken against %s",
                spec.name,
                base_name,
                base_spec.name,
                base_spec.name,
            )
        if base_spec is not None:
            base_name = base_spec.name
        located = layer_map.locate(spec.name)
        stack = located[0].stack if located else None
        block = located[0].index if located else None
        out_dtype = config.out_dtype or spec.dtype if spec.is_float else spec.dtype

        def action(
            scale: float | None, reason: str, base_name: str | None = base_name, base_rows: int | None = None
        ) -> TensorAction:
            return TensorAction(
                name=spec.name,
                base_name=base_name,
                shape=spec.shape,
                dtype=spec.dtype,
                out_dtype=out_dtype,
                scale=scale,
                reason=reason,
                stack=stack,
                block=block,
                base_rows=base_rows,
            )

        if base_spec is not None:
            used_base.add(base_spec.name)
        if not spec.is_float:
            actions.append(action(None, REASON_NOT_FLOAT, None))
            continue
        if base_spec is None:
            if located is not None:
                raise TensorMismatchError(
                    f"tensor {spec.name!r} lies in block {block} of stack {stack!r} but the base model has "
                    "no matching tensor. The two checkpoints probably use different names or layouts (for "
                    "example ViT saved with and without save_original_format): save both with the same "
                    "transformers version and settings, or check that the right base model was given."
                )
            actions.append(action(None, REASON_NOT_IN_BASE, None))
            continue
        base_rows = _check_pair(spec, base_spec, config, in_block=located is not None)
        if any(p.search(spec.name) for p in excludes):
            actions.append(action(1.0, REASON_EXCLUDED, base_rows=base_rows))
        elif located is not None:
            ref, info = located
            position, depth = info.position(ref.index)
            actions.append(action(linear_scale(position, depth, alpha, beta), REASON_BLOCK))
        else:
            actions.append(action(outside_scale, REASON_OUTSIDE, base_rows=base_rows))

    dropped = []
    for spec in base:
        if spec.name in used_base or not spec.is_float:
            continue
        dropped.append(spec.name)
    untied = [name for name in dropped if name in (tied_in_finetuned or {})]
    if untied and not config.allow_missing_tensors:
        name = untied[0]
        raise TensorMismatchError(
            f"the base model stores {name!r} as its own tensor, but the fine-tune ties it to "
            f"{tied_in_finetuned[name]!r} and does not store it (tie_word_embeddings). The output keeps the "
            f"fine-tune's tie, so the base's {name!r} has no place in it: pass allow_missing_tensors=True "
            "(--allow-missing-tensors) to leave it out, or use a fine-tune saved with untied weights."
        )
    if dropped and not config.allow_missing_tensors:
        shown = ", ".join(dropped[:10]) + (f" and {len(dropped) - 10} more" if len(dropped) > 10 else "")
        raise TensorMismatchError(
            f"the base model has {len(dropped)} floating-point tensor(s) that the fine-tune lacks: {shown}. "
            "Check that the fine-tune derives from this base; to drop them from the output, pass "
            "allow_missing_tensors=True (--allow-missing-tensors)."
        )

    return EditPlan(
        actions=actions,
        layer_map=layer_map,
        alpha=float(alpha),
        beta=float(beta),
        non_block_scale=outside_scale,
        dropped=dropped,
        tied_in_base=tied,
    )


def _check_pair(finetuned: TensorSpec, base: TensorSpec, config: LiNeSConfig, *, in_block: bool) -> int | None:
    """Check that a fine-tuned tensor can be edited against its base tensor.

    Returns:
        ``None``, or the base's row count when the fine-tune only adds rows to a
        tensor outside every block and ``config.new_vocab_rows`` is ``"finetuned"``.
    """
    base_rows = None
    if finetuned.shape != base.shape:
        hint = ""
        rows_differ = len(finetuned.shape) == len(base.shape) >= 1 and finetuned.shape[1:] == base.shape[1:]
        if rows_differ and finetuned.shape[0] > base.shape[0] and not in_block:
            if config.new_vocab_rows == "finetuned":
                base_rows = base.shape[0]
            else:
                hint = (
                    " The fine-tune has more rows, as after resize_token_embeddings, and the new rows have no "
                    "pre-trained value to scale against. To edit the shared rows and copy the new ones "
                    "unchanged, pass new_vocab_rows='finetuned' (--new-vocab-rows finetuned)."
                )
        elif rows_differ:
            hint = (
                " The first dimension differs, as after resize_token_embeddings, but lines_hf can only add "
                "rows outside the transformer blocks, never remove them."
            )
    if finetuned.shape != base.shape and base_rows is None:
        raise TensorMismatchError(
            f"shape mismatch for tensor {finetuned.name!r}: fine-tuned {list(finetuned.shape)} vs base "
            f"{list(base.shape)} (base name {base.name!r}).{hint} Both models must share one architecture."
        )
    if not base.is_float:
        raise TensorMismatchError(
            f"tensor {finetuned.name!r} is {finetuned.dtype} in the fine-tune but {base.dtype} in the base"
        )
    if finetuned.dtype != base.dtype and config.out_dtype is None:
        raise TensorMismatchError(
            f"dtype mismatch for tensor {finetuned.name!r}: fine-tuned {finetuned.dtype} vs base {base.dtype}. "
            "Pass out_dtype (--out-dtype, for example float32 or bfloat16) to compute in float32 and store "
            "every tensor in that dtype."
        )
    return base_rows
