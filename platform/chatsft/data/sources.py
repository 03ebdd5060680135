"""Where records come from: `chatsft://` names the shipped samples; local files are read line by line."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from chatsft.data.conversation import BadRecord, Conversation, iter_lines, parse_line

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SCHEME = "chatsft://"


def resolve_uri(path: str) -> str:
    """`chatsft://samples/train.jsonl` -> the file inside the installed package; others unchanged."""
    if path.startswith(SCHEME):
        return str(PACKAGE_ROOT / path[len(SCHEME):])
    return path


def expand_local(path: str) -> list[str]:
    """A local path or glob -> sorted files (a folder means its *.jsonl files)."""
    path = resolve_uri(path)
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.jsonl")))
    if any(ch in path for ch in "*?["):
        return sorted(glob.glob(path, recursive=True))
    return [path] if os.path.exists(path) else []


def read_local(path: str, limit: Optional[int] = None) -> Iterator[Union[Conversation, BadRecord]]:
    """Parse a local JSONL file: a Conversation or the BadRecord of each non-blank line."""
    files = expand_local(path)
    if not files:
        raise FileNotFoundError(2, "no such file", resolve_uri(path))
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        for source, raw in iter_lines(data, f):
            if limit is not None and n >= limit:
                return
            n += 1
            try:
                yield parse_line(raw, source)
            except BadRecord as e:
                yield e
