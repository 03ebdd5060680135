"""Every path or URI chatsft reads or writes goes through here: local folders, s3://, gs://, ...

One choice, used everywhere: pyarrow filesystems (what Ray Data and Ray Train use
for their own storage), with fsspec behind pyarrow's interface for the schemes
pyarrow does not know (az://, hf://, memory://, ...). A location is a plain
string: a local path (made absolute before it travels to a process whose working
directory is another) or a URI; `file://` URIs are local.

Writes are atomic where the store allows it: a local file is written beside its
target and renamed; an object store replaces an object in one PUT, so a reader
never sees half a file either way. A folder is published by writing it under a
temporary name and renaming it (local), or by copying its files and then writing
the marker file last (object stores have no folder rename): readers look for the
marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import IO, Any, Iterator, Optional

SCHEME_SEP = "://"
_GLOB = "*?["


def is_uri(path: str) -> bool:
    """A URI with a scheme (s3://, gs://, file://, ...), as opposed to a plain local path."""
    return SCHEME_SEP in path


def is_local(path: str) -> bool:
    """On this machine's disk: a plain path or a file:// URI."""
    return not is_uri(path) or path.startswith("file://")


def absolute(path: str) -> str:
    """A local path made absolute (workers run in another directory); URIs unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def relative(base: str, path: str) -> str:
    """`path` inside folder `base`, as a relative name with `/` (either may be a URI)."""
    b, p = base.rstrip("/"), path
    if not is_uri(base):
        return os.path.relpath(p, b).replace(os.sep, "/")
    if not p.startswith(b + "/"):
        raise ValueError(f"{path} is not inside {base}")
    return p[len(b) + 1:]


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(os.path.normpath(path))


def filesystem(path: str):
    """(pyarrow FileSystem, path inside it). Local paths get the local filesystem."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (ValueError, TypeError, OSError) as first:  # pyarrow.ArrowInvalid is a ValueError
        try:
            import fsspec
        except ImportError:
            raise first from None
        fs, inner = fsspec.core.url_to_fs(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def outer(path: str, inner: str) -> str:
    """The location of `inner` (a path inside the filesystem of `path`) in `path`'s own terms."""
    if not is_uri(path):
        return inner
    scheme = path.split(SCHEME_SEP, 1)[0]
    return f"{scheme}{SCHEME_SEP}{inner.lstrip('/') if scheme != 'file' else inner}"


# ---------------------------------------------------------------------- reading


PROBE_TIMEOUT_S = 15.0  # an object store that has not answered one look-up by then is not answering


def probe(path: str, timeout_s: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the store behind URI `path` answers a look-up of it (found or not) within
    `timeout_s`; else why not, in one line (no credentials, an endpoint that refuses or does not
    answer, access denied). Local paths are not probed. A store's client retries for minutes
    before it gives up, and holds the process until it has: the look-up runs in a child process,
    ended at the deadline."""
    import subprocess
    import sys

    if is_local(path):
        return None
    scheme = path.split(SCHEME_SEP, 1)[0]
    hint = {"s3": "; check the endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID and "
                  "AWS_SECRET_ACCESS_KEY, a profile or an instance role)",
            "gs": "; check the credentials (GOOGLE_APPLICATION_CREDENTIALS or the node's service account)"}.get(scheme, "")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return f"the object store did not answer within {timeout_s:g} s{hint}"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    text = " ".join((lines[-1] if lines else f"exit code {done.returncode}").split())
    return f"the object store cannot be read: {text[:300]}{hint}"


_PROBE = "import sys\nfrom chatsft import storage\nstorage.exists(sys.argv[1])\n"


@dataclass(frozen=True)
class FileInfo:
    path: str  # in the caller's terms (URI stays URI)
    size: int
    mtime_ns: int


def _type(path: str):
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(path) != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(path) == pafs.FileType.Directory


def is_file(path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(path) == pafs.FileType.File


def info(path: str) -> Optional[FileInfo]:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    i = fs.get_file_info(inner)
    if i.type != pafs.FileType.File:
        return None
    return FileInfo(path, i.size or 0, i.mtime_ns or 0)


def list_files(folder: str, *, suffix: str = "", recursive: bool = False) -> list[FileInfo]:
    """Files in `folder` (optionally below it) whose names end with `suffix`, sorted by path.
    A folder that does not exist has no files."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(folder)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    return [FileInfo(outer(folder, i.path), i.size or 0, i.mtime_ns or 0)
            for i in sorted(found, key=lambda i: i.path)
            if i.type == pafs.FileType.File and i.path.endswith(suffix)]


def list_dirs(folder: str) -> list[str]:
    """The folders directly inside `folder`, sorted."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(folder)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    return [outer(folder, i.path) for i in sorted(found, key=lambda i: i.path)
            if i.type == pafs.FileType.Directory]


def glob(pattern: str) -> list[FileInfo]:
    """Files matching a glob, sorted by path, as `glob.glob(recursive=True)` matches them:
    `*` and `?` stay inside one folder, `**` crosses folders, `[...]` is a class. A file whose
    very name is `pattern` (`chats[1].jsonl`) is that file: the literal name wins over the glob."""
    import pyarrow.fs as pafs

    found = info(pattern)
    if found or not any(ch in pattern for ch in _GLOB):
        return [found] if found else []
    fs, inner = filesystem(pattern)
    cut = min(inner.index(ch) for ch in _GLOB if ch in inner)
    base = inner[:inner.rfind("/", 0, cut)] or "/"
    regex = _glob_regex(inner)
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return [FileInfo(outer(pattern, i.path), i.size or 0, i.mtime_ns or 0)
            for i in sorted(found, key=lambda i: i.path)
            if i.type == pafs.FileType.File and regex.fullmatch(i.path)]


def _glob_regex(pattern: str) -> "re.Pattern[str]":
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def open_input(path: str) -> IO[bytes]:
    """A random-access binary file (Parquet reads footers first)."""
    if not is_uri(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return fs.open_input_file(inner)


def open_stream(path: str) -> IO[bytes]:
    """A sequential binary stream (JSONL is read front to back)."""
    if not is_uri(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return fs.open_input_stream(inner)


def read_bytes(path: str) -> Optional[bytes]:
    try:
        with open_stream(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        if not exists(path):
            return None
        raise


def read_text(path: str) -> Optional[str]:
    """The file's text, or None when it does not exist."""
    data = read_bytes(path)
    return None if data is None else bytes(data).decode("utf-8")


def read_json(path: str) -> Optional[Any]:
    """The file's JSON, or None when it does not exist or is not JSON (a write cut off)."""
    text = read_text(path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def read_parquet(path: str, columns: Optional[list[str]] = None):
    import pyarrow.parquet as pq

    with open_input(path) as f:
        return pq.read_table(f, columns=columns)


def parquet_file(path: str):
    """A pyarrow ParquetFile (metadata, row groups, batches) over a local file or URI."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(open_input(path))


# ---------------------------------------------------------------------- writing


def make_dirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


def write_bytes(path: str, data: bytes) -> None:
    """Atomic: readers see the old file or the new one, never half of it."""
    if not is_uri(path):
        path = absolute(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, inner = filesystem(path)
    parent = inner.rsplit("/", 1)[0]
    if parent and parent != inner:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as f:  # one PUT on object stores
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_parquet(path: str, table, row_group_rows: Optional[int] = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows)
    write_bytes(path, sink.getvalue().to_pybytes())


def remove(path: str) -> None:
    """Delete this file or folder (with everything in it) if it exists."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, inner = filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pafs.FileType.File:
        fs.delete_file(inner)


def move(src: str, dst: str) -> None:
    """Move a file or folder (a rename on local disks; copy, then delete, on object stores)."""
    if not is_uri(src) and not is_uri(dst):
        os.makedirs(os.path.dirname(absolute(dst)), exist_ok=True)
        shutil.move(src, dst)
        return
    if is_dir(src):
        copy_tree(src, dst)
    else:
        write_bytes(dst, read_bytes(src) or b"")
    remove(src)


def copy_tree(src: str, dst: str) -> None:
    """Copy the files of folder `src` into folder `dst` (either may be local or a URI)."""
    import pyarrow.fs as pafs

    if not is_uri(src) and not is_uri(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    make_dirs(dst)
    sfs, sinner = filesystem(src)
    dfs, dinner = filesystem(dst)
    pafs.copy_files(sinner, dinner, source_filesystem=sfs, destination_filesystem=dfs)


def publish_dir(local_src: str, dst: str) -> None:
    """Put the finished local folder `local_src` at `dst`, replacing what was there (see staged_dir)."""
    with staged_dir(dst) as staging:
        copy_tree(local_src, staging)


@contextlib.contextmanager
def staged_dir(dst: str) -> Iterator[str]:
    """A local folder to write into; when the `with` ends without an error it replaces `dst`.

    Local: the folder is made beside `dst` and renamed over it, so `dst` is always
    whole and big files are never copied. Object stores have no rename: the old
    files are deleted and the new ones uploaded; writers of such folders that
    readers poll write a marker file last (checkpoints: the rank-0 state)."""
    if is_uri(dst):
        with scratch("chatsft-stage-") as staging:
            yield staging
            remove(dst)
            copy_tree(staging, dst)
        return
    dst = absolute(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}-", dir=parent)
    try:
        yield staging
        if os.path.lexists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}-old-", dir=parent)
            os.rename(dst, os.path.join(old, "x"))
            os.rename(staging, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def scratch(prefix: str = "chatsft-") -> Iterator[str]:
    """A temporary local folder, removed afterwards whatever happens."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
