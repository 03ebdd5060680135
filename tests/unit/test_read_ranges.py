"""A large JSONL file read as byte ranges by many tasks gives the lines, and the line numbers,
of one front-to-back read, wherever the cuts fall."""

import random

import pytest

from chatsft.data.conversation import iter_stream_lines, read_chunks
from chatsft.pipeline import read
from chatsft.pipeline.read import count_newlines, iter_range_lines, plan_units, ranges, read_lines
from chatsft.sources import expand_source


def corpus(rng, n):
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.1:
            lines.append(b"")  # blank: counted, not read
        elif kind < 0.15:
            lines.append(b"  \r")
        else:
            lines.append(b'{"x": "' + bytes(rng.choice(b"abc\xc3\xa9") for _ in range(rng.randint(0, 40))) + b'"}'
                         + (b"\r" if rng.random() < 0.2 else b""))
    data = b"\n".join(lines)
    if rng.random() < 0.5:
        data += b"\n"
    if rng.random() < 0.3:
        data = b"\xef\xbb\xbf" + data
    return data


@pytest.mark.parametrize("seed", range(6))
def test_ranges_read_the_lines_of_the_whole_file(tmp_path, seed):
    rng = random.Random(seed)
    data = corpus(rng, 300)
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    whole = list(iter_stream_lines(read_chunks(open(path, "rb"), 7)))
    for split in (1, 2, 5, 17, 64, 1000, len(data) + 1):
        cuts = ranges(len(data), split)
        assert cuts[0][0] == 0 and cuts[-1][1] == len(data)
        got, before = [], 0
        for a, b in cuts:
            with open(path, "rb") as fh:
                got += list(iter_range_lines(fh, a, b, before))
            before += count_newlines(str(path), a, b)
        assert got == whole, split


def test_units_of_a_big_file_number_lines_as_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "READ_BYTES", 8)  # lines longer than a read, too
    rng = random.Random(9)
    (tmp_path / "a.jsonl").write_bytes(corpus(rng, 200))
    (tmp_path / "b.jsonl").write_bytes(corpus(rng, 5))
    files = expand_source(str(tmp_path))
    asked = []

    def count(pieces):
        asked.extend(pieces)
        return [count_newlines(files[fi].location, a, b) for fi, a, b in pieces]

    units = plan_units(files, count, split=500)
    assert len([u for u in units if u.fi == 0]) > 3 and len([u for u in units if u.fi == 1]) == 1
    assert all(fi == 0 for fi, _, _ in asked)  # a file read whole needs no count
    got = [(fi, n, raw) for t in read_lines(files, units)
           for fi, n, raw in zip(t["file_idx"].to_pylist(), t["line"].to_pylist(), t["raw"].to_pylist())]
    want = [(fi, n, raw) for fi, f in enumerate(files)
            for n, raw in iter_stream_lines(read_chunks(open(f.location, "rb")))]
    assert got == want


def test_parquet_row_groups_are_read_units_numbered_as_the_file(tmp_path):
    """A Parquet file of many row groups gives one read unit a row group; over all of them the
    rows come numbered 1.. as in the file, each as the JSON text of its record (nulls of the
    Hugging Face struct layout dropped, other columns ignored), the same as one front-to-back read."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatsft.pipeline.read import row_groups
    from chatsft.sources import iter_records

    rows = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"},
                                   {"role": "assistant", "content": f"a{i}", "reasoning_content": "r" if i % 3 else None}]}
            for i in range(50)]
    rows[7]["messages"] = None
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=6)
    (f,) = expand_source(str(path))
    assert f.format == "parquet"
    units = plan_units([f], lambda asked: [], groups=lambda fis: [row_groups(f.location) for _ in fis])
    assert len(units) == 9 and [u.newlines for u in units] == list(range(0, 50, 6))
    got = [(n, raw) for b in read_lines([f], units)
           for n, raw in zip(b["line"].to_pylist(), b["raw"].to_pylist())]
    assert got == list(iter_records(f))
    assert [n for n, _ in got] == list(range(1, 51))
    assert json.loads(got[0][1]) == {"messages": [{"role": "user", "content": "q0"},
                                                 {"role": "assistant", "content": "a0"}]}
    assert json.loads(got[1][1])["messages"][1]["reasoning_content"] == "r"
    assert json.loads(got[7][1]) == {"id": None}  # refused as missing_messages, naming the columns


def test_format_by_extension_or_declared(tmp_path):
    for name in ("a.jsonl", "b.parquet", "c.txt", "d.JSONL"):
        (tmp_path / name).write_bytes(b"")
    assert [(f.display.rsplit("/", 1)[1], f.format) for f in expand_source(str(tmp_path))] == [
        ("a.jsonl", "jsonl"), ("b.parquet", "parquet")]  # a folder: its .jsonl and .parquet files
    assert [f.format for f in expand_source(str(tmp_path / "*"))] == ["jsonl", "parquet", "", "jsonl"]
    assert [f.format for f in expand_source(str(tmp_path / "c.txt"), "jsonl")] == ["jsonl"]
