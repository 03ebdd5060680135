"""Helpers of the training tests: a small config, rows written here, weights read back."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from chatsft.config import load_config
from chatsft.train.driver import Rows, write_rows
from chatsft.train.data import count_rows


def tiny_cfg(tmp, *overrides: str):
    """The tiny Llama on short sessions; every override is `section.key=value`."""
    base = [
        f"run.output_dir={tmp}/out", "run.name=t", "run.seed=0",
        "model.name_or_path=builtin:tiny-llama", "data.max_length=128",
        "train.epochs=1", "train.micro_batch_size=4", "train.grad_accum=1", "train.lr=3e-3",
        "train.schedule=constant", "train.precision=fp32", "train.log_every=1",
        "train.deepspeed.stage=2", "scaling.num_workers=1", "tracking.enabled=false",
    ]
    return load_config(None, base + list(overrides))


def rows_for(cfg, tmp, *, train_limit: int = 64, eval_limit: int = 16, name: str = "rows") -> Rows:
    """Render the sample data into Parquet rows (what `prepare` writes), in this process."""
    from chatsft.model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    train_dir, eval_dir = os.path.join(tmp, name, "train"), os.path.join(tmp, name, "eval")
    write_rows(cfg, ["chatsft://samples/train.jsonl"], tok, train_dir, limit=train_limit)
    eval_rows = 0
    if eval_limit:
        write_rows(cfg, ["chatsft://samples/heldout.jsonl"], tok, eval_dir, limit=eval_limit)
        eval_rows = count_rows(eval_dir)
    return Rows(train_dir, eval_dir if eval_limit else None, count_rows(train_dir), eval_rows)


def weights(folder: str) -> dict[str, Any]:
    """The tensors of an exported Hugging Face folder."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    assert out, f"no weights in {folder}"
    return out


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        print(f"\n[timing] {self.seconds:.1f}s")
