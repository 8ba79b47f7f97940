"""Per-block scales of the LiNeS schedule.

Block ``l`` of a stack with ``L`` blocks (0-based, in forward order) gets
``alpha + beta * l / (L - 1)``. The first block gets ``alpha`` and the last
``alpha + beta``. A stack with a single block counts it as the last block, so
it gets ``alpha + beta``.
"""

from __future__ import annotations

import math


def linear_scale(block: int, depth: int, alpha: float, beta: float) -> float:
    """Return the LiNeS scale of block ``block`` in a stack of ``depth`` blocks.

    Raises:
        ValueError: if ``depth < 1`` or ``block`` is outside ``[0, depth)``.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    if not 0 <= block < depth:
        raise ValueError(f"block index {block} is outside a stack of depth {depth}")

    if depth == 1 or block == depth - 1:
        return float(alpha + beta)
    # Divide first: beta * block / (depth - 1) can round the last block off alpha + beta.
    return float(alpha + beta * (block / (depth - 1)))


def linear_scales(depth: int, alpha: float, beta: float) -> list[float]:
    """Return the scales of every block of a stack of ``depth`` blocks, in order."""
    return [linear_scale(block, depth, alpha, beta) for block in range(depth)]


def gamma_to_alpha_beta(gamma: float) -> tuple[float, float]:
    """Convert the one-knob form to ``(alpha, beta) = (gamma, 1 - gamma)``.

    The last block then always keeps its full update (scale 1).
    """
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    return float(gamma), float(1.0 - gamma)
