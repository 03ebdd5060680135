"""The data order of training: fixed by the stored rows and the seed, not by workers or batch split."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatsft.data.order import epoch_rows, global_batches, worker_micro_batches
from chatsft.data.schema import EMPTY, IGNORE, Row, iter_rows
from chatsft.model.batch import collate
from chatsft.train.data import file_batches


def rows(n):
    # row i: a single token id i (so a row's identity survives reordering)
    return [Row(np.array([i, i], np.int64), np.array([IGNORE, i], np.int64)) for i in range(n)]


def ident(r):
    return -1 if r.empty else int(r.input_ids[0])


def step_rows(data, *, world, micro, accum, seed=0, epoch=0, start=0, window=8):
    """Per step: the rows all workers see, in global order (row j from worker j % world)."""
    out = []
    G = micro * accum * world
    for batch in global_batches(epoch_rows(data, seed=seed, epoch=epoch, start=start, window=window), G):
        per_worker = [sum(worker_micro_batches(batch, rank=w, world=world, micro=micro), [])
                      for w in range(world)]
        counts = {len(worker_micro_batches(batch, rank=w, world=world, micro=micro)) for w in range(world)}
        assert counts == {accum}  # every worker runs the same number of micro-batches
        merged = [per_worker[j % world][j // world] for j in range(G)]
        out.append([ident(r) for r in merged])
    return out


@pytest.mark.parametrize("world,micro,accum", [(1, 1, 4), (2, 2, 1), (2, 1, 2), (4, 1, 1)])
def test_global_batches_do_not_depend_on_split(world, micro, accum):
    data = rows(37)
    assert step_rows(data, world=world, micro=micro, accum=accum) == step_rows(data, world=1, micro=4, accum=1)


def test_epoch_order_is_a_seeded_permutation():
    data = rows(50)
    a = [ident(r) for r in epoch_rows(data, seed=3, epoch=0, window=16)]
    assert sorted(a) == list(range(50))
    assert a == [ident(r) for r in epoch_rows(data, seed=3, epoch=0, window=16)]
    assert a != [ident(r) for r in epoch_rows(data, seed=3, epoch=1, window=16)]
    assert a != [ident(r) for r in epoch_rows(data, seed=4, epoch=0, window=16)]
    # windowed: rows stay inside their window of 16
    assert sorted(a[:16]) == list(range(16))


@pytest.mark.parametrize("start", [0, 5, 16, 17, 40, 50, 60])
def test_resume_position_continues_the_same_order(start):
    data = rows(50)
    full = [ident(r) for r in epoch_rows(data, seed=1, epoch=2, window=16)]
    assert [ident(r) for r in epoch_rows(data, seed=1, epoch=2, start=start, window=16)] == full[start:]


def test_last_batch_padded_with_empty_rows():
    batches = list(global_batches(iter(rows(10)), 4))
    assert len(batches) == 3
    assert [ident(r) for r in batches[-1]] == [8, 9, -1, -1]
    assert batches[-1][2] is EMPTY


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
    b = collate(packed, pad_id=0, seq2seq=False)
    assert "attention_mask" not in b.inputs
    # the filler (one pad token) and the padding after it are sequences of their own
    assert b.inputs["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert b.targets.tolist() == [[8, IGNORE, IGNORE], [IGNORE] * 3]  # border at position 2 masked
    assert b.num_targets == 1 and b.tokens == 3
    padded = [Row(np.array([7, 8, 9]), np.array([IGNORE, 8, 9])), Row(np.array([5]), np.array([5]))]
    b = collate(padded, pad_id=0, seq2seq=False)
    assert b.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.targets.tolist() == [[8, 9, IGNORE], [IGNORE] * 3]
