"""Where prepared data goes: a local folder or any pyarrow/fsspec URI, and the files beside the rows."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from chatsft.data.sources import filesystem, is_uri


@dataclass(frozen=True)
class Location:
    """A folder: `path` as the user sees it (local path or URI)."""

    path: str

    @property
    def local(self) -> bool:
        return not is_uri(self.path) or self.path.startswith("file://")

    def join(self, *parts: str) -> "Location":
        if is_uri(self.path):
            return Location("/".join([self.path.rstrip("/"), *parts]))
        return Location(os.path.join(self.path, *parts))

    def _fs(self):
        if is_uri(self.path):
            return filesystem(self.path)
        return None, os.path.abspath(self.path)

    def read_text(self) -> Optional[str]:
        fs, p = self._fs()
        try:
            if fs is None:
                with open(p, encoding="utf-8") as f:
                    return f.read()
            with fs.open_input_stream(p) as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def write_text(self, text: str) -> None:
        fs, p = self._fs()
        if fs is None:
            os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
            tmp = f"{p}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, p)  # readers never see half a file
            return
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(text.encode("utf-8"))

    def remove(self) -> None:
        """Delete this file or folder if it exists."""
        fs, p = self._fs()
        if fs is None:
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
            return
        import pyarrow.fs as pafs

        info = fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            fs.delete_file(p)

    def make_dirs(self) -> None:
        fs, p = self._fs()
        if fs is None:
            os.makedirs(p, exist_ok=True)
        else:
            fs.create_dir(p, recursive=True)

    def write_parquet(self, table: pa.Table) -> None:
        fs, p = self._fs()
        if fs is None:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, p)
            return
        pq.write_table(table, p, filesystem=fs)

