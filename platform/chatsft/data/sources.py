"""Where records come from: `chatsft://` names the shipped samples; local files are read line by line."""

from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Union

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
    """Parse the JSONL files of a source spec in this process (inspect, eval, small fixtures):
    a Conversation or the BadRecord of each non-blank line, named as the pipeline names them."""
    files = expand_source(path)
    if not files:
        raise FileNotFoundError(2, "no such file", resolve_uri(path))
    n = 0
    for f in files:
        with open_stream(f.location, f.local) as fh:
            data = fh.read()
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


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith(SCHEME)


def expand_source(spec: str) -> list[SourceFile]:
    """A path, glob, folder, `chatsft://` name or URI -> its files, sorted by name."""
    if is_uri(spec):
        return _expand_uri(spec)
    out = []
    root = str(PACKAGE_ROOT) + os.sep
    for f in expand_local(spec):
        if not os.path.isfile(f):
            continue
        st = os.stat(f)
        shown = SCHEME + f[len(root):] if spec.startswith(SCHEME) and f.startswith(root) else f
        # Opened by workers whose working directory is not the caller's: an absolute location.
        out.append(SourceFile(shown, os.path.abspath(f), True, st.st_size, st.st_mtime_ns))
    return out


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for any URI pyarrow knows, else through fsspec."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, TypeError, OSError) as first:  # pyarrow.ArrowInvalid is a ValueError
        try:
            import fsspec
        except ImportError:
            raise first from None
        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _expand_uri(uri: str) -> list[SourceFile]:
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0]
    fs, path = filesystem(uri)

    def shown(p: str) -> str:
        return f"{scheme}://{p}" if scheme != "file" else f"file://{p}"

    def entry(info) -> SourceFile:
        return SourceFile(shown(info.path), shown(info.path), scheme == "file", info.size or 0,
                          info.mtime_ns or 0)

    if any(ch in path for ch in "*?["):
        cut = min(path.index(ch) for ch in "*?[" if ch in path)
        base = path[:cut].rsplit("/", 1)[0] if "/" in path[:cut] else ""
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return [entry(i) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        return [entry(i) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File and i.path.endswith(".jsonl")]
    if info.type == pafs.FileType.File:
        return [entry(info)]
    return []


def open_stream(location: str, local: bool) -> BinaryIO:
    """A binary stream over one file (local path or URI)."""
    if local and not is_uri(location):
        return open(location, "rb")
    fs, path = filesystem(location)
    return fs.open_input_stream(path)


def iter_stream_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of each non-blank line of a byte stream read in chunks.

    The same lines as `conversation.iter_lines` on the whole file (a leading BOM
    and CRLF endings tolerated, blank lines skipped but counted), without holding
    the file in memory.
    """
    bom = b"\xef\xbb\xbf"
    n = 0
    carry = b""
    head = True  # the BOM check waits until the first 3 bytes are in
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        if head:
            if len(data) < 3:
                carry = data
                continue
            if data.startswith(bom):
                data = data[3:]
            head = False
        lines = data.split(b"\n")
        carry = lines.pop()
        for raw in lines:
            n += 1
            raw = raw.rstrip(b"\r")
            if raw.strip():
                yield n, raw
    # End of stream: a file shorter than a BOM was never split; the last line has no newline.
    for raw in carry.split(b"\n"):
        n += 1
        raw = raw.rstrip(b"\r")
        if raw.strip():
            yield n, raw


def read_chunks(stream: BinaryIO, size: int = 1 << 22) -> Iterator[bytes]:
    while True:
        chunk = stream.read(size)
        if not chunk:
            return
        yield bytes(chunk)
