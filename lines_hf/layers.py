"""Which stack and block each tensor belongs to, and how deep each stack is.

Pure functions over tensor names and config dicts: nothing here reads files or
imports transformers. A *stack* is a sequence of transformer blocks run in
forward order, such as a decoder, T5's encoder or CLIP's vision tower. Its name
is the text of a tensor name up to the block number, for example ``encoder.block``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import DepthMismatchError, LayerResolutionError

LOG = logging.getLogger(__name__)

# Anchored at a name segment and lazy, so the *first* container followed by a
# number wins: T5's ``encoder.block.3.layer.1.`` is block 3 (not 1) and MoE's
# ``model.layers.5.mlp.experts.0.`` is block 5. A bare substring such as ``.3.``
# would also match those inner numbers.
DEFAULT_LAYER_PATTERN = r"^(?:.*?\.)?(?:layers?|h|block|blocks)\.(?P<index>\d+)\."

_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_DECODER_DEPTH_KEYS = ("num_decoder_layers", "decoder_layers")
_ENCODER_DEPTH_KEYS = ("encoder_layers", "num_layers", "num_hidden_layers")


@dataclass(frozen=True)
class BlockRef:
    """The block a tensor lives in: its stack name and 0-based index in that stack."""

    stack: str
    index: int


@dataclass(frozen=True)
class StackInfo:
    """A stack of blocks and the numbering its schedule uses.

    ``depth`` is the number of blocks in the stack. With the ``global`` policy
    the blocks of several stacks share one schedule: block ``i`` of this stack
    sits at position ``offset + i`` of a schedule of ``schedule_depth`` blocks.
    """

    name: str
    depth: int
    depth_source: str
    offset: int = 0
    schedule_depth: int = 0

    def position(self, index: int) -> tuple[int, int]:
        """Return ``(position, schedule_depth)`` of block ``index`` in the schedule."""
        return self.offset + index, self.schedule_depth or self.depth


@dataclass
class LayerMap:
    """Result of layer resolution over a set of tensor names."""

    blocks: dict[str, BlockRef]
    stacks: dict[str, StackInfo]
    outside: list[str] = field(default_factory=list)

    def locate(self, name: str) -> tuple[BlockRef, StackInfo] | None:
        """Return the block and stack of ``name``, or ``None`` if it is outside every block."""
        ref = self.blocks.get(name)
        if ref is None:
            return None
        return ref, self.stacks[ref.stack]


def compile_layer_pattern(pattern: str | None) -> re.Pattern[str]:
    """Compile a user layer pattern, or the default one."""
    return re.compile(pattern if pattern is not None else DEFAULT_LAYER_PATTERN)


def find_block(name: str, pattern: re.Pattern[str]) -> BlockRef | None:
    """Return the block that ``name`` belongs to, or ``None`` if it is outside every block.

    The block number is the group named ``index`` (or the first group). The
    stack is the text before that group, without its trailing dot.
    """
    match = pattern.search(name)
    if match is None:
        return None
    group: int | str = "index" if "index" in pattern.groupindex else 1
    number = match.group(group)
    if number is None or not number.isdigit():
        return None
    stack = name[: match.start(group)].rstrip(".")
    return BlockRef(stack=stack, index=int(number))


def _first_int(config: Mapping[str, Any], keys: Iterable[str]) -> tuple[int, str] | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def _sub_config(config: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = config.get(key)
    return value if isinstance(value, Mapping) else None


def config_depth(stack: str, config: Mapping[str, Any] | None) -> tuple[int, str] | None:
    """Return the depth that ``config`` gives for ``stack`` and the config key it came from.

    Rules, in order: a stack under a ``vision*`` or ``text*`` segment reads
    ``vision_config`` / ``text_config`` (CLIP-style towers); a ``decoder`` stack
    reads ``num_decoder_layers`` or ``decoder_layers``; an ``encoder`` stack of an
    encoder-decoder model reads ``encoder_layers`` or ``num_layers``; anything
    else reads ``num_hidden_layers``, ``n_layer`` or ``num_layers``. Returns
    ``None`` when the config has no such key.
    """
    if not config:
        return None
    segments = stack.split(".")

    for tower in ("vision", "text", "audio"):
        sub = _sub_config(config, f"{tower}_config")
        if sub is not None and any(segment.startswith(tower) for segment in segments):
            found = _first_int(sub, _DEPTH_KEYS)
            if found is not None:
                return found[0], f"{tower}_config.{found[1]}"

    is_encoder_decoder = bool(config.get("is_encoder_decoder")) or any(
        key in config for key in _DECODER_DEPTH_KEYS
    )
    if any("decoder" in segment for segment in segments):
        found = _first_int(config, _DECODER_DEPTH_KEYS)
        if found is not None:
            return found
        sub = _sub_config(config, "decoder")
        if sub is not None and (found := _first_int(sub, _DEPTH_KEYS)) is not None:
            return found[0], f"decoder.{found[1]}"
        if config.get("model_type") == "t5" or "num_layers" in config and is_encoder_decoder:
            # T5 and its relatives: num_decoder_layers defaults to num_layers.
            found = _first_int(config, ("num_layers",))
            if found is not None:
                return found
    if is_encoder_decoder and any("encoder" in segment for segment in segments):
        found = _first_int(config, _ENCODER_DEPTH_KEYS)
        if found is not None:
            return found
    return _first_int(config, _DEPTH_KEYS)


def _stack_order_key(stack: str) -> tuple[int, str]:
    # Encoder stacks run before decoder stacks; anything else keeps name order.
    segments = stack.split(".")
    if any("encoder" in segment for segment in segments):
        return 0, stack
    if any("decoder" in segment for segment in segments):
        return 1, stack
    return 2, stack


def _unmatched_message(names: list[str]) -> str:
    shown = ", ".join(names[:12])
    more = f" and {len(names) - 12} more" if len(names) > 12 else ""
    return (
        f"no transformer blocks found among {len(names)} tensor names ({shown}{more}). "
        "Pass a regex whose first group is the block number and the depth, for example "
        r"--layer-pattern '^backbone\.stages\.(\d+)\.' --num-layers 12 "
        "(Python: LiNeSConfig(layer_pattern=..., num_layers=...))"
    )


def resolve_layers(
    names: Iterable[str],
    config: Mapping[str, Any] | None,
    *,
    layer_pattern: str | None = None,
    num_layers: int | Mapping[str, int] | None = None,
    stack_policy: str = "per_stack",
    require_all_blocks: bool = True,
) -> LayerMap:
    """Assign each tensor name to a stack and block, and fix each stack's depth.

    Args:
        names: tensor names, for example the keys of a state dict.
        config: the model config as a dict (``config.json``), used for depths.
        layer_pattern: regex overriding ``DEFAULT_LAYER_PATTERN``.
        num_layers: depth overriding the config, one int for every stack or a
            mapping from stack name to depth.
        stack_policy: ``per_stack`` or ``global`` (encoder-decoder models only).
        require_all_blocks: when true, every block ``0 .. depth-1`` must have at
            least one tensor. Adapters that touch only some blocks pass false.

    Raises:
        LayerResolutionError: if no block is found, or ``global`` is asked for
            stacks that have no forward order (parallel towers).
        DepthMismatchError: if the config depth differs from the blocks found.
    """
    names = list(names)
    pattern = compile_layer_pattern(layer_pattern)

    blocks: dict[str, BlockRef] = {}
    outside: list[str] = []
    for name in names:
        ref = find_block(name, pattern)
        if ref is None:
            outside.append(name)
        else:
            blocks[name] = ref

    if not blocks:
        raise LayerResolutionError(_unmatched_message(outside))

    found: dict[str, set[int]] = {}
    for ref in blocks.values():
        found.setdefault(ref.stack, set()).add(ref.index)

    if isinstance(num_layers, Mapping):
        unknown = sorted(set(num_layers) - set(found))
        if unknown:
            raise LayerResolutionError(
                f"num_layers names stack(s) {unknown} that do not exist; the stacks found are {sorted(found)}. "
                "Use those names, for example --num-layers model.layers=32."
            )

    stacks: dict[str, StackInfo] = {}
    for stack in sorted(found, key=_stack_order_key):
        indices = found[stack]
        depth, source = _stack_depth(stack, config, num_layers, indices)
        _check_depth(stack, depth, source, indices, require_all_blocks, overridden=num_layers is not None)
        stacks[stack] = StackInfo(name=stack, depth=depth, depth_source=source)

    if stack_policy == "global" and len(stacks) > 1:
        stacks = _global_numbering(stacks)
    elif stack_policy not in ("global", "per_stack"):
        raise LayerResolutionError(f"stack_policy must be 'per_stack' or 'global', got {stack_policy!r}")

    return LayerMap(blocks=blocks, stacks=stacks, outside=outside)


def _stack_depth(
    stack: str,
    config: Mapping[str, Any] | None,
    num_layers: int | Mapping[str, int] | None,
    indices: set[int],
) -> tuple[int, str]:
    if isinstance(num_layers, Mapping):
        if stack in num_layers:
            return int(num_layers[stack]), "num_layers override"
    elif num_layers is not None:
        return int(num_layers), "num_layers override"

    from_config = config_depth(stack, config)
    if from_config is not None:
        return from_config[0], f"config.{from_config[1]}"

    depth = max(indices) + 1
    LOG.warning("The model config gives no depth for stack %r: using the %d blocks found", stack, depth)
    return depth, "blocks found"


def _check_depth(
    stack: str, depth: int, source: str, indices: set[int], require_all_blocks: bool, overridden: bool
) -> None:
    highest = max(indices)
    if highest >= depth:
        raise DepthMismatchError(
            f"stack {stack!r} has a block numbered {highest} but its depth is {depth} ({source}). "
            + (
                "Pass the right depth with --num-layers (Python: LiNeSConfig(num_layers=...))."
                if not overridden
                else "The --num-layers value is too small for this model."
            )
        )
    if require_all_blocks and len(indices) != depth:
        missing = sorted(set(range(depth)) - indices)
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DepthMismatchError(
            f"stack {stack!r}: {source} gives depth {depth} but {len(indices)} blocks were found "
            f"(missing block numbers: {shown}). If the checkpoint is right, pass its depth with "
            "--num-layers (Python: LiNeSConfig(num_layers=...)); if not, check that the right model was given."
        )


def _global_numbering(stacks: dict[str, StackInfo]) -> dict[str, StackInfo]:
    names = list(stacks)
    kinds = [_stack_order_key(name)[0] for name in names]
    if len(names) != 2 or sorted(kinds) != [0, 1]:
        raise LayerResolutionError(
            f"stack_policy 'global' needs one encoder and one decoder stack, found {names}. Parallel "
            "towers (such as CLIP's vision and text models) have no forward order across towers: use "
            "stack_policy 'per_stack' (--stack-policy per_stack)."
        )
    total = sum(info.depth for info in stacks.values())
    result: dict[str, StackInfo] = {}
    offset = 0
    for name in names:  # already in forward order: encoder, then decoder
        info = stacks[name]
        result[name] = StackInfo(
            name=name, depth=info.depth, depth_source=info.depth_source, offset=offset, schedule_depth=total
        )
        offset += info.depth
    return result


def align_names(
    finetuned_names: Iterable[str], base_names: Iterable[str], prefix_hint: str | None = None
) -> dict[str, str | None]:
    """Map each fine-tuned tensor name to the base tensor it derives from (or ``None``).

    A base saved from a bare backbone (``encoder.layer.0...``) and a fine-tune
    saved from a task model (``bert.encoder.layer.0...``) differ by the task
    model's ``base_model_prefix``. Exact names win; otherwise the prefix that
    matches the most names is stripped from, or added to, the fine-tuned name,
    as transformers does when it loads a backbone into a task model.
    """
    finetuned_names = list(finetuned_names)
    base_set = set(base_names)

    def hits_strip(prefix: str) -> int:
        cut = len(prefix) + 1
        return sum(1 for n in finetuned_names if n.startswith(prefix + ".") and n[cut:] in base_set)

    def hits_add(prefix: str) -> int:
        return sum(1 for n in finetuned_names if f"{prefix}.{n}" in base_set)

    strip_candidates = {n.split(".", 1)[0] for n in finetuned_names if "." in n}
    add_candidates = {n.split(".", 1)[0] for n in base_set if "." in n}
    if prefix_hint:
        strip_candidates.add(prefix_hint)
        add_candidates.add(prefix_hint)

    best_strip = max(strip_candidates, key=lambda p: (hits_strip(p), p == prefix_hint), default=None)
    best_add = max(add_candidates, key=lambda p: (hits_add(p), p == prefix_hint), default=None)
    strip = best_strip if best_strip is not None and hits_strip(best_strip) > 0 else None
    add = best_add if best_add is not None and hits_add(best_add) > 0 else None

    mapping: dict[str, str | None] = {}
    for name in finetuned_names:
        if name in base_set:
            mapping[name] = name
        elif strip is not None and name.startswith(strip + ".") and name[len(strip) + 1 :] in base_set:
            mapping[name] = name[len(strip) + 1 :]
        elif add is not None and f"{add}.{name}" in base_set:
            mapping[name] = f"{add}.{name}"
        else:
            mapping[name] = None
    return mapping
