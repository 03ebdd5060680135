"""Reading JSONL sources as raw lines with their numbers: a Ray Data datasource.

Ray Data's JSON reader parses for us, which loses line numbers and stops a
whole file at its first bad line; `read_text` decodes, so invalid UTF-8 could
not be reported as a bad record. This datasource yields (file index, 1-based
line, raw bytes) and leaves parsing to the render stage, per record.

Where the reads run: files on this machine's disk (local paths, `chatsft://`,
`file://`) are read by tasks pinned to the driver's node (the
`supports_distributed_reads = False` contract, what Ray Data's own `local://`
scheme does), because on a multi-node cluster another node has no such file.
Reading is cheap next to tokenizing, and the lines then travel to render
actors on every node through the object store. Remote URIs (s3://, gs://, ...)
are read wherever Ray Data places the tasks.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import pyarrow as pa

from chatsft import storage
from chatsft.data.conversation import iter_stream_lines, read_chunks
from chatsft.sources import SourceFile

LINES_PER_BLOCK = 4096
BYTES_PER_BLOCK = 16 << 20

LINES = pa.schema([("file_idx", pa.int32()), ("line", pa.int64()), ("raw", pa.binary())])


def read_lines(files: Sequence[SourceFile], indices: Sequence[int]) -> Iterator[pa.Table]:
    """Blocks of LINES for the given files, streamed (a file is never held whole in memory)."""
    for fi in indices:
        f = files[fi]
        nums: list[int] = []
        raws: list[bytes] = []
        size = 0
        with storage.open_stream(f.location) as stream:
            for n, raw in iter_stream_lines(read_chunks(stream)):
                nums.append(n)
                raws.append(raw)
                size += len(raw)
                if len(nums) >= LINES_PER_BLOCK or size >= BYTES_PER_BLOCK:
                    yield _block(fi, nums, raws)
                    nums, raws, size = [], [], 0
        if nums:
            yield _block(fi, nums, raws)


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


def make_datasource(files: Sequence[SourceFile]):
    """The datasource over `files` (built here so importing this module does not import Ray)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    files = list(files)

    class JsonlLines(Datasource):
        def get_name(self) -> str:
            return "JsonlLines"

        @property
        def supports_distributed_reads(self) -> bool:
            return not any(f.local for f in files)

        def estimate_inmemory_data_size(self) -> Optional[int]:
            return sum(f.size for f in files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                           data_context=None) -> list:
            tasks = []
            for group in group_files([f.size for f in files], parallelism):
                meta = BlockMetadata(num_rows=None, size_bytes=sum(files[i].size for i in group),
                                     input_files=[files[i].display for i in group], exec_stats=None)
                tasks.append(ReadTask(lambda g=tuple(group): read_lines(files, g), meta,
                                      schema=LINES, per_task_row_limit=per_task_row_limit))
            return tasks

    return JsonlLines()
