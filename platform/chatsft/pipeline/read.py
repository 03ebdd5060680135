"""Reading JSONL sources as raw lines with their numbers: a Ray Data datasource.

Ray Data's JSON reader parses for us, which loses line numbers and stops a
whole file at its first bad line; `read_text` decodes, so invalid UTF-8 could
not be reported as a bad record. This datasource yields (file index, 1-based
line, raw bytes) and leaves parsing to the render stage, per record.

Where the reads run: remote URIs (s3://, gs://, ...), and local paths when
`run.shared_storage` says every node sees them, are read wherever Ray Data
places the tasks; otherwise files on this machine's disk (local paths,
`chatsft://`, `file://`) are read by tasks pinned to the driver's node (the
`supports_distributed_reads = False` contract, what Ray Data's own `local://`
scheme does), because another node has no such file. Reading is cheap next to
tokenizing, and the lines then travel to render actors on every node through
the object store.

A file larger than SPLIT_BYTES is read by many tasks, each a byte range: a
range reads the lines that start inside it (the first one after the range's
start, the last one past its end if it runs over). `path:line` must stay the
line of the whole file, so a first pass of small tasks counts the newlines of
every range (at memory speed, read where the file is) and each range starts
from the sum of those before it: the driver holds those counts only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import pyarrow as pa

from chatsft import storage
from chatsft.errors import UserError
from chatsft.sources import SourceFile, parquet_record_batches

LINES_PER_BLOCK = 4096
BYTES_PER_BLOCK = 16 << 20
SPLIT_BYTES = 64 << 20  # a file over this is read by several tasks, in ranges of about this size
READ_BYTES = 1 << 22  # what a range reader asks its stream for at a time

LINES = pa.schema([("file_idx", pa.int32()), ("line", pa.int64()), ("raw", pa.binary())])


@dataclass(frozen=True)
class Unit:
    """What one read takes: the lines of JSONL file `fi` that start in bytes [start, end), or the
    row groups [start, end) of Parquet file `fi`; `newlines` is the count of newlines (rows) before
    `start` (so its first line or row is numbered right); `nbytes` its bytes when not end - start."""

    fi: int
    start: int
    end: int
    newlines: int = 0
    nbytes: int = -1

    @property
    def size(self) -> int:
        return self.nbytes if self.nbytes >= 0 else self.end - self.start


def ranges(size: int, split: int = 0) -> list[tuple[int, int]]:
    """[start, end) byte ranges of a file of `size` bytes, each about `split` bytes (one when small)."""
    split = split or SPLIT_BYTES
    n = max(1, -(-size // split))
    cuts = [size * k // n for k in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def count_newlines(location: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of a file."""
    n = 0
    with storage.open_input(location) as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            chunk = fh.read(min(READ_BYTES, left))
            if not chunk:
                break
            n += bytes(chunk).count(b"\n")
            left -= len(chunk)
    return n


def iter_range_lines(fh, start: int, end: int, newlines: int) -> Iterator[tuple[int, bytes]]:
    """(1-based line, raw line) of each non-blank line starting in bytes [start, end) of a seekable
    stream, `newlines` being the newlines before `start`: over consecutive ranges, the same lines
    as `iter_stream_lines` on the whole file (BOM at the file's start and CRLF tolerated)."""
    n = newlines  # newlines before `pos`, the start of the line at hand: it is line n + 1
    fh.seek(max(0, start - 1))
    buf = bytes(fh.read(READ_BYTES))
    off = 0
    if start == 0:
        if buf.startswith(b"\xef\xbb\xbf"):
            off = 3
        pos = 0
    elif buf[:1] == b"\n":  # a line starts right at `start`
        off, pos = 1, start
    else:  # the line in progress at `start` belongs to the range before: skip past its newline
        base = start - 1
        while True:
            i = buf.find(b"\n")
            if i >= 0:
                off, pos, n = i + 1, base + i + 1, n + 1
                break
            more = fh.read(READ_BYTES)
            if not more:
                return
            base += len(buf)
            buf = bytes(more)
    while pos < end:
        i = buf.find(b"\n", off)
        while i < 0:
            more = fh.read(READ_BYTES)
            if not more:
                break
            buf = buf[off:] + bytes(more)
            off = 0
            i = buf.find(b"\n")
        if i < 0:  # the file's last line, without a newline
            raw = buf[off:].rstrip(b"\r")
            if raw.strip():
                yield n + 1, raw
            return
        raw = buf[off:i].rstrip(b"\r")
        if raw.strip():
            yield n + 1, raw
        pos += i + 1 - off
        n += 1
        off = i + 1


def row_groups(location: str, display: str = "") -> list[tuple[int, int]]:
    """(rows, bytes) of each row group of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    try:
        with storage.open_input(location) as fh:
            meta = pq.ParquetFile(fh).metadata
    except (OSError, ValueError) as e:  # pyarrow: "Parquet magic bytes not found", a truncated footer
        raise UserError(f"{display or location}: not a readable Parquet file ({e})") from None
    return [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]


def read_rows(f: SourceFile, u: Unit) -> Iterator[pa.Table]:
    """Blocks of LINES for the row groups of one Parquet unit: (file index, 1-based row, JSON record)."""
    n = u.newlines
    for raws in parquet_record_batches(f.location, list(range(u.start, u.end)), LINES_PER_BLOCK):
        yield _block(u.fi, list(range(n + 1, n + 1 + len(raws))), raws)
        n += len(raws)


def read_lines(files: Sequence[SourceFile], units: Sequence[Unit]) -> Iterator[pa.Table]:
    """Blocks of LINES for the given units, streamed (a file is never held whole in memory)."""
    for u in units:
        f = files[u.fi]
        if f.format == "parquet":
            yield from read_rows(f, u)
            continue
        nums: list[int] = []
        raws: list[bytes] = []
        size = 0
        with storage.open_input(f.location) as fh:
            for n, raw in iter_range_lines(fh, u.start, u.end, u.newlines):
                nums.append(n)
                raws.append(raw)
                size += len(raw)
                if len(nums) >= LINES_PER_BLOCK or size >= BYTES_PER_BLOCK:
                    yield _block(u.fi, nums, raws)
                    nums, raws, size = [], [], 0
        if nums:
            yield _block(u.fi, nums, raws)


def plan_units(files: Sequence[SourceFile], count: Callable[[list[tuple[int, int, int]]], list[int]],
               split: int = 0,
               groups: Optional[Callable[[list[int]], list[list[tuple[int, int]]]]] = None) -> list[Unit]:
    """The read units of `files` in file order; `count` maps (file, start, end) ranges of JSONL
    files to their newline counts (Ray tasks where the files are), asked only for the ranges of
    split files; `groups` maps Parquet file indices to the (rows, bytes) of their row groups."""
    parquet = [fi for fi, f in enumerate(files) if f.format == "parquet"]
    footers = dict(zip(parquet, groups(parquet))) if parquet and groups is not None else {}
    pieces = [(fi, a, b) for fi, f in enumerate(files) if f.format != "parquet" for a, b in ranges(f.size, split)]
    split_files = {fi for fi, a, _ in pieces if a > 0}
    asked = [p for p in pieces if p[0] in split_files]
    counts = dict(zip(asked, count(asked))) if asked else {}
    units, before = [], {}
    for fi, a, b in pieces:
        units.append(Unit(fi, a, b, before.get(fi, 0)))
        before[fi] = before.get(fi, 0) + counts.get((fi, a, b), 0)
    for fi in parquet:
        rows = 0
        for g, (n, nbytes) in enumerate(footers.get(fi, [])):  # one unit a row group: many read tasks
            units.append(Unit(fi, g, g + 1, rows, max(1, nbytes)))
            rows += n
    return sorted(units, key=lambda u: (u.fi, u.start))


def _block(fi: int, nums: list[int], raws: list[bytes]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array([fi] * len(nums), pa.int32()), pa.array(nums, pa.int64()), pa.array(raws, pa.binary())],
        schema=LINES)


def group_files(sizes: Sequence[int], parallelism: int) -> list[list[int]]:
    """min(parallelism, files) consecutive groups of file indices with about equal bytes."""
    n = len(sizes)
    if n == 0:
        return []
    k = max(1, min(parallelism, n))
    target = sum(max(1, s) for s in sizes) / k
    groups: list[list[int]] = [[]]
    acc = 0
    for i, s in enumerate(sizes):
        # A new group when this one is full, or when every group still to come needs a file.
        if groups[-1] and len(groups) < k and (acc >= target or n - i <= k - len(groups)):
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += max(1, s)
    return groups


def make_datasource(files: Sequence[SourceFile], units: Sequence[Unit], shared: bool = False):
    """The datasource over the read units of `files` (built here so importing this module does not
    import Ray); `shared`: local paths are seen by every node (run.shared_storage)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    files, units = list(files), list(units)

    class JsonlLines(Datasource):
        def get_name(self) -> str:
            return "JsonlLines"

        @property
        def supports_distributed_reads(self) -> bool:
            return shared or not any(f.local for f in files)

        def estimate_inmemory_data_size(self) -> Optional[int]:
            return sum(u.size for u in units)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                           data_context=None) -> list:
            tasks = []
            for group in group_files([u.size for u in units], parallelism):
                mine = [units[i] for i in group]
                meta = BlockMetadata(num_rows=None, size_bytes=sum(u.size for u in mine),
                                     input_files=sorted({files[u.fi].display for u in mine}), exec_stats=None)
                tasks.append(ReadTask(lambda g=tuple(mine): read_lines(files, g), meta,
                                      schema=LINES, per_task_row_limit=per_task_row_limit))
            return tasks

    return JsonlLines()
