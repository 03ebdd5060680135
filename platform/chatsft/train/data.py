"""Where a worker's training rows come from: the prepared Parquet files, or a Ray Data iterator.

Both sources yield Arrow batches in the stored order; `chatsft.data.order` then
fixes the global order and each worker's share, so --local and Ray Train
train on exactly the same batches.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from chatsft import storage
from chatsft.data.schema import TENSOR_COLUMNS


def parquet_files(folder: str) -> list[str]:
    """The Parquet files of a prepared split, in stored order (sorted names; URIs stay URIs)."""
    return [f.path for f in storage.list_files(folder, suffix=".parquet", recursive=True)]


def count_rows(folder: str) -> int:
    return sum(storage.parquet_file(f).metadata.num_rows for f in parquet_files(folder))


def file_batches(folder: str) -> Callable[[], Iterator[Any]]:
    """A re-startable source of Arrow record batches read straight from the files."""
    files = parquet_files(folder)

    def batches() -> Iterator[Any]:
        for f in files:
            pf = storage.parquet_file(f)
            cols = [c for c in TENSOR_COLUMNS if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=1024, columns=cols)

    return batches


def ray_batches(iterator: Any) -> Callable[[], Iterator[Any]]:
    """A re-startable source of Arrow tables from a Ray DataIterator (unsplit, order preserved)."""

    def batches() -> Iterator[Any]:
        yield from iterator.iter_batches(batch_size=1024, batch_format="pyarrow", prefetch_batches=2)

    return batches
