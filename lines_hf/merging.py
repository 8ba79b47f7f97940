"""Merge methods on task vectors, and the automatic alpha of a LiNeS merge.

Pure tensor math: nothing here reads files or imports transformers. Every
function works on flat float32 chunks, with the task vectors of ``T`` fine-tunes
stacked into a ``(T, n)`` tensor, so the streaming driver (``merge.py``) and an
in-memory computation on whole flattened vectors give the same numbers.

Methods (``tau_t`` is the task vector of fine-tune ``t``):

- ``task_arithmetic``: ``sum_t tau_t``.
- ``ties``: keep the top ``density`` fraction of each ``tau_t`` by magnitude,
  elect a sign per parameter from the sum of the trimmed vectors, and average
  the non-zero trimmed entries that agree with it (0 where none agree).
- ``consensus`` (TALL masks): ``mask_t = |tau_t| >= lam_t * |tau_sum - tau_t|``;
  parameters active in at least ``k`` masks keep ``tau_sum``, the rest get 0.
- ``dare_linear`` / ``dare_ties``: drop each entry with probability ``p`` and
  rescale the rest by ``1 / (1 - p)``, then sum (linear) or elect and average
  as TIES does.

The top-k threshold of TIES is exact without holding a task vector in
memory. A sample of evenly strided magnitudes brackets the threshold, and one
counting pass over all magnitudes keeps only those inside the bracket, among
which the exact value is selected. If the bracket misses (the count shows it),
radix selection on float32 bit patterns takes over: for non-negative floats the
bit pattern, read as an integer, orders like the value, so histograms of the
high and then the low 16 bits find the exact value in two more passes.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import MERGE_METHODS, TIES_TRIM_SCOPES  # noqa: F401 (re-exported)

from .errors import ConfigError

METHODS = MERGE_METHODS


def _grid(stop_tenths: int) -> tuple[float, ...]:
    return tuple(round(0.1 * i, 10) for i in range(1, stop_tenths + 1))


# Grids of beta (with LiNeS) or of the global scale (without), searched on
# validation data. Task arithmetic, Consensus and TIES use the LiNeS reference
# grids. The reference has no DARE runs: dare_linear takes the task-arithmetic
# grid and dare_ties the TIES grid, because each sums or averages the same way.
REFERENCE_GRIDS: dict[str, tuple[float, ...]] = {
    "task_arithmetic": _grid(10),
    "consensus": _grid(10),
    "ties": _grid(15),
    "dare_linear": _grid(10),
    "dare_ties": _grid(15),
}

# DARE draws its uniform numbers in blocks of this many elements, each block
# from its own generator, so every chunking of a tensor gets the same numbers.
DARE_BLOCK_ELEMENTS = 1 << 20

# Columns per block of merge_chunk: four rows of this many float32 values
# (1 MB) and the temporaries of each step stay in the CPU cache. A TIES chunk
# of 4 x 262,144 values took 2.3 ms in blocks of 65,536 columns, 2.7 ms in
# blocks of 32,768 and 13.7 ms unblocked (one thread, 2-core VM).
BLOCK_COLUMNS = 1 << 16

_HIGH_BUCKETS = 1 << 15  # sign bit is 0 for magnitudes, so the high half is < 2**15
_LOW_BUCKETS = 1 << 16


@dataclass(frozen=True)
class MergeMethod:
    """A merge method and its parameters.

    Attributes:
        name: one of ``METHODS``.
        density: fraction of each task vector that TIES keeps (top-k by magnitude).
        ties_trim: ``global`` trims over the whole task vector, as the LiNeS and
            TIES reference code does. ``per_tensor`` trims each tensor on its
            own, as mergekit does.
        consensus_lam: ``lam_t`` of the TALL masks, one number for every task or
            one per task.
        consensus_k: minimum number of tasks whose mask must keep a parameter.
        drop_rate: DARE's drop probability ``p`` in ``[0, 1)``.
        seed: DARE's seed; the random numbers of each tensor derive from it and
            the tensor's name.
    """

    name: str = "task_arithmetic"
    density: float = 0.2
    ties_trim: str = "global"
    consensus_lam: float | tuple[float, ...] = 0.4
    consensus_k: int = 2
    drop_rate: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"merge method must be one of {', '.join(METHODS)}, got {self.name!r}")
        if not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density!r}")
        if self.ties_trim not in TIES_TRIM_SCOPES:
            raise ConfigError(f"ties_trim must be one of {', '.join(TIES_TRIM_SCOPES)}, got {self.ties_trim!r}")
        lams = self.consensus_lam if isinstance(self.consensus_lam, (tuple, list)) else (self.consensus_lam,)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in lams):
            raise ConfigError(f"consensus_lam must be non-negative numbers, got {self.consensus_lam!r}")
        if isinstance(self.consensus_lam, list):
            object.__setattr__(self, "consensus_lam", tuple(float(v) for v in self.consensus_lam))
        if isinstance(self.consensus_k, bool) or not isinstance(self.consensus_k, int) or self.consensus_k < 1:
            raise ConfigError(f"consensus_k must be a positive integer, got {self.consensus_k!r}")
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    @property
    def trims_top_k(self) -> bool:
        return self.name == "ties"

    @property
    def uses_dare(self) -> bool:
        return self.name in ("dare_linear", "dare_ties")

    def lams(self, num_tasks: int) -> torch.Tensor:
        """Return ``lam_t`` of the TALL masks as a ``(num_tasks, 1)`` float32 tensor.

        Raises:
            ConfigError: if a per-task list has the wrong length.
        """
        if isinstance(self.consensus_lam, tuple):
            if len(self.consensus_lam) != num_tasks:
                raise ConfigError(
                    f"consensus_lam has {len(self.consensus_lam)} values but {num_tasks} models are merged: "
                    "pass one value per model, or a single number"
                )
            values = list(self.consensus_lam)
        else:
            values = [float(self.consensus_lam)] * num_tasks
        return torch.tensor(values, dtype=torch.float32).unsqueeze(1)

    def params(self) -> dict[str, Any]:
        """Return the parameters that affect this method, for records and model cards."""
        if self.name == "ties":
            return {"density": self.density, "ties_trim": self.ties_trim}
        if self.name == "consensus":
            lam = list(self.consensus_lam) if isinstance(self.consensus_lam, tuple) else self.consensus_lam
            return {"consensus_lam": lam, "consensus_k": self.consensus_k}
        if self.uses_dare:
            return {"drop_rate": self.drop_rate, "seed": self.seed}
        return {}


# --------------------------------------------------------------------------- top-k threshold


def threshold_rank(numel: int, density: float) -> int:
    """Return the 1-based rank ``k`` of the trimming threshold among ``numel`` sorted magnitudes.

    TIES keeps every entry whose magnitude is at least the ``k``-th smallest,
    with ``k = numel - int(density * numel)`` as in the reference code. A rank
    of 0 (nothing to drop) keeps every entry.
    """
    return numel - int(density * numel)


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """Return ``|values|`` as int32 bit patterns, which order like the magnitudes (float32 input)."""
    return values.abs().view(torch.int32)


class RadixSelect:
    """Exact k-th smallest magnitude of a stream of chunks, in two passes.

    Pass 1: ``add_high(chunk)`` for every chunk, then ``finish_high(k)``.
    Pass 2 (skipped when pass 1 already decides it): ``add_low(chunk)`` for the
    same chunks, then ``threshold()``. Chunks are float32; NaN entries must be
    rejected before, because their bit patterns sort above infinity.
    """

    def __init__(self) -> None:
        self.high = torch.zeros(_HIGH_BUCKETS, dtype=torch.int64)
        self.low = torch.zeros(_LOW_BUCKETS, dtype=torch.int64)
        self.count = 0
        self.bucket: int | None = None
        self.rank_in_bucket = 0
        self._value: float | None = None

    def add_high(self, chunk: torch.Tensor) -> None:
        bits = magnitude_bits(chunk.reshape(-1))
        self.high += torch.bincount(bits >> 16, minlength=_HIGH_BUCKETS)
        self.count += bits.numel()

    def finish_high(self, rank: int) -> bool:
        """Locate the bucket of the ``rank``-th smallest magnitude; return whether pass 2 is needed.

        Raises:
            ValueError: if ``rank`` is outside ``[0, count]``.
        """
        if not 0 <= rank <= self.count:
            raise ValueError(f"rank {rank} is outside [0, {self.count}]")
        if rank == 0:
            self._value = 0.0
            return False
        cumulative = torch.cumsum(self.high, 0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=torch.int64)))
        before = int(cumulative[bucket - 1]) if bucket > 0 else 0
        self.bucket = bucket
        self.rank_in_bucket = rank - before
        return True

    def add_low(self, chunk: torch.Tensor) -> None:
        assert self.bucket is not None, "finish_high must come before add_low"
        bits = magnitude_bits(chunk.reshape(-1))
        inside = bits[(bits >> 16) == self.bucket]
        if inside.numel():
            self.low += torch.bincount(inside & 0xFFFF, minlength=_LOW_BUCKETS)

    def threshold(self) -> float:
        """Return the exact ``rank``-th smallest magnitude."""
        if self._value is not None:
            return self._value
        assert self.bucket is not None
        cumulative = torch.cumsum(self.low, 0)
        low = int(torch.searchsorted(cumulative, torch.tensor(self.rank_in_bucket, dtype=torch.int64)))
        bits = (self.bucket << 16) | low
        self._value = struct.unpack("<f", struct.pack("<I", bits))[0]
        return self._value


def bracket(sample: torch.Tensor, rank: int, numel: int) -> tuple[float, float]:
    """Return magnitudes ``(low, high)`` that very likely enclose the ``rank``-th smallest of ``numel``.

    ``sample`` contains magnitudes drawn evenly from the ``numel`` values. The
    bracket spans eight standard errors of the sample quantile on each side;
    callers verify it by counting, so a wrong bracket costs time, never
    correctness.
    """
    ordered = torch.sort(sample.reshape(-1)).values
    size = ordered.numel()
    quantile = rank / numel
    margin = 8.0 * math.sqrt(max(quantile * (1.0 - quantile), 1.0 / size) / size) + 2.0 / size
    low_index = max(0, math.floor((quantile - margin) * size))
    high_index = min(size - 1, math.ceil((quantile + margin) * size))
    return float(ordered[low_index]), float(ordered[high_index])


class GrowingBuffer:
    """A float32 vector that grows by doubling, filled by ``append``.

    Many small kept pieces, each allocated between the large chunk buffers of a
    pass, fragment the heap so that freed chunks are not reused; one buffer
    that doubles keeps the process's memory flat.
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._data = torch.empty(capacity, dtype=torch.float32)
        self._size = 0

    def append(self, values: torch.Tensor) -> None:
        count = values.numel()
        if self._size + count > self._data.numel():
            grown = torch.empty(max(2 * self._data.numel(), self._size + count), dtype=torch.float32)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : self._size + count] = values.reshape(-1)
        self._size += count

    def values(self) -> torch.Tensor:
        return self._data[: self._size]


class WindowSelect:
    """Exact k-th smallest magnitude of a stream of chunks, given a bracket ``(low, high)``.

    Every chunk goes through ``add``, which counts the magnitudes below ``low``
    and keeps those inside ``[low, high]``. ``threshold`` returns the exact
    ``rank``-th smallest magnitude, or None when the bracket missed it. In that
    case a ``RadixSelect`` over the data finds the value.
    """

    def __init__(self, low: float, high: float, rank: int) -> None:
        self.low = low
        self.high = high
        self.rank = rank
        self.below = 0
        self.window = GrowingBuffer()

    def add(self, magnitudes: torch.Tensor) -> None:
        # numpy counts and masks a 2.6e5-element chunk about 2.5 times faster than torch on CPU.
        flat = magnitudes.reshape(-1).numpy()
        self.below += int(np.count_nonzero(flat < self.low))
        self.window.append(torch.from_numpy(flat[(flat >= self.low) & (flat <= self.high)]))

    def threshold(self) -> float | None:
        if self.rank == 0:
            return 0.0
        inside = self.window.values()
        position = self.rank - self.below
        if not 1 <= position <= inside.numel():
            return None
        return float(torch.kthvalue(inside, position).values)


def kth_smallest_magnitude(values: torch.Tensor, rank: int, *, scratch: torch.Tensor | None = None) -> float:
    """Return the ``rank``-th smallest ``|values|`` (1-based; 0 for rank 0) of an in-memory tensor.

    The magnitudes are written into ``scratch`` (a float32 or float64 buffer of
    at least ``values.numel()`` elements, reused by the caller) or into a new
    tensor, and numpy's introselect (``ndarray.partition``) finds the exact
    value in place. On 1.2e7 float32 values it took 17 ms here; a sampled
    bracket with a counting pass in torch took 104 ms and ``torch.kthvalue``
    305 ms.
    """
    flat = values.reshape(-1)
    numel = flat.numel()
    if not 0 <= rank <= numel:
        raise ValueError(f"rank {rank} is outside [0, {numel}]")
    if rank == 0:
        return 0.0
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if scratch is None or scratch.dtype != dtype or scratch.numel() < numel:
        scratch = torch.empty(numel, dtype=dtype)
    magnitudes = torch.abs(flat, out=scratch[:numel]) if flat.dtype == dtype else scratch[:numel].copy_(flat).abs_()
    array = magnitudes.numpy()
    array.partition(rank - 1)
    return float(array[rank - 1])


def trim(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of ``taus`` (T, n) whose magnitude is below its task's threshold (T,)."""
    # sign(|x| - t) + 1, capped at 1, is 1 where |x| >= t and 0 below: a keep
    # mask computed without booleans (see disjoint_mean).
    keep = taus.abs().sub_(thresholds.reshape(-1, 1)).sign_().add_(1.0).clamp_(max=1.0)
    return keep.mul_(taus)


# --------------------------------------------------------------------------- DARE randomness


def dare_key(seed: int, tensor_name: str, task: int) -> int:
    """Return the 63-bit key of DARE's random numbers for one tensor of one task."""
    digest = hashlib.blake2b(f"{seed}\0{task}\0{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_uniform(key: int, start: int, count: int) -> torch.Tensor:
    """Return uniform [0, 1) numbers for flat elements ``start .. start+count`` of a tensor.

    Block ``j`` of ``DARE_BLOCK_ELEMENTS`` elements draws from a generator
    seeded by ``key`` and ``j``, so the numbers of an element do not depend on
    how the tensor is cut into chunks or in which order chunks are read.
    """
    out = torch.empty(count, dtype=torch.float32)
    position = start
    end = start + count
    generator = torch.Generator()
    while position < end:
        block = position // DARE_BLOCK_ELEMENTS
        block_start = block * DARE_BLOCK_ELEMENTS
        take_end = min(end, block_start + DARE_BLOCK_ELEMENTS)
        generator.manual_seed((key + block * 0x9E3779B97F4A7C15) % (1 << 63))
        numbers = torch.rand(take_end - block_start, generator=generator, dtype=torch.float32)
        out[position - start : take_end - start] = numbers[position - block_start :]
        position = take_end
    return out


def dare(taus: torch.Tensor, uniforms: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Drop each entry of ``taus`` where its uniform number is below ``drop_rate``; rescale the rest.

    ``taus`` and ``uniforms`` have the same shape. Kept entries are multiplied by
    ``1 / (1 - drop_rate)``, so the expected value is unchanged.
    """
    if drop_rate == 0.0:
        return taus
    keep = uniforms >= drop_rate
    return taus * keep * (1.0 / (1.0 - drop_rate))


# --------------------------------------------------------------------------- sign election


def disjoint_mean(trimmed: torch.Tensor) -> torch.Tensor:
    """Elect a sign per parameter and average the entries that agree with it.

    ``trimmed`` is ``(T, n)``. The elected sign is that of the column sum; a sum
    of exactly 0 elects ``+``. Returns ``(n,)``: the mean of the non-zero entries
    whose sign is the elected one, 0 where there is none.
    """
    # NOTE: the TIES reference code gives a column sum of exactly 0 the sign of
    # the whole model's majority, a global quantity; here such columns elect +,
    # which matches the reference whenever the majority sign is positive.
    # Arithmetic on signs replaces boolean masks, which are several times slower
    # per element in torch on CPU. sign(sign(s) + 0.5) maps -1, 0, 1 to -1, 1, 1.
    elected = trimmed.sum(dim=0).sign_().add_(0.5).sign_()
    # entry * elected > 0 exactly for agreeing entries, and equals their magnitude.
    agreeing = (trimmed * elected).clamp_(min=0.0)
    count = agreeing.sign().sum(dim=0).clamp_(min=1.0)
    return agreeing.sum(dim=0).mul_(elected).div_(count)


def consensus_mask(taus: torch.Tensor, total: torch.Tensor, lams: torch.Tensor, min_agree: int) -> torch.Tensor:
    """Return the boolean ``(n,)`` mask of parameters kept by at least ``min_agree`` TALL masks.

    ``taus`` is ``(T, n)``, ``total`` its column sum ``(n,)`` and ``lams`` the
    per-task ``lam_t`` as ``(T, 1)``.
    """
    masks = taus.abs() >= lams * (total.unsqueeze(0) - taus).abs()
    return masks.sum(dim=0) >= min_agree


# --------------------------------------------------------------------------- one chunk


def merge_chunk(
    method: MergeMethod,
    taus: torch.Tensor,
    *,
    thresholds: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the merged task vector ``(n,)`` of one chunk of stacked task vectors ``(T, n)``.

    Args:
        method: the merge method.
        taus: float32 task vectors of the same flat elements, one row per task.
        thresholds: ``(T,)`` trimming thresholds, needed by ``ties``.
        uniforms: ``(T, n)`` uniform numbers, needed by the DARE methods.

    Raises:
        ValueError: if the method needs ``thresholds`` or ``uniforms`` and they are missing.
    """
    if method.name == "ties" and thresholds is None:
        raise ValueError("ties needs the trimming thresholds of every task")
    if method.uses_dare and uniforms is None:
        raise ValueError(f"{method.name} needs DARE's uniform numbers")

    # Column blocks keep the temporaries of each step in the CPU cache; every
    # step is per parameter, so blocking does not change the result.
    width = taus.shape[1]
    if width <= BLOCK_COLUMNS:
        return _merge_block(method, taus, thresholds, uniforms)
    out = torch.empty(width, dtype=taus.dtype)
    for begin in range(0, width, BLOCK_COLUMNS):
        end = min(width, begin + BLOCK_COLUMNS)
        block_uniforms = uniforms[:, begin:end] if uniforms is not None else None
        out[begin:end] = _merge_block(method, taus[:, begin:end], thresholds, block_uniforms)
    return out


def _merge_block(
    method: MergeMethod, taus: torch.Tensor, thresholds: torch.Tensor | None, uniforms: torch.Tensor | None
) -> torch.Tensor:
    if method.name == "task_arithmetic":
        return taus.sum(dim=0)

    if method.name == "consensus":
        total = taus.sum(dim=0)
        keep = consensus_mask(taus, total, method.lams(taus.shape[0]), method.consensus_k)
        return total * keep

    if method.name == "ties":
        assert thresholds is not None
        return disjoint_mean(trim(taus, thresholds))

    assert uniforms is not None
    dropped = dare(taus, uniforms, method.drop_rate)
    if method.name == "dare_linear":
        return dropped.sum(dim=0)
    return disjoint_mean(dropped)


# --------------------------------------------------------------------------- automatic alpha


def auto_alpha(sum_l1: float, merged_l1: float, num_tasks: int) -> float:
    """Return ``||sum_t tau_t||_1 / (T * ||tau_merged||_1)``, the automatic alpha of a LiNeS merge.

    Raises:
        ConfigError: if the merged task vector is zero (alpha is undefined).
    """
    if num_tasks < 1:
        raise ConfigError(f"a merge needs at least one model, got {num_tasks}")
    if not merged_l1 > 0.0:
        raise ConfigError(
            f"the merged task vector has L1 norm {merged_l1}, so the automatic alpha is undefined: "
            "pass alpha explicitly (--alpha) or choose another method or density"
        )
    return float(sum_l1) / (num_tasks * float(merged_l1))


def reference_grid(method: str, values: Sequence[float] | None = None) -> tuple[float, ...]:
    """Return ``values`` as a tuple, or the reference grid of ``method`` when ``values`` is None."""
    if values is not None:
        return tuple(float(v) for v in values)
    if method not in REFERENCE_GRIDS:
        raise ConfigError(f"merge method must be one of {', '.join(METHODS)}, got {method!r}")
    return REFERENCE_GRIDS[method]
