"""Per-tensor task-vector math: ``base + scale * (finetuned - base)``.

Computed in float32 (float64 when an input is float64) and cast once to the
output dtype. Scales of exactly 0 and 1 return the base and fine-tuned values
unchanged, so those identities hold bit for bit.
"""

from __future__ import annotations

import torch

from .errors import NonFiniteError

# Workspace buffers of apply_scale: the task vector, the widened base, the result.
_DELTA_BUFFER = 0
_BASE_BUFFER = 1
_OUT_BUFFER = 4

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype called ``name`` (``bfloat16``, ``int64`` ...)."""
    dtype = _DTYPES.get(name) or getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name of a torch dtype (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def task_vector(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """Return ``finetuned - base`` in the compute dtype."""
    dtype = compute_dtype(base.dtype, finetuned.dtype)
    return finetuned.to(dtype) - base.to(dtype)


def check_finite(delta: torch.Tensor, name: str) -> None:
    """Raise ``NonFiniteError`` naming ``name`` if ``delta`` has NaN or infinite entries."""
    # A NaN or infinite entry makes the sum NaN or infinite, so a finite sum
    # proves every entry finite in one vectorised pass. ``isfinite(...).all()``
    # allocates a bool tensor and was the slowest step of a streaming edit, so it
    # runs only when the sum is not finite (possibly an overflow of finite values).
    if bool(torch.isfinite(delta.sum())):
        return
    if not bool(torch.isfinite(delta).all()):
        bad = int((~torch.isfinite(delta)).sum())
        raise NonFiniteError(
            f"the task vector of tensor {name!r} has {bad} NaN or infinite value(s). Check both checkpoints; "
            "to edit anyway, pass allow_non_finite=True (--allow-non-finite)."
        )


def apply_scale(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    *,
    name: str = "<tensor>",
    allow_non_finite: bool = False,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Return ``base + scale * (finetuned - base)`` in ``out_dtype``.

    Works on whole tensors or on matching flat chunks of them. A scale of
    exactly 0 returns ``base`` and exactly 1 returns ``finetuned``, converted to
    ``out_dtype`` only if their dtype differs. With a ``workspace`` (flat
    inputs only) every intermediate and the result go into its reused buffers:
    the result is then a view of workspace buffer 4, valid until the next call.

    Raises:
        NonFiniteError: if the task vector has NaN or infinite entries and
            ``allow_non_finite`` is false.
    """
    dtype = compute_dtype(base.dtype, finetuned.dtype)
    if workspace is not None:
        delta = workspace.buffer(_DELTA_BUFFER, finetuned.numel(), dtype).copy_(finetuned)
        base_wide = workspace.buffer(_BASE_BUFFER, base.numel(), dtype).copy_(base)
        delta.sub_(base_wide)
    else:
        delta = finetuned.to(dtype)
        base_wide = base.to(dtype)
        delta = delta - base_wide if delta.data_ptr() == finetuned.data_ptr() else delta.sub_(base_wide)
    if not allow_non_finite:
        check_finite(delta, name)

    if scale == 0.0:
        result = base
    elif scale == 1.0:
        result = finetuned
    else:
        result = delta.mul_(scale).add_(base_wide)
    if workspace is None:
        return result.to(out_dtype)
    return workspace.buffer(_OUT_BUFFER, result.numel(), out_dtype).copy_(result)


class Workspace:
    """Flat scratch buffers reused from one chunk to the next.

    A streaming edit computes every chunk in a few float32 buffers. Allocating
    them afresh for each chunk costs a page fault per 4 KiB page, which took
    more time than the arithmetic itself. Buffer ``index`` grows to the largest
    request and is handed out as a view of its first ``numel`` elements. Each
    dtype has its own buffer per index, so a model that mixes dtypes does not
    reallocate at every switch. A view stays valid only until the next request
    for the same index and dtype.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def buffer(self, index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Return a flat, uninitialised view of ``numel`` elements of buffer ``index`` in ``dtype``."""
        current = self._buffers.get((index, dtype))
        if current is None or current.numel() < numel:
            current = torch.empty(numel, dtype=dtype)
            self._buffers[index, dtype] = current
        return current[:numel]


def scale_delta(delta: torch.Tensor, base: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Return ``base + scale * delta`` in ``out_dtype``; used for merged task vectors.

    A scale of exactly 0 returns ``base`` unchanged.
    """
    if scale == 0.0:
        return base.to(out_dtype)
    dtype = compute_dtype(base.dtype, delta.dtype)
    return (delta.to(dtype) * scale + base.to(dtype)).to(out_dtype)
