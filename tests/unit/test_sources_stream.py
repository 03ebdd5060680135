"""Streaming line reader and source expansion: same lines and numbers as reading the whole file."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from chatsft.data.conversation import iter_lines
from chatsft.data.conversation import iter_stream_lines
from chatsft.sources import expand_source

pieces = st.lists(st.sampled_from([b"\n", b"\r\n", b" ", b"{}", b"\xef\xbb\xbf", b"\xff", b"ab", b"\r"]),
                  max_size=40)


@settings(max_examples=300, deadline=None)
@given(pieces, st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_stream_lines_match_whole_file(parts, cuts):
    data = b"".join(parts)
    chunks, pos, k = [], 0, 0
    while pos < len(data):
        step = cuts[k % len(cuts)]
        chunks.append(data[pos:pos + step])
        pos, k = pos + step, k + 1
    expected = [(int(src.rsplit(":", 1)[1]), raw) for src, raw in iter_lines(data, "f")]
    assert list(iter_stream_lines(chunks)) == expected


def test_expand_source_local_glob_folder_and_uri(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_bytes(b"{}\n")
    folder = expand_source(str(tmp_path))
    assert [os.path.basename(f.display) for f in folder] == ["a.jsonl", "b.jsonl"]
    assert all(f.local and f.size == 3 for f in folder)
    glob = expand_source(str(tmp_path / "*.txt"))
    assert [os.path.basename(f.display) for f in glob] == ["c.txt"]
    uri = expand_source(f"file://{tmp_path}/*.jsonl")
    assert [f.display for f in uri] == [f"file://{tmp_path}/a.jsonl", f"file://{tmp_path}/b.jsonl"]
    assert expand_source(str(tmp_path / "missing.jsonl")) == []
    (shipped,) = expand_source("chatsft://samples/train.jsonl")
    assert shipped.display == "chatsft://samples/train.jsonl" and os.path.isfile(shipped.location)
