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

Both row sources (a Ray DataIterator on workers, pyarrow files with --local)
go through `iter_stored_rows`, so the order is identical in both modes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

IGNORE = -100
SHUFFLE_WINDOW = 4096  # rows permuted together: streams, and mixes well over already-shuffled rows
COLUMNS = ("input_ids", "labels", "position_ids")


@dataclass(frozen=True)
class Row:
    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64, unshifted, IGNORE where no loss
    position_ids: Optional[np.ndarray] = None  # packed rows only

    @property
    def empty(self) -> bool:
        return len(self.input_ids) == 0


EMPTY = Row(np.zeros(0, np.int64), np.zeros(0, np.int64), None)


# ------------------------------------------------------------------ row sources


def _fs(path: str):
    """(filesystem, path inside it) for a local folder or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def parquet_files(folder: str) -> list[str]:
    """The Parquet files of a prepared split, in stored order (sorted names; URIs stay URIs)."""
    import pyarrow.fs

    fs, root = _fs(folder)
    info = fs.get_file_info(root)
    if info.type != pyarrow.fs.FileType.Directory:
        return []
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    names = sorted(f.path for f in found if f.type == pyarrow.fs.FileType.File and f.path.endswith(".parquet"))
    if "://" in folder:
        scheme = folder.split("://", 1)[0]
        return [f"{scheme}://{n}" for n in names]
    return names


def open_parquet(path: str):
    import pyarrow.parquet as pq

    fs, inner = _fs(path)
    return pq.ParquetFile(fs.open_input_file(inner))


def count_rows(folder: str) -> int:
    return sum(open_parquet(f).metadata.num_rows for f in parquet_files(folder))


def local_batches(folder: str) -> Callable[[], Iterator[Any]]:
    """A re-startable source of Arrow record batches read straight from the files (--local)."""
    files = parquet_files(folder)

    def batches() -> Iterator[Any]:
        for f in files:
            pf = open_parquet(f)
            cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=1024, columns=cols)

    return batches


def ray_batches(iterator: Any) -> Callable[[], Iterator[Any]]:
    """A re-startable source of Arrow tables from a Ray DataIterator (unsplit, order preserved)."""

    def batches() -> Iterator[Any]:
        yield from iterator.iter_batches(batch_size=1024, batch_format="pyarrow", prefetch_batches=2)

    return batches


def iter_stored_rows(batches: Iterable[Any]) -> Iterator[Row]:
    """Arrow tables / record batches -> Rows, in order."""
    for batch in batches:
        names = batch.schema.names
        cols = {}
        for name in COLUMNS:
            if name not in names:
                continue
            col = batch.column(name)
            if hasattr(col, "combine_chunks"):  # ChunkedArray (Table)
                col = col.combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
            cols[name] = (offsets, values)
        for i in range(batch.num_rows):
            parts = {}
            for name, (offsets, values) in cols.items():
                parts[name] = values[offsets[i]:offsets[i + 1]]
            yield Row(parts["input_ids"], parts["labels"], parts.get("position_ids"))


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


def steps_per_epoch(rows: int, global_batch: int) -> int:
    return max(1, math.ceil(rows / global_batch))


# -------------------------------------------------------------------- collation


@dataclass
class Batch:
    """Tensors of one micro-batch, ready for the model; `targets` are aligned with the logits."""

    inputs: dict[str, Any]
    targets: Any  # LongTensor [B, T]: the label each logit position predicts, IGNORE elsewhere
    num_targets: int
    tokens: int  # tokens of real rows, padding excluded (throughput)
    slots: int  # token positions the model computes (padding included)


def collate(rows: Sequence[Row], *, pad_id: int, seq2seq: bool, decoder_start: Optional[Callable] = None) -> Batch:
    """Pad a micro-batch on the right. Causal rows: packed rows carry position_ids (no mask,
    so attention is block-diagonal per packed sequence), unpacked rows an attention mask."""
    import torch

    from chatsft.train.loss import causal_targets

    tokens = sum(len(r.input_ids) + (len(r.labels) if seq2seq else 0) for r in rows)
    rows = [_fill_empty(r, pad_id) for r in rows]
    if seq2seq:
        enc_len = max(len(r.input_ids) for r in rows)
        dec_len = max(len(r.labels) for r in rows)
        ids = torch.full((len(rows), enc_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), enc_len), dtype=torch.long)
        labels = torch.full((len(rows), dec_len), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r.input_ids)] = torch.from_numpy(r.input_ids)
            mask[i, :len(r.input_ids)] = 1
            labels[i, :len(r.labels)] = torch.from_numpy(r.labels)
        # The decoder reads the labels shifted right: that shift is the model's own
        # (prepare_decoder_input_ids_from_labels); logits are then aligned with labels.
        inputs = {"input_ids": ids, "attention_mask": mask,
                  "decoder_input_ids": decoder_start(labels)}
        targets = labels
    else:
        length = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        packed = any(r.position_ids is not None for r in rows)
        if packed:
            pos = torch.zeros((len(rows), length), dtype=torch.long)
        else:
            mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n] = torch.from_numpy(r.input_ids)
            labels[i, :n] = torch.from_numpy(r.labels)
            if packed:
                p = r.position_ids if r.position_ids is not None else np.arange(n)
                pos[i, :n] = torch.from_numpy(np.asarray(p, dtype=np.int64))
                # padding is a sequence of its own (positions restart at 0): it never
                # joins the block of the last real sequence
                pos[i, n:] = torch.arange(length - n)
            else:
                mask[i, :n] = 1
        if packed:
            inputs = {"input_ids": ids, "position_ids": pos}
            targets = causal_targets(labels, pos)
        else:
            inputs = {"input_ids": ids, "attention_mask": mask}
            targets = causal_targets(labels, None)
    num = int((targets != IGNORE).sum())
    slots = sum(int(v.numel()) for k, v in inputs.items() if k in ("input_ids", "decoder_input_ids"))
    return Batch(inputs, targets, num, tokens, slots)


def _fill_empty(row: Row, pad_id: int) -> Row:
    """An empty filler row becomes one pad token without loss (a forward still runs)."""
    if not row.empty:
        return row
    pos = None if row.position_ids is None else np.zeros(1, np.int64)
    return Row(np.full(1, pad_id, np.int64), np.full(1, IGNORE, np.int64), pos)
