"""The seeded global shuffle, packing and writing of one split: a range partition on the shuffle key.

Order keys are uniform hashes, so cutting their range [0, 2**63) into P equal
parts gives P partitions of about equal size without sampling, and partition
p holds exactly the samples whose keys fall in its range wherever they were
rendered. Each partition is sorted (or packed window by window) and written as
`part-{p:05d}.parquet`: the files, their boundaries and their rows depend only
on the config and the seed, never on the number of CPUs, actors or blocks.

Packing windows are key ranges too (see keys.window_of), and a partition
holds whole windows, so a window is packed in one place.

The functions here are plain (tables in, tables out); run.py calls them as Ray tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np
import pyarrow as pa

from chatsft.data.keys import window_of
from chatsft.data.stats import pad_summary
from chatsft.pipeline.rows import (PACKED_SORT_KEY, RENDERED, SORT_KEY, pack_window, row_lengths,
                                   select_samples, select_stats, to_packed, to_unpacked, with_window)

# Tokens per output partition: its ids and labels (8 bytes a token) plus a sort's copy fit in
# well under a GiB of one task's memory, and files stay a convenient size.
TOKENS_PER_PART = 32 << 20
# Row groups are what a training worker reads (train/data.py): small enough that the one it shares
# with a neighbouring worker costs little and a worker holds one per lane in memory, large enough
# that footers stay small (a row group of 4 MiB: ~30,000 of them for 120 GB of rows).
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 4 << 20


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group for `table`: at most ROW_GROUP_ROWS rows and about ROW_GROUP_BYTES."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // per_row))


@dataclass(frozen=True)
class SplitPlan:
    """How one split is cut, packed and written."""

    split: int
    parts: int
    packing: bool
    n_windows: int  # packing windows (1 when not packing)
    capacity: int  # data.max_length
    seed: int
    folder: str  # the split's folder (absolute local path or URI)


def plan_split(split: int, samples: int, tokens: int, packing: bool, pack_window_size: int,
               capacity: int, seed: int, folder: str) -> SplitPlan:
    """Partition count from exact totals (so the same data always gives the same files)."""
    parts = max(1, math.ceil(tokens / TOKENS_PER_PART))
    n_windows = 1
    if packing:
        n_windows = max(1, math.ceil(samples / pack_window_size))
        parts = min(parts, n_windows)  # a partition holds whole windows
    return SplitPlan(split, parts, packing, n_windows, capacity, seed, folder)


def _schema(table: pa.Table) -> pa.Table:
    # Ray Data may hand over a block of no rows without columns (an empty input file)
    return table if table.num_rows else RENDERED.empty_table()


# Rendered bytes a task after rendering takes at most (a run of consecutive blocks): large enough
# that a task's start costs little next to its work, small enough for one task's memory.
GROUP_BYTES = 128 << 20


def group_blocks(sizes: list[int], cpus: int, most: int = GROUP_BYTES) -> list[list[int]]:
    """Runs of consecutive block indices, one a task: at least 2 per CPU when there are blocks
    enough (so CPUs stay busy to the end), each of at most `most` bytes (or one block)."""
    if not sizes:
        return []
    sizes = [max(1, s) for s in sizes]  # a size Ray did not know counts as small, not as nothing
    target = min(most, max(1, sum(sizes) // max(1, 2 * cpus)))
    groups: list[list[int]] = [[]]
    acc = 0
    for i, size in enumerate(sizes):
        if groups[-1] and acc + size > target:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += size
    return groups


def block_stats(*tables: pa.Table) -> list[str]:
    """The statistics rows (JSON) of rendered blocks."""
    return [s for t in tables for s in select_stats(_schema(t))["stats"].to_pylist()]


def first_samples(table: pa.Table, split: int, n: int) -> list[dict]:
    """Up to n sample rows of one split from a rendered block, in block order (for the preview)."""
    return select_samples(_schema(table), split).slice(0, n).to_pylist()


def _part_of(table: pa.Table, plan: SplitPlan) -> np.ndarray:
    keys = table["order_key"].to_numpy()
    if plan.packing:
        return window_of(keys, plan.n_windows) * plan.parts // plan.n_windows
    return window_of(keys, plan.parts)


def partition(table: pa.Table, plans: list[SplitPlan]) -> list[pa.Table]:
    """One rendered block -> its samples cut into each plan's parts (plans in order, parts in order)."""
    out = []
    table = _schema(table)
    for plan in plans:
        samples = select_samples(table, plan.split)
        part = _part_of(samples, plan)
        for p in range(plan.parts):
            out.append(samples.filter(pa.array(part == p)))
    return out


def partition_task(plans: list[SplitPlan], *tables: pa.Table):
    """`partition` of a run of blocks, shaped for a Ray task with num_returns = number of parts
    (one part: the table itself)."""
    parts = partition(pa.concat_tables([_schema(t) for t in tables]), plans)
    return parts[0] if len(parts) == 1 else tuple(parts)


def reduce_part(pieces: list[pa.Table], plan: SplitPlan) -> "pa.Table | None":
    """All samples of one partition -> its training rows in stored order."""
    table = pa.concat_tables(pieces) if pieces else None
    if table is None or table.num_rows == 0:
        return None
    if not plan.packing:
        return to_unpacked(table.sort_by([(k, "ascending") for k in SORT_KEY]))
    table = with_window(table, plan.n_windows)
    packed = []
    windows = table["window"].to_numpy()
    for w in np.unique(windows):
        packed.append(pack_window(table.filter(pa.array(windows == w)), plan.capacity, plan.seed))
    rows = pa.concat_tables(packed).sort_by([(k, "ascending") for k in PACKED_SORT_KEY])
    return to_packed(rows)


def write_part(plan: SplitPlan, p: int, micro_batch: int, *pieces: pa.Table) -> tuple[dict, dict]:
    """Reduce partition p and write it as part-{p:05d}.parquet; return the pad summaries of its
    row lengths (inputs, labels) for micro-batches of `micro_batch` rows: O(micro_batch) numbers
    a part, so the driver never holds a number per row.

    The pieces are positional so that Ray resolves them (one per group of rendered blocks).
    """
    from chatsft import storage

    rows = reduce_part(list(pieces), plan)
    if rows is None:
        empty = pad_summary(np.zeros(0, np.int64), micro_batch)
        return empty, empty
    storage.write_parquet(storage.join(plan.folder, f"part-{p:05d}.parquet"), rows, row_group_rows(rows))
    return (pad_summary(row_lengths(rows, "input_ids"), micro_batch),
            pad_summary(row_lengths(rows, "labels"), micro_batch))

