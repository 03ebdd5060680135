"""Arrow tables of the pipeline: rendered samples in, training rows out (pure: pyarrow and numpy only).

The render stage emits one table schema, RENDERED, for two kinds of rows:
samples (row_type 0), and one statistics row per rendered batch (row_type 1) whose
`stats` column holds that batch's counts and first bad records as JSON. Keeping
the counts inside the data stream means the driver learns them without a
second pass and without caring which worker rendered what.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from chatsft.data.packing import best_fit_decreasing
from chatsft.data.keys import row_key, window_of
from chatsft.data.schema import IDS, PACKED, UNPACKED

SAMPLE, STATS = 0, 1
TRAIN, EVAL = 0, 1
SPLITS = {TRAIN: "train", EVAL: "eval"}

RENDERED = pa.schema([
    ("row_type", pa.int8()),
    ("split", pa.int8()),
    ("file_idx", pa.int32()),
    ("line", pa.int64()),
    ("sub", pa.int32()),  # sample index within its record (split-turn samples)
    ("copy", pa.int32()),  # mixture copy (weight > 1)
    ("order_key", pa.int64()),  # seeded shuffle key, see keys.order_key
    ("input_ids", IDS),
    ("labels", IDS),
    ("source", pa.string()),
    ("truncated", pa.bool_()),
    ("stats", pa.string()),
])
# The total order of samples: the shuffle key, then provenance to break (astronomically rare) ties.
SORT_KEY = ["order_key", "file_idx", "line", "sub", "copy"]

# Packed rows before they are ordered: their shuffle key, window and bin (see pack_window).
_PACKED_KEYED = pa.schema([("row_key", pa.int64()), ("window", pa.int64()), ("bin", pa.int32()),
                           *[(f.name, f.type) for f in PACKED]])
PACKED_SORT_KEY = ["row_key", "window", "bin"]


def list_array(arrays: Sequence[np.ndarray]) -> pa.Array:
    """list<int32> from numpy arrays, built from one concatenated buffer and offsets."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32, copy=False) if len(arrays) else np.empty(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


def stats_row(split_stats_json: str) -> pa.Table:
    """The one statistics row of a rendered batch."""
    cols = {name: [None] for name in RENDERED.names}
    cols["row_type"] = [STATS]
    cols["stats"] = [split_stats_json]
    return pa.Table.from_pydict(cols, schema=RENDERED)


def select_samples(table: pa.Table, split: int) -> pa.Table:
    """The sample rows of one split, without the statistics column."""
    mask = pc.and_(pc.equal(table["row_type"], SAMPLE), pc.equal(table["split"], split))
    return table.filter(mask).drop_columns(["stats"])


def select_stats(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["row_type"], STATS)).select(["stats"])


def to_unpacked(table: pa.Table) -> pa.Table:
    """Sorted samples -> training rows of one sample each (chatsft.data.schema)."""
    sources = table["source"].combine_chunks()
    offsets = pa.array(np.arange(len(sources) + 1, dtype=np.int32))
    return pa.Table.from_arrays(
        [table["input_ids"].combine_chunks().cast(IDS), table["labels"].combine_chunks().cast(IDS),
         pa.ListArray.from_arrays(offsets, sources)],
        schema=UNPACKED)


def with_window(table: pa.Table, n_windows: int) -> pa.Table:
    keys = table["order_key"].to_numpy()
    return table.append_column("window", pa.array(window_of(keys, n_windows), pa.int64()))


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:], offsets - offsets[0]


def pack_window(table: pa.Table, capacity: int, seed: int) -> pa.Table:
    """All samples of one packing window -> packed rows (best-fit decreasing), with their shuffle keys.

    position_ids restart at 0 at each sequence; labels are the sequences' own
    labels, untouched at the borders (the loss drops the first token of every
    sequence by looking at position_ids).
    """
    if table.num_rows == 0:
        return _PACKED_KEYED.empty_table()
    windows = pc.unique(table["window"]).to_pylist()
    if len(windows) != 1:
        raise ValueError(f"pack_window got rows of windows {windows[:5]}")
    window = int(windows[0])
    # The window's samples in stream order, so bins (and their contents) never depend on block layout.
    table = table.sort_by([(k, "ascending") for k in SORT_KEY])
    ids, offs = _flat(table["input_ids"])
    labels, loffs = _flat(table["labels"])
    if not np.array_equal(offs, loffs):
        raise ValueError("input_ids and labels differ in length")
    lengths = np.diff(offs)
    if lengths.size and int(lengths.max()) > capacity:
        raise AssertionError(f"a sample of {int(lengths.max())} tokens exceeds max_length {capacity}: "
                             "render must have truncated it")
    sources = table["source"].to_pylist()
    bins = best_fit_decreasing(lengths.tolist(), capacity)
    row_ids, row_labels, row_pos, row_src = [], [], [], []
    for b in bins:
        row_ids.append(np.concatenate([ids[offs[i]:offs[i + 1]] for i in b]))
        row_labels.append(np.concatenate([labels[offs[i]:offs[i + 1]] for i in b]))
        row_pos.append(np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in b]))
        row_src.append([sources[i] for i in b])
    n = len(bins)
    return pa.Table.from_arrays(
        [pa.array([row_key(seed, window, k) for k in range(n)], pa.int64()),
         pa.array([window] * n, pa.int64()), pa.array(range(n), pa.int32()),
         list_array(row_ids), list_array(row_labels), list_array(row_pos),
         pa.array(row_src, pa.list_(pa.string()))],
        schema=_PACKED_KEYED)



def to_packed(table: pa.Table) -> pa.Table:
    return table.select(PACKED.names).cast(PACKED)


def row_lengths(table: pa.Table, column: str = "input_ids") -> np.ndarray:
    return pc.list_value_length(table[column]).to_numpy(zero_copy_only=False).astype(np.int64)
