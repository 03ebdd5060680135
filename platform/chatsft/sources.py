"""Where records come from: a source spec (path, glob, folder, URI, `chatsft://` name) -> its files.

`chatsft://samples/...` names the sample data shipped inside the package; every
other location goes through chatsft.storage, so local disks and object stores
are read the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from chatsft import storage
from chatsft.data.conversation import (BadRecord, Conversation, iter_lines, iter_stream_lines, parse_line,
                                      read_chunks)

PACKAGE_ROOT = Path(__file__).resolve().parent
SCHEME = "chatsft://"


def resolve_uri(path: str) -> str:
    """`chatsft://samples/train.jsonl` -> the file inside the installed package; others unchanged."""
    if path.startswith(SCHEME):
        return str(PACKAGE_ROOT / path[len(SCHEME):])
    return path


def first_records(paths: Sequence[str], limit: int) -> Iterator[Union[Conversation, BadRecord]]:
    """The first `limit` records of the sources in order, streamed (a large file is not read whole)."""
    n = 0
    for spec in paths:
        for f in expand_source(spec):
            with storage.open_stream(f.location) as fh:
                for line, raw in iter_stream_lines(read_chunks(fh, 1 << 16)):
                    if n >= limit:
                        return
                    n += 1
                    try:
                        yield parse_line(raw, f"{f.display}:{line}")
                    except BadRecord as e:
                        yield e


def expand_local(path: str) -> list[str]:
    """A source spec -> the paths of its files, sorted (a folder means its *.jsonl files)."""
    return [f.location for f in expand_source(path)]


def read_local(path: str, limit: Optional[int] = None) -> Iterator[Union[Conversation, BadRecord]]:
    """Parse the JSONL files of a source spec in this process (inspect, eval, small fixtures):
    a Conversation or the BadRecord of each non-blank line, named as the pipeline names them."""
    files = expand_source(path)
    if not files:
        raise FileNotFoundError(2, "no such file", resolve_uri(path))
    n = 0
    for f in files:
        data = storage.read_bytes(f.location) or b""
        for source, raw in iter_lines(data, f.display):
            if limit is not None and n >= limit:
                return
            n += 1
            try:
                yield parse_line(raw, source)
            except BadRecord as e:
                yield e


# ------------------------------------------------------------ files of a source spec


@dataclass(frozen=True)
class SourceFile:
    """One JSONL file of a source: how records name it, where to open it, and what it is now."""

    display: str  # the path in `path:line` provenance: as the user wrote it (chatsft:// kept)
    location: str  # a local path, or a URI any pyarrow/fsspec filesystem opens
    local: bool  # on this machine's disk (read on the driver's node in a cluster)
    size: int
    mtime_ns: int


def expand_source(spec: str) -> list[SourceFile]:
    """A path, glob, folder, `chatsft://` name or URI -> its files, sorted by name."""
    location = resolve_uri(spec)
    if storage.is_dir(location):
        found = storage.list_files(location, suffix=".jsonl")
    else:
        found = storage.glob(location)
    root = str(PACKAGE_ROOT) + os.sep
    out = []
    for f in found:
        shown = f.path
        if spec.startswith(SCHEME) and shown.startswith(root):
            shown = SCHEME + shown[len(root):]
        elif not storage.is_uri(spec) and not os.path.isabs(spec):
            shown = os.path.relpath(f.path)  # as the user wrote it: provenance reads `data/x.jsonl:12`
        out.append(SourceFile(shown, f.path, storage.is_local(f.path), f.size, f.mtime_ns))
    return out
