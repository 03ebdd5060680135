"""Where records come from: a source spec (path, glob, folder, URI, `chatsft://` name) -> its files.

`chatsft://samples/...` names the sample data shipped inside the package; every
other location goes through chatsft.storage, so local disks and object stores
are read the same way.

Two file formats, told by the extension (or the source's `format` key), never
by looking at the content: JSONL (`.jsonl`, one record a line) and Parquet
(`.parquet`, one record a row, in the Hugging Face datasets layout: a
`messages` column of list<struct<role, content, ...>> or of JSON text, an
optional `tools` column, other columns ignored). A Parquet row is turned into the JSON text of
its record (`parquet_records`) and from there takes the very path a JSONL line
takes (`parse_line`): one validator, the same reasons. Rows are numbered from 1
within their file, as lines are, so provenance reads `path:row`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from chatsft import storage
from chatsft.errors import MissingFile, UserError
from chatsft.data.conversation import (BadRecord, Conversation, iter_stream_lines, parse_line,
                                      read_chunks)

PACKAGE_ROOT = Path(__file__).resolve().parent
SCHEME = "chatsft://"
EXTENSIONS = {".jsonl": "jsonl", ".parquet": "parquet"}  # a folder means its files of these
RECORD_COLUMNS = ("messages", "tools")  # the columns of a Parquet file that make its records


def resolve_uri(path: str) -> str:
    """`chatsft://samples/train.jsonl` -> the file inside the installed package; others unchanged."""
    if path.startswith(SCHEME):
        return str(PACKAGE_ROOT / path[len(SCHEME):])
    return path


def first_records(sources: Sequence[Any], limit: int,
                  tool_arguments: str = "json") -> Iterator[Union[Conversation, BadRecord]]:
    """The first `limit` records of the sources in order, streamed (a large file is not read whole).
    A source is a spec string or a config Source (path and format); `tool_arguments`: data.tool_arguments."""
    files = [f for src in sources
             for f in expand_source(*((src, "auto") if isinstance(src, str) else (src.path, src.format)))]
    yield from _parsed(files, limit, tool_arguments)


def expand_local(path: str) -> list[str]:
    """A source spec -> the paths of its files, sorted (a folder means its *.jsonl files)."""
    return [f.location for f in expand_source(path)]


def read_local(path: str, limit: Optional[int] = None, declared: str = "auto",
               tool_arguments: str = "json") -> Iterator[Union[Conversation, BadRecord]]:
    """Parse the files of a source spec in this process (inspect, eval, small fixtures):
    a Conversation or the BadRecord of each record, named as the pipeline names them."""
    files = expand_source(path, declared)
    if not files:
        raise MissingFile(resolve_uri(path))
    yield from _parsed(files, limit, tool_arguments)


def _parsed(files: Sequence["SourceFile"], limit: Optional[int],
            tool_arguments: str) -> Iterator[Union[Conversation, BadRecord]]:
    """The records of `files` in order, at most `limit`, each parsed or refused with its path:line."""
    n = 0
    for f in files:
        for line, raw in iter_records(f):
            if limit is not None and n >= limit:
                return
            n += 1
            try:
                yield parse_line(raw, f"{f.display}:{line}", tool_arguments)
            except BadRecord as e:
                yield e


def iter_records(f: "SourceFile") -> Iterator[tuple[int, bytes]]:
    """(1-based line or row, raw JSON record) of each record of a file, streamed: the lines of a
    JSONL file (blank ones skipped, still counted), the rows of a Parquet file row group by row group."""
    if not f.format:
        ext = os.path.splitext(f.display)[1] or "(none)"
        raise UserError(f"{f.display}: extension {ext} is neither .jsonl nor .parquet; rename the file "
                        "(or give the source's format in the config)")
    if f.format == "parquet":
        n = 0
        for raws in parquet_record_batches(f.location):
            for raw in raws:
                n += 1
                yield n, raw
        return
    with storage.open_stream(f.location) as fh:
        yield from iter_stream_lines(read_chunks(fh, 1 << 16))


def parquet_record_batches(location: str, row_groups: Optional[Sequence[int]] = None,
                           batch_size: int = 1024) -> Iterator[list[bytes]]:
    """The JSON text of the records of a Parquet file (of `row_groups` only, when given), in
    row order, a batch of at most `batch_size` rows at a time: only RECORD_COLUMNS are read."""
    import pyarrow.parquet as pq

    with storage.open_input(location) as fh:
        pf = pq.ParquetFile(fh)
        columns = pf.schema_arrow.names
        wanted = [c for c in RECORD_COLUMNS if c in columns]
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=row_groups, columns=wanted):
            yield parquet_records(batch, columns)


def parquet_records(table: Any, columns: Sequence[str]) -> list[bytes]:
    """The JSON text of the record of each row of a Parquet table (its RECORD_COLUMNS read),
    `columns` being all of the file's columns. A null is an absent key, as in the Hugging Face
    datasets layout, where a struct holds the union of every message's fields: a user message
    gets `tool_calls: null`. A row without messages becomes a record of the file's other columns
    (null), so that it is refused as `missing_messages` naming them."""
    n = table.num_rows
    names = table.schema.names
    messages = table["messages"].to_pylist() if "messages" in names else [None] * n
    tools = table["tools"].to_pylist() if "tools" in names else [None] * n
    others = {c: None for c in columns if c != "messages"}
    out = []
    for m, t in zip(messages, tools):
        if isinstance(m, str):
            m = _decoded(m)  # a `messages` column of JSON text: the list it spells
        record: dict = {"messages": _no_nulls(m)} if m is not None else dict(others)
        if t is not None:
            record["tools"] = _tools(t)
        out.append(json.dumps(record, ensure_ascii=False, default=_jsonable).encode("utf-8"))
    return out


def _no_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


def _tools(value: Any) -> Any:
    """A `tools` column holds a list of schemas, or (as many datasets store it) their JSON text."""
    return _decoded(value) if isinstance(value, str) else _no_nulls(value)


def _decoded(text: str) -> Any:
    """JSON text -> its value; text that is not JSON stays text, to be refused naming its column."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# ------------------------------------------------------------ files of a source spec


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: how records name it, where to open it, and what it is now."""

    display: str  # the path in `path:line` provenance: as the user wrote it (chatsft:// kept)
    location: str  # a local path, or a URI any pyarrow/fsspec filesystem opens
    local: bool  # on this machine's disk (read on the driver's node in a cluster)
    size: int
    mtime_ns: int
    format: str = "jsonl"  # "jsonl", "parquet", or "" for an extension no format has (refused)


def format_of(path: str, declared: str = "auto") -> str:
    """The file format of a path: the declared one, else by extension ("" when unknown)."""
    if declared and declared != "auto":
        return declared
    return EXTENSIONS.get(os.path.splitext(path)[1].lower(), "")


def expand_source(spec: str, declared: str = "auto") -> list[SourceFile]:
    """A path, glob, folder, `chatsft://` name or URI -> its files, sorted by name; a folder means
    its .jsonl and .parquet files. `declared`: the source's format key."""
    location = resolve_uri(spec)
    if storage.is_dir(location):
        found = sorted((f for ext in EXTENSIONS for f in storage.list_files(location, suffix=ext)),
                       key=lambda f: f.path)
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
        out.append(SourceFile(shown, f.path, storage.is_local(f.path), f.size, f.mtime_ns,
                              format_of(f.path, declared)))
    return out


def unknown_format(files: Sequence[SourceFile], key: str) -> Optional[str]:
    """The one-line error for files whose format no extension tells, or whose first bytes are not
    that format (every local file; the first of a bucket's, a request each), naming the config key."""
    unknown = [f.display for f in files if not f.format]
    if unknown:
        ext = os.path.splitext(unknown[0])[1] or "(none)"
        return (f"{key}.path: {unknown[0]!r} has extension {ext}, which is neither .jsonl nor .parquet; "
                f"rename it or set {key}.format: jsonl or parquet")
    for i, f in enumerate(files):
        if f.size and (f.local or i == 0):
            problem = _not_its_format(f, key)
            if problem:
                return f"{key}.path: {f.display} {problem}"
    return None


PARQUET_MAGIC = b"PAR1"
_OTHERS = {b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive", b"BZh": "bzip2-compressed",
           b"\x28\xb5\x2f\xfd": "zstd-compressed"}


def _not_its_format(f: SourceFile, key: str) -> Optional[str]:
    """What is wrong with a file whose first bytes are not its format's, or None."""
    with storage.open_stream(f.location) as fh:
        head = bytes(fh.read(4))
    if f.format == "parquet":
        if head == PARQUET_MAGIC:
            return None
        what = next((name for magic, name in _OTHERS.items() if head.startswith(magic)), None)
        if what is None and head[:1] in (b"{", b"["):
            return f"is read as Parquet but holds JSON lines; name it .jsonl or set {key}.format: jsonl"
        return f"is read as Parquet but is not a Parquet file ({what or f'it begins with {head!r}'})"
    if head == PARQUET_MAGIC:
        return f"is read as JSON lines but is a Parquet file; name it .parquet or set {key}.format: parquet"
    what = next((name for magic, name in _OTHERS.items() if head.startswith(magic)), None)
    if what:
        return f"is read as JSON lines but is {what}; decompress it first (chatsft reads plain JSON lines)"
    return None
