"""The data order of training: fixed by the stored rows and the seed, not by workers or batch split;
each worker reads only the row groups that hold its rows."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatsft.data.order import EpochOrder, micro_batches, worker_span
from chatsft.data.schema import EMPTY, IGNORE, Row, iter_rows
from chatsft.model.batch import collate
from chatsft.train.data import ChunkReader, RowIndex, file_batches, shard_rows, worker_steps


def write_split(folder, n, group=5, files=2):
    """n rows over `files` Parquet files in row groups of `group` rows; row i holds token id i."""
    folder.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        ids = list(range(cuts[f], cuts[f + 1]))
        table = pa.table({
            "input_ids": pa.array([[i, i] for i in ids], type=pa.list_(pa.int32())),
            "labels": pa.array([[IGNORE, i] for i in ids], type=pa.list_(pa.int32())),
            "source": pa.array([[f"x:{i}"] for i in ids], type=pa.list_(pa.string())),
        })
        pq.write_table(table, folder / f"part-{f:05d}.parquet", row_group_size=group)
    return RowIndex.build(str(folder))


def ident(r):
    return -1 if r.empty else int(r.input_ids[0])


def steps_of(index, *, world, micro, accum, seed=0, epoch=0, start=0):
    """Per step: the global batch as the sorted ids of all workers' rows (-1: filler), and the readers."""
    G = micro * accum * world
    readers = [ChunkReader(index) for _ in range(world)]
    per_worker = []
    for rank in range(world):
        got = []
        for mine in worker_steps(index, readers[rank], seed=seed, epoch=epoch, global_batch=G, rank=rank,
                                 world=world, start_step=start):
            mbs = micro_batches(mine, micro)
            assert len(mbs) == accum and all(len(m) == micro for m in mbs)
            got.append([ident(r) for r in mine])
        per_worker.append(got)
    assert len({len(g) for g in per_worker}) == 1  # every worker runs as many steps
    return [sorted(sum((g[k] for g in per_worker), [])) for k in range(len(per_worker[0]))], readers


@pytest.mark.parametrize("world,micro,accum", [(1, 1, 4), (2, 2, 1), (2, 1, 2), (4, 1, 1)])
def test_global_batches_do_not_depend_on_split(tmp_path, world, micro, accum):
    index = write_split(tmp_path / "rows", 37)
    ref, _ = steps_of(index, world=1, micro=4, accum=1)
    got, _ = steps_of(index, world=world, micro=micro, accum=accum)
    assert got == ref
    # an epoch is every stored row once, the last step filled with empty rows
    flat = sum(ref, [])
    assert sorted(r for r in flat if r >= 0) == list(range(37))
    assert flat.count(-1) == 3 and len(ref) == 10


@pytest.mark.parametrize("group", [5, 7])  # 7: lanes end inside row groups
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_workers_read_only_their_rows(tmp_path, world, group):
    """Worker r reads the row groups of its contiguous run of the epoch order and no others; the
    union of what the workers train on is the epoch's order exactly, each row once."""
    n = 120
    index = write_split(tmp_path / "rows", n, group=group, files=3)
    G = 12
    order = EpochOrder(index.sizes, 7, 1)
    trained = []
    for rank in range(world):
        reader = ChunkReader(index)
        rows = [ident(r) for mine in worker_steps(index, reader, seed=7, epoch=1, global_batch=G, rank=rank,
                                                   world=world) for r in mine]
        trained += [r for r in rows if r >= 0]
        span = worker_span(n, G, rank, world)
        start, end = span[0][0], span[-1][1]
        assert all(a[1] == b[0] for a, b in zip(span, span[1:]))  # its lanes are one contiguous run
        allowed = order.chunks_between(start, end)
        assert set(reader.read_chunks) == set(allowed)
        # each once: a row group where one of its lanes ends and the next begins is kept, not re-read
        assert reader.bytes_read == sum(index.nbytes[c] for c in reader.read_chunks)
        # what it read: its own rows plus at most the two row groups it shares with its neighbours
        assert sum(index.sizes[c] for c in set(reader.read_chunks)) <= n / world + 2 * (group - 1)
        # stored rows it trained on are exactly those of its run of the epoch order
        stored = order.stored_rows(index.chunk_starts)
        assert sorted(r for r in rows if r >= 0) == sorted(stored[start:end].tolist())
    assert sorted(trained) == list(range(n))


def test_epoch_order_is_a_seeded_permutation(tmp_path):
    index = write_split(tmp_path / "rows", 50)
    a = EpochOrder(index.sizes, 3, 0).stored_rows(index.chunk_starts).tolist()
    assert sorted(a) == list(range(50))
    assert a == EpochOrder(index.sizes, 3, 0).stored_rows(index.chunk_starts).tolist()
    assert a != EpochOrder(index.sizes, 3, 1).stored_rows(index.chunk_starts).tolist()
    assert a != EpochOrder(index.sizes, 4, 0).stored_rows(index.chunk_starts).tolist()
    # epochs differ in their batches, not only in the order of the same batches
    b0, _ = steps_of(index, world=1, micro=4, accum=1, epoch=0)
    b1, _ = steps_of(index, world=1, micro=4, accum=1, epoch=1)
    assert b0 != b1 and sorted(map(tuple, b0)) != sorted(map(tuple, b1))


@pytest.mark.parametrize("start", [0, 1, 5, 9, 10])
def test_resume_step_continues_the_same_order(tmp_path, start):
    """A run resumed at step k, on any number of workers, trains the very batches it would have."""
    index = write_split(tmp_path / "rows", 37)
    full, _ = steps_of(index, world=2, micro=2, accum=1, seed=1, epoch=2)
    for world in (1, 2, 4):
        tail, readers = steps_of(index, world=world, micro=1, accum=4 // world, seed=1, epoch=2, start=start)
        assert tail == full[start:]
    # and reads nothing before it: at the last step only the row groups of that step's rows
    _, readers = steps_of(index, world=1, micro=4, accum=1, seed=1, epoch=2, start=9)
    assert len(readers[0].read_chunks) <= 4


def test_eval_shards_cover_the_split_once(tmp_path):
    index = write_split(tmp_path / "rows", 23, group=4)
    for world in (1, 2, 3):
        got = [ident(r) for rank in range(world) for r in shard_rows(index, ChunkReader(index), rank, world)]
        assert got == list(range(23))


def test_parquet_rows_round_trip(tmp_path):
    table = pa.table({
        "input_ids": pa.array([[1, 2, 3], [4, 5]], type=pa.list_(pa.int32())),
        "labels": pa.array([[IGNORE, 2, 3], [IGNORE, 5]], type=pa.list_(pa.int32())),
        "position_ids": pa.array([[0, 1, 0], [0, 1]], type=pa.list_(pa.int32())),
        "source": pa.array([["a:1", "a:2"], ["a:3"]], type=pa.list_(pa.string())),
    })
    pq.write_table(table, tmp_path / "part-00000.parquet")
    got = list(iter_rows(file_batches(str(tmp_path))()))
    assert [r.input_ids.tolist() for r in got] == [[1, 2, 3], [4, 5]]
    assert [r.position_ids.tolist() for r in got] == [[0, 1, 0], [0, 1]]


def test_collate_packed_and_padded():
    packed = [Row(np.array([7, 8, 9]), np.array([IGNORE, 8, 9]), np.array([0, 1, 0])), EMPTY]
    b = collate(packed, pad_id=0)
    assert "attention_mask" not in b.inputs
    # the filler (one pad token) and the padding after it are sequences of their own
    assert b.inputs["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert b.targets.tolist() == [[8, IGNORE, IGNORE], [IGNORE] * 3]  # border at position 2 masked
    assert b.num_targets == 1 and b.tokens == 3
    padded = [Row(np.array([7, 8, 9]), np.array([IGNORE, 8, 9])), Row(np.array([5]), np.array([5]))]
    b = collate(padded, pad_id=0)
    assert set(b.inputs) == {"input_ids"}  # right padding needs no mask under causal attention
    assert b.inputs["input_ids"].tolist() == [[7, 8, 9], [5, 0, 0]]
    assert b.targets.tolist() == [[8, 9, IGNORE], [IGNORE] * 3]
