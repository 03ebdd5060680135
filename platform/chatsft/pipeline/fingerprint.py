"""When prepared rows are still fresh: a fingerprint of everything that shapes them.

Stored in `<output_dir>/data/prepare.json` after a successful prepare; the
training driver calls `prepare(cfg)` before every run and reuses the rows when
the fingerprint matches. It covers the `data` keys that change rows or their
reports, the model keys that pick the tokenizer, the tokenizer itself (its full
definition, so a retrained tokenizer under the same name is noticed), every
source file's name, size and modification time, run.seed, and the code of the
data pipeline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from chatsft.sources import SourceFile

VERSION = 1
# Keys that change how the work is spread, never what it produces. (train.micro_batch_size,
# which pad_fraction in stats.json assumes, is left out too: stats.json names the one it used,
# and a sweep over it must not re-prepare the data in every trial.)
_NOT_SHAPING = ("map_batch_size", "map_concurrency")


def tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    for attr in ("chat_template", "pad_token", "eos_token", "bos_token", "unk_token", "padding_side"):
        h.update(f"\x1f{attr}={getattr(tokenizer, attr, None)!r}".encode())
    h.update(repr(sorted(getattr(tokenizer, "all_special_tokens", []) or [])).encode())
    return h.hexdigest()


def code_digest() -> str:
    """The code that shapes rows: chatsft.data, chatsft.pipeline, chatsft.sources and the
    tokenizer loading of chatsft.model (not the rest of the model code: editing LoRA or
    export never marks prepared rows stale)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    shaping = [*(root / "data").glob("*.py"), *(root / "pipeline").glob("*.py"), root / "sources.py",
               root / "model" / "tokenizer.py"]
    for f in sorted(shaping):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def rows_identity(cfg: Any, kind: str, files: Sequence[tuple[str, SourceFile]], tokenizer: Any) -> dict:
    """Everything that shapes the prepared rows, as plain data (checkpoints keep it too, so a
    resumed run can say what changed)."""
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k not in _NOT_SHAPING}
    return {
        "version": VERSION,
        "seed": cfg.run.seed,
        "data": data,
        "model": {"name_or_path": cfg.model.name_or_path, "tokenizer": cfg.model.tokenizer,
                  "kind": kind, "trust_remote_code": cfg.model.trust_remote_code,
                  "revision": cfg.model.revision},
        "tokenizer": tokenizer_digest(tokenizer),
        "files": [[split, f.display, f.size, f.mtime_ns] for split, f in files],
        "code": code_digest(),
    }


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
