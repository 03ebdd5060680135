"""The order of training rows: a pure function of the stored rows, the seed and the epoch, laid
out so that each worker reads only its own share of the stored rows.

Stored rows come in chunks (the Parquet row groups of the prepared files, whose
sizes prepare bounds). The order of an epoch: the chunks in a seeded
permutation, the rows inside each chunk in a seeded permutation. Prepare has
already shuffled the stored order globally, so this only has to make epochs
differ, and it keeps each chunk's rows together.

Optimizer steps read that order in G = micro x accum x workers *lanes*: the
epoch's N rows cut into G contiguous runs (lane l holds positions
[l*N/G, (l+1)*N/G), the first N % G lanes one row longer), and step k takes
row k of every lane (an empty row, no supervised token, where a lane has run
out: the last step of an epoch). So:

- the global batch of step k is the same set of rows whatever the number of
  workers and the micro x accumulation split (G is fixed for a run and kept
  across a change of worker count: train/resume.py);
- worker r of W takes lanes [r*G/W, (r+1)*G/W): a contiguous run of about N/W
  positions of the epoch order, hence whole chunks but for the two at its ends:
  it reads about N/W rows plus one chunk, never the others' rows;
- step k starts at row k of every lane: a resumed run, on any number of
  workers, seeks to its chunks and reads nothing before them.

Pure: sizes in, positions out. Reading the chunks is train/data.py's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from chatsft.data.schema import EMPTY, Row


def chunk_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def row_permutation(seed: int, epoch: int, chunk: int, n: int) -> np.ndarray:
    """The order of the rows of stored chunk `chunk` in this epoch."""
    return np.random.default_rng([seed, epoch, 1, chunk]).permutation(n)


def steps_per_epoch(rows: int, global_batch: int) -> int:
    return max(1, math.ceil(rows / global_batch))


def lane_bounds(rows: int, global_batch: int) -> np.ndarray:
    """Start positions of the G lanes and the end: lane l is [b[l], b[l+1])."""
    base, extra = divmod(rows, global_batch)
    lengths = np.full(global_batch, base, np.int64)
    lengths[:extra] += 1
    out = np.zeros(global_batch + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def worker_lanes(global_batch: int, rank: int, world: int) -> range:
    """The lanes of worker `rank`: consecutive, so its positions are one contiguous run."""
    if global_batch % world:
        raise ValueError(f"{world} workers cannot share {global_batch} rows per step evenly")
    per = global_batch // world
    return range(rank * per, (rank + 1) * per)


@dataclass(frozen=True)
class EpochOrder:
    """The rows of one epoch: position -> (stored chunk, row inside the chunk)."""

    sizes: tuple[int, ...]  # rows of each stored chunk, in stored order
    seed: int
    epoch: int

    @property
    def rows(self) -> int:
        return int(sum(self.sizes))

    def __post_init__(self) -> None:
        perm = chunk_permutation(self.seed, self.epoch, len(self.sizes))
        starts = np.zeros(len(perm) + 1, np.int64)
        np.cumsum(np.asarray(self.sizes, np.int64)[perm], out=starts[1:])
        object.__setattr__(self, "_perm", perm)
        object.__setattr__(self, "_starts", starts)

    def chunk_at(self, position: int) -> tuple[int, int]:
        """(the k-th chunk of this epoch's chunk order, the epoch position where it starts)."""
        k = int(np.searchsorted(self._starts, position, side="right")) - 1
        return k, int(self._starts[k])

    def stored_chunk(self, k: int) -> int:
        return int(self._perm[k])

    def chunks_between(self, start: int, end: int) -> list[int]:
        """Stored chunks holding positions [start, end), in epoch order."""
        if end <= start:
            return []
        first, _ = self.chunk_at(start)
        last, _ = self.chunk_at(end - 1)
        return [self.stored_chunk(k) for k in range(first, last + 1)]

    def stored_rows(self, chunk_starts: Sequence[int]) -> np.ndarray:
        """The stored row index at every position (O(rows): tests and small splits only)."""
        out = []
        for k, c in enumerate(self._perm):
            n = self.sizes[c]
            out.append(chunk_starts[c] + row_permutation(self.seed, self.epoch, int(c), n))
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def step_positions(order_rows: int, global_batch: int, rank: int, world: int, step: int) -> list[int]:
    """Epoch positions of worker `rank`'s rows of step `step` (-1: an empty filler row)."""
    b = lane_bounds(order_rows, global_batch)
    return [int(b[lane] + step) if b[lane] + step < b[lane + 1] else -1
            for lane in worker_lanes(global_batch, rank, world)]


def worker_span(rows: int, global_batch: int, rank: int, world: int, start_step: int = 0) -> list[tuple[int, int]]:
    """The epoch positions worker `rank` reads from step `start_step` on, as [start, end) runs (one per lane)."""
    b = lane_bounds(rows, global_batch)
    return [(int(min(b[lane] + start_step, b[lane + 1])), int(b[lane + 1]))
            for lane in worker_lanes(global_batch, rank, world)]


def micro_batches(rows: Sequence[Row], micro: int) -> list[list[Row]]:
    """A worker's rows of one step cut into micro-batches, in order."""
    return [list(rows[i:i + micro]) for i in range(0, len(rows), micro)]


def filled(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    """Consecutive groups of `size` rows; the last one filled up with empty rows."""
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch + [EMPTY] * (size - len(batch))


def shard_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Stored rows [start, end) of worker `rank` when a split is only read once (evaluation)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
