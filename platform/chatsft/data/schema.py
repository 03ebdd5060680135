"""The training row: the one definition of its columns, their Arrow types and the ignore label.

`prepare` writes these rows as Parquet, the trainer and the evaluator read them
back; both sides take the schema from here so a column cannot drift.

Columns (design contract):
- input_ids     list<int32>   tokens the model reads (the encoder's, for seq2seq)
- labels        list<int32>   unshifted (the model or the loss shifts), IGNORE where no loss
- position_ids  list<int32>   packed rows only: restarts at 0 at each packed sequence
- source        list<string>  provenance of every sequence of the row, "path:line[#turn=N]"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

IGNORE = -100  # the label of a token that carries no loss (PyTorch's and Hugging Face's ignore_index)

IDS = pa.list_(pa.int32())
UNPACKED = pa.schema([("input_ids", IDS), ("labels", IDS), ("source", pa.list_(pa.string()))])
PACKED = pa.schema([("input_ids", IDS), ("labels", IDS), ("position_ids", IDS),
                    ("source", pa.list_(pa.string()))])
# What a reader needs to train or evaluate (source is provenance only).
TENSOR_COLUMNS = ("input_ids", "labels", "position_ids")


@dataclass(frozen=True)
class Row:
    """One training row as numpy arrays (int64, ready for torch)."""

    input_ids: np.ndarray
    labels: np.ndarray  # unshifted, IGNORE where no loss
    position_ids: Optional[np.ndarray] = None  # packed rows only

    @property
    def empty(self) -> bool:
        return len(self.input_ids) == 0


# A filler row: pads the last global batch of an epoch so every worker runs as many micro-batches.
EMPTY = Row(np.zeros(0, np.int64), np.zeros(0, np.int64), None)


def iter_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[Row]:
    """Arrow tables or record batches of training rows -> Rows, in order."""
    for batch in batches:
        names = batch.schema.names
        cols = {}
        for name in TENSOR_COLUMNS:
            if name not in names:
                continue
            col = batch.column(name)
            if hasattr(col, "combine_chunks"):  # a Table's ChunkedArray
                col = col.combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
            cols[name] = (offsets, values)
        for i in range(batch.num_rows):
            parts = {name: values[offsets[i]:offsets[i + 1]] for name, (offsets, values) in cols.items()}
            yield Row(parts["input_ids"], parts["labels"], parts.get("position_ids"))
