"""Rows -> the micro-batches of one worker, in an order fixed by the stored rows and the seed.

The global batch of optimizer step s does not depend on the number of workers
or on the micro-batch x accumulation split: every worker reads all rows in the
same global order (the stored order, permuted per epoch by a seeded windowed
shuffle), step s takes the next G = micro * accum * workers rows, row j of the
step goes to worker j % W, and each worker cuts its rows into `accum`
micro-batches. This is what makes micro 4 x accum 1 == micro 1 x accum 4, 1 vs 2
workers, and resume from a checkpoint exact. The cost: each worker reads (and
drops) the rows of the others, which for SFT data sizes is negligible beside
the forward pass. The last partial global batch of an epoch is filled with
empty rows (no supervised token) so every worker runs the same number of
micro-batches, which DeepSpeed's collectives require.

Pure: rows in, rows out. Where the rows are read from is train/data.py's
business; evaluation shards its rows the same way.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from chatsft.data.schema import EMPTY, Row

SHUFFLE_WINDOW = 4096  # rows permuted together: streams, and mixes well over already-shuffled rows


# --------------------------------------------------------------------- ordering


def window_permutation(seed: int, epoch: int, window: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, window]).permutation(n)


def epoch_rows(rows: Iterable[Row], *, seed: int, epoch: int, start: int = 0,
               window: int = SHUFFLE_WINDOW) -> Iterator[Row]:
    """The rows of one epoch in their seeded order, from position `start` on.

    A windowed shuffle: rows are permuted inside consecutive windows of `window`
    rows (the stored order is already globally shuffled by prepare), so it
    streams with bounded memory. Skipping to `start` reads and drops rows.
    """
    buf: list[Row] = []
    index = 0  # window number
    first = start // window
    offset = start % window
    for row in rows:
        if index < first:  # a window before the resume point: count it off without keeping it
            buf.append(EMPTY)
        else:
            buf.append(row)
        if len(buf) == window:
            if index >= first:
                yield from _permuted(buf, seed, epoch, index, offset if index == first else 0)
            buf = []
            index += 1
    if buf and index >= first:
        yield from _permuted(buf, seed, epoch, index, offset if index == first else 0)


def _permuted(buf: list[Row], seed: int, epoch: int, index: int, skip: int) -> Iterator[Row]:
    perm = window_permutation(seed, epoch, index, len(buf))
    for k in perm[skip:]:
        yield buf[k]


def global_batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """Consecutive groups of `size` rows; the last one is filled up with empty rows."""
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch + [EMPTY] * (size - len(batch))


def worker_micro_batches(batch: Sequence[Row], *, rank: int, world: int, micro: int) -> list[list[Row]]:
    """This worker's rows of a global batch (row j -> worker j % world), cut into micro-batches."""
    mine = list(batch[rank::world])
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]
