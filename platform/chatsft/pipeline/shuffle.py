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


# Rows of a row group in a spilled run: the write phase reads the row groups whose key range
# meets its part's, so smaller groups read less past a part's borders, larger ones fewer footers.
SPILL_GROUP_ROWS = 4096


def spill_group(folder: str, g: int, splits: list[int], preview: int, *tables: pa.Table) -> dict:
    """A run of consecutive rendered blocks -> its statistics rows, the first `preview` samples of
    each split (in stream order, for the mask preview), and its samples of each split sorted by
    the shuffle key and written as `folder/<split>/run-<g>.parquet` (None: no samples there).
    The blocks are positional so that Ray resolves them."""
    from chatsft import storage

    table = pa.concat_tables([_schema(t) for t in tables])
    stats = select_stats(table)["stats"].to_pylist()
    out = {"stats": stats, "preview": {}, "runs": {}}
    for split in splits:
        samples = select_samples(table, split)
        out["preview"][split] = samples.slice(0, preview).to_pylist()
        if samples.num_rows == 0:
            out["runs"][split] = None
            continue
        path = storage.join(folder, str(split), f"run-{g:06d}.parquet")
        storage.write_parquet(path, samples.sort_by([(k, "ascending") for k in SORT_KEY]), SPILL_GROUP_ROWS)
        out["runs"][split] = path
    return out


def read_part(runs: list[str], plan: SplitPlan, p: int) -> list[pa.Table]:
    """The samples of part p from each sorted run: only the row groups whose order_key range can
    map to p are read (a part is a key range, and runs are sorted by key)."""
    from chatsft import storage

    pieces = []
    for path in runs:
        with storage.parquet_file(path) as pf:
            col = pf.schema_arrow.get_field_index("order_key")
            wanted = []
            for rg in range(pf.metadata.num_row_groups):
                st = pf.metadata.row_group(rg).column(col).statistics
                if st is None or not st.has_min_max:
                    wanted.append(rg)
                    continue
                lo, hi = _part_of_keys(np.array([st.min, st.max], np.int64), plan)
                if lo <= p <= hi:
                    wanted.append(rg)
            if not wanted:
                continue
            table = pf.read_row_groups(wanted)
        pieces.append(table.filter(pa.array(_part_of(table, plan) == p)))
    return pieces


def _part_of(table: pa.Table, plan: SplitPlan) -> np.ndarray:
    return _part_of_keys(table["order_key"].to_numpy(), plan)


def _part_of_keys(keys: np.ndarray, plan: SplitPlan) -> np.ndarray:
    """The part of each shuffle key: monotonic in the key, so a key range maps to a part range."""
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


def write_part(plan: SplitPlan, p: int, micro_batch: int, runs: list[str]) -> tuple[dict, dict]:
    """Reduce partition p (its key range of every spilled run) and write it as part-{p:05d}.parquet;
    return the pad summaries of its row lengths (inputs, labels) for micro-batches of `micro_batch`
    rows: O(micro_batch) numbers a part, so the driver never holds a number per row."""
    from chatsft import storage

    rows = reduce_part(read_part(runs, plan, p), plan)
    if rows is None:
        empty = pad_summary(np.zeros(0, np.int64), micro_batch)
        return empty, empty
    storage.write_parquet(storage.join(plan.folder, f"part-{p:05d}.parquet"), rows, row_group_rows(rows))
    return (pad_summary(row_lengths(rows, "input_ids"), micro_batch),
            pad_summary(row_lengths(rows, "labels"), micro_batch))
