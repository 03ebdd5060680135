"""Seeded decisions made per record: eval carve-out, mixture copies, shuffle order, packing window.

Every decision is a hash of (run.seed, a tag, the record's `path:line`), never a
draw from a random generator shared by a worker, so it comes out the same
whichever worker sees the record and however many workers there are.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_TWO_53 = float(1 << 53)


def stable_hash(seed: int, tag: str, key: str) -> int:
    """A 64-bit hash of (seed, tag, key), the same on every machine and Python version."""
    h = hashlib.blake2b(f"{seed}\x1f{tag}\x1f{key}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def unit(seed: int, tag: str, key: str) -> float:
    """A uniform number in [0, 1) from (seed, tag, key)."""
    return (stable_hash(seed, tag, key) >> 11) / _TWO_53


def in_eval(seed: int, source: str, eval_fraction: float) -> bool:
    """Carve-out: the record at `source` ("path:line") is held out for eval."""
    return eval_fraction > 0 and unit(seed, "eval", source) < eval_fraction


def copies(seed: int, source: str, weight: float) -> int:
    """How many times a record enters the mixture: floor(weight), plus one with the fractional part's probability."""
    whole = math.floor(weight)
    frac = weight - whole
    return whole + (1 if frac > 0 and unit(seed, "weight", source) < frac else 0)


def order_key(seed: int, source: str, copy: int) -> int:
    """The shuffle key of one sample copy: a non-negative int64; rows are written sorted by it."""
    return stable_hash(seed, "order", f"{source}\x1f{copy}") >> 1


def row_key(seed: int, window: int, index: int) -> int:
    """The shuffle key of a packed row (index: its bin in the window)."""
    return stable_hash(seed, "row", f"{window}\x1f{index}") >> 1


def window_of(keys: np.ndarray, n_windows: int) -> np.ndarray:
    """Packing window of each order key: the key range [0, 2**63) cut into n_windows equal parts.

    Order keys are uniform, so each window holds about (samples / n_windows)
    samples of the shuffled stream; membership depends on the key alone, not on
    how the stream is split into blocks.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if n_windows < 1 or n_windows >= 1 << 31:
        raise ValueError(f"n_windows must be in [1, 2**31), got {n_windows}")
    return ((keys >> 31) * n_windows) >> 32
