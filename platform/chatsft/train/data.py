"""Where a worker's rows come from: the prepared Parquet files, read chunk by chunk.

The driver reads the files' footers once (`RowIndex`: files, their row groups
and sizes) and hands the index to every worker. A worker then reads, through
chatsft.storage (local paths and URIs alike), only the row groups that hold its
rows (chatsft.data.order says which), the tensor columns only, with a bounded
read-ahead on a thread: memory is that read-ahead plus one row group per lane
of the worker (two where lanes share one), whatever the size of the split. Bytes read are counted (the
compressed column chunks fetched) so a benchmark can hold each worker to its share.

Ray Data's `streaming_split(equal=True)` was the other way: it hands out blocks
as workers ask for them, so which rows a worker gets (hence the gradient of a
step, and where a resumed run stands) depends on timing; exactness needs the
rows of step k to be a function of k alone.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from chatsft import storage
from chatsft.data.order import EpochOrder, lane_bounds, row_permutation, shard_range, worker_lanes
from chatsft.data.schema import EMPTY, TENSOR_COLUMNS, Row, iter_rows

PREFETCH_STEPS = 4  # steps of rows read ahead of the one training
OPEN_FILES = 8  # Parquet files a reader keeps open


def parquet_files(folder: str) -> list[str]:
    """The Parquet files of a prepared split, in stored order (sorted names; URIs stay URIs)."""
    return [f.path for f in storage.list_files(folder, suffix=".parquet", recursive=True)]


def count_rows(folder: str) -> int:
    return sum(storage.parquet_file(f).metadata.num_rows for f in parquet_files(folder))


def file_batches(folder: str) -> Callable[[], Iterator[Any]]:
    """A re-startable source of Arrow record batches of a whole split, in stored order
    (`chatsft eval`, benchmarks: one process reading everything)."""
    files = parquet_files(folder)

    def batches() -> Iterator[Any]:
        for f in files:
            pf = storage.parquet_file(f)
            cols = [c for c in TENSOR_COLUMNS if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=1024, columns=cols)

    return batches


# ------------------------------------------------------------------------ index


@dataclass(frozen=True)
class RowIndex:
    """The row groups of a split in stored order: what a worker needs to find its rows."""

    files: tuple[str, ...]
    columns: tuple[str, ...]  # the tensor columns the files have
    chunk_file: tuple[int, ...]  # per row group: its file
    chunk_group: tuple[int, ...]  # per row group: its number inside the file
    sizes: tuple[int, ...]  # per row group: rows
    nbytes: tuple[int, ...]  # per row group: compressed bytes of `columns`

    @property
    def rows(self) -> int:
        return int(sum(self.sizes))

    @property
    def total_bytes(self) -> int:
        return int(sum(self.nbytes))

    @property
    def chunk_starts(self) -> np.ndarray:
        out = np.zeros(len(self.sizes) + 1, np.int64)
        np.cumsum(np.asarray(self.sizes, np.int64), out=out[1:])
        return out

    @classmethod
    def build(cls, folder: str) -> "RowIndex":
        files = parquet_files(folder)
        columns: Optional[tuple[str, ...]] = None
        cf, cg, sizes, nbytes = [], [], [], []
        for i, f in enumerate(files):
            meta = storage.parquet_file(f).metadata
            names = [meta.schema.column(j).path.split(".")[0] for j in range(meta.num_columns)]
            if columns is None:
                columns = tuple(c for c in TENSOR_COLUMNS if c in names)
            wanted = [j for j, n in enumerate(names) if n in columns]
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                if rg.num_rows == 0:
                    continue
                cf.append(i)
                cg.append(g)
                sizes.append(rg.num_rows)
                nbytes.append(sum(rg.column(j).total_compressed_size for j in wanted))
        return cls(tuple(files), columns or (), tuple(cf), tuple(cg), tuple(sizes), tuple(nbytes))


class ChunkReader:
    """Reads row groups as Rows (tensor columns only), counting the bytes it fetches. A row
    group that several lanes of this worker will need (where one lane ends and the next
    begins) is kept from its first read until the last of them is done with it (`need`,
    `done`), so each row group is fetched once an epoch."""

    def __init__(self, index: RowIndex) -> None:
        self.index = index
        self.bytes_read = 0
        self.read_chunks: set[int] = set()  # the row groups read (bytes_read counts re-reads too)
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._held: dict[int, list[Row]] = {}
        self._users: Counter = Counter()

    def need(self, users: Counter) -> None:
        """How many lanes will read each row group (replaces what an earlier epoch said)."""
        self._users = Counter(users)
        self._held.clear()

    def done(self, chunk: int) -> None:
        """A lane is done with `chunk`: dropped once no lane needs it any more."""
        self._users[chunk] -= 1
        if self._users[chunk] <= 0:
            self._held.pop(chunk, None)

    def rows(self, chunk: int) -> list[Row]:
        if chunk in self._held:
            return self._held[chunk]
        ix = self.index
        f = ix.chunk_file[chunk]
        if f in self._files:
            self._files.move_to_end(f)
        else:  # a few open files: a worker's lanes may be in different files at once
            self._files[f] = storage.parquet_file(ix.files[f])
            while len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)
        table = self._files[f].read_row_group(ix.chunk_group[chunk], columns=list(ix.columns))
        self.bytes_read += ix.nbytes[chunk]
        self.read_chunks.add(chunk)
        got = list(iter_rows([table]))
        if self._users[chunk] > 1:
            self._held[chunk] = got
        return got


# --------------------------------------------------------------------- training


class _Lane:
    """One lane's rows in epoch order, from a given position on, a chunk at a time."""

    def __init__(self, order: EpochOrder, reader: ChunkReader, start: int, end: int) -> None:
        self.order, self.reader, self.pos, self.end = order, reader, start, end
        self._rows: list[Row] = []
        self._chunk_end = start  # epoch position where the loaded chunk ends
        self._chunk_start = start
        self._perm: Optional[np.ndarray] = None
        self._chunk = -1

    def next(self) -> Row:
        if self.pos >= self.end:
            return EMPTY
        if self.pos >= self._chunk_end:
            k, start = self.order.chunk_at(self.pos)
            c = self._chunk = self.order.stored_chunk(k)
            self._rows = self.reader.rows(c)
            self._perm = row_permutation(self.order.seed, self.order.epoch, c, len(self._rows))
            self._chunk_start, self._chunk_end = start, start + len(self._rows)
        row = self._rows[self._perm[self.pos - self._chunk_start]]
        self.pos += 1
        if self.pos >= self._chunk_end or self.pos >= self.end:
            self._rows = []  # done with it: memory holds one chunk per live lane (and the shared ones)
            self.reader.done(self._chunk)
        return row


def worker_steps(index: RowIndex, reader: ChunkReader, *, seed: int, epoch: int, global_batch: int,
                 rank: int, world: int, start_step: int = 0) -> Iterator[list[Row]]:
    """This worker's rows of each step of `epoch` from `start_step` on (G / world rows, in lane order)."""
    order = EpochOrder(index.sizes, seed, epoch)
    b = lane_bounds(order.rows, global_batch)
    lanes = [_Lane(order, reader, int(min(b[lane] + start_step, b[lane + 1])), int(b[lane + 1]))
             for lane in worker_lanes(global_batch, rank, world)]
    reader.need(Counter(c for lane in lanes for c in order.chunks_between(lane.pos, lane.end)))
    steps = int(b[1] - b[0])  # lane 0 is the longest
    for _ in range(start_step, steps):
        yield [lane.next() for lane in lanes]


def prefetched(items: Iterator[Any], depth: int = PREFETCH_STEPS) -> Iterator[Any]:
    """`items` produced on a thread, at most `depth` ahead of the consumer (I/O overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as e:  # handed to the consumer, raised there
            q.put(("error", e))

    thread = threading.Thread(target=produce, name="chatsft-rows", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()


# ------------------------------------------------------------------- evaluation


def shard_rows(index: RowIndex, reader: ChunkReader, rank: int, world: int) -> Iterator[Row]:
    """Worker `rank`'s contiguous share of the stored rows (evaluation reads a split once)."""
    start, end = shard_range(index.rows, rank, world)
    starts = index.chunk_starts
    for c in range(len(index.sizes)):
        lo, hi = max(start, int(starts[c])), min(end, int(starts[c + 1]))
        if lo >= hi:
            continue
        rows = reader.rows(c)
        yield from rows[lo - int(starts[c]):hi - int(starts[c])]
