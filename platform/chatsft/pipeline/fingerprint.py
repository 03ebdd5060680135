"""When prepared rows are still fresh, and which cache entry holds them: a content fingerprint.

The fingerprint is a hash of everything that shapes the rows: every source
file's content (SHA-256 of its bytes, with its split and mixture weight, in
config order), the `data` keys that change rows or their reports, the model
keys that pick the tokenizer and the tokenizer itself (its full definition, so
a retrained tokenizer under the same name is noticed), run.seed, and the code
of the data pipeline. Names, sizes and modification times are not in it: a
touched file, or the same file under another spelling, has the same
fingerprint; one changed byte gives another.

It keys the row cache (`data.cache`, pipeline/cache.py), names the rows in
`<output_dir>/data/prepare.json` when there is no cache, and checkpoints keep
its payload (`identity`) so a resumed run can say which file changed.

Content hashes are computed where the files are: local files by a thread pool
in this process (hashlib releases the GIL, so the threads read and hash at the
disk's speed), object-store files by Ray tasks that stream them (the driver
reads nothing of them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from chatsft.sources import SourceFile

VERSION = 2  # 2: files by content hash (1: by name, size and modification time)
# Keys that change how the work is spread or where rows are kept, never what they are. (train.
# micro_batch_size, which pad_fraction in stats.json assumes, is left out too: stats.json names
# the one it used, and a sweep over it must not re-prepare the data in every trial.) The sources'
# paths are replaced by their files' content hashes.
_NOT_SHAPING = ("map_batch_size", "map_concurrency", "cache", "train", "eval")
HASH_BLOCK = 1 << 22  # bytes a hashing stream reads at a time
_HASH_THREADS = 8


def tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    for attr in ("chat_template", "pad_token", "eos_token", "bos_token", "unk_token", "padding_side"):
        h.update(f"\x1f{attr}={getattr(tokenizer, attr, None)!r}".encode())
    h.update(repr(sorted(getattr(tokenizer, "all_special_tokens", []) or [])).encode())
    return h.hexdigest()


def code_digest() -> str:
    """The code that shapes rows: chatsft.data, chatsft.pipeline (but cache.py, which only keeps
    them), chatsft.sources and the tokenizer loading of chatsft.model (not the rest of the model
    code: editing LoRA or export never marks prepared rows stale)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    shaping = [*(root / "data").glob("*.py"), *(root / "pipeline").glob("*.py"), root / "sources.py",
               root / "model" / "tokenizer.py"]
    for f in sorted(shaping):
        if f.name == "cache.py":
            continue
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def content_hash(location: str) -> str:
    """SHA-256 of a file's bytes, streamed (local path or URI)."""
    from chatsft import storage

    h = hashlib.sha256()
    with storage.open_stream(location) as fh:
        while True:
            chunk = fh.read(HASH_BLOCK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def content_hashes(files: Sequence[SourceFile], shared: bool = False) -> list[str]:
    """The content hash of each file: local ones (or all, when nothing is remote) hashed here by
    threads, remote ones by Ray tasks where Ray places them, one a file."""
    from concurrent.futures import ThreadPoolExecutor

    out: list[str] = [""] * len(files)
    local = [i for i, f in enumerate(files) if f.local]
    remote = [i for i, f in enumerate(files) if not f.local]
    if remote:
        import ray

        from chatsft.raysetup import ensure_ray

        ensure_ray()
        task = ray.remote(num_cpus=0)(content_hash)  # I/O bound: it must not wait for a CPU
        for i, h in zip(remote, ray.get([task.remote(files[i].location) for i in remote])):
            out[i] = h
    if local:
        with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(local))) as pool:
            for i, h in zip(local, pool.map(lambda i: content_hash(files[i].location), local)):
                out[i] = h
    return out


def rows_identity(cfg: Any, kind: str, files: Sequence[tuple[str, float, SourceFile]], hashes: Sequence[str],
                  tokenizer: Any) -> dict:
    """Everything that shapes the prepared rows, as plain data (checkpoints keep it too, so a
    resumed run can say what changed). `files`: (split, mixture weight, file) in config order;
    `hashes`: their content hashes. `names` is for messages only: it is not fingerprinted."""
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k not in _NOT_SHAPING}
    return {
        "version": VERSION,
        "seed": cfg.run.seed,
        "data": data,
        "model": {"name_or_path": cfg.model.name_or_path, "tokenizer": cfg.model.tokenizer,
                  "kind": kind, "trust_remote_code": cfg.model.trust_remote_code,
                  "revision": cfg.model.revision},
        "tokenizer": tokenizer_digest(tokenizer),
        "files": [[split, weight, f.format, h] for (split, weight, f), h in zip(files, hashes)],
        "names": [f.display for _, _, f in files],
        "code": code_digest(),
    }


def fingerprint(identity: dict) -> str:
    shaping = {k: v for k, v in identity.items() if k != "names"}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()
