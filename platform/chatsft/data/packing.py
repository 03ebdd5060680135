"""Best-fit-decreasing packing of samples into rows of at most `capacity` tokens (pure, no Ray).

Packing puts several short samples into one row so a batch is mostly real
tokens instead of padding. The pipeline packs the shuffled sample stream in
windows of `data.pack_window` samples: a larger window gives the algorithm more
short samples to fill the gaps left by long ones (tighter rows), at the cost of
holding the whole window in one task's memory; the gain flattens out after a
few thousand samples (see benchmarks/prepare.py).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Sequence

import numpy as np


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`.

    Items are placed longest first; each goes into the open bin whose free space
    is the smallest that still fits it (best fit), or opens a new bin. Free space
    is kept in a sorted list searched with bisect, so placing n items costs
    O(n log n) comparisons (full bins leave the list, which keeps it short).
    Ties are broken by index, so the result depends only on the lengths.
    Indices inside a bin are returned in ascending order (the stream order).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if n < 1 or n > capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted; full bins are dropped
    for i in order:
        n = lengths[i]
        at = bisect_left(free, (n, -1))  # the least free space >= n, lowest bin id among equals
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            insort(free, (space - n, b))
    return [sorted(b) for b in bins]


def pack_in_windows(lengths: Sequence[int], capacity: int, window: int) -> list[list[int]]:
    """Best-fit-decreasing over consecutive windows of `window` items; bins hold global indices."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out: list[list[int]] = []
    for start in range(0, len(lengths), window):
        for b in best_fit_decreasing(lengths[start:start + window], capacity):
            out.append([start + i for i in b])
    return out


def fill_pad_fraction(bin_sizes: Sequence[int], capacity: int) -> float:
    """Padding if every row is padded to `capacity`: 1 - tokens / (rows * capacity)."""
    sizes = np.asarray(bin_sizes, dtype=np.int64)
    if sizes.size == 0:
        return 0.0
    return float(1.0 - sizes.sum() / (sizes.size * capacity))
