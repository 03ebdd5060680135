"""Helpers of the training tests: a small config, rows written here, weights read back."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from chatsft.config import Config, load_config
from chatsft.plan import RunPlan
from chatsft.train.data import count_rows, parquet_files
from chatsft.train.driver import Extras, Rows, TrainResult, train_on_rows


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


def train_rows(cfg: Config, rows: Rows, *, local: bool, extras: Optional[Extras] = None) -> TrainResult:
    """Train on rows written by the test (the driver's train() prepares its own)."""
    return train_on_rows(RunPlan.resolve(cfg, local=local), rows, extras)


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


def state_of(checkpoint: str) -> dict[str, Any]:
    """The loop state a checkpoint folder holds: step, epoch, position (rows), world_size."""
    import json

    with open(os.path.join(checkpoint, "train_state_rank0.json")) as f:
        return json.load(f)["state"]


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        print(f"\n[timing] {self.seconds:.1f}s")


def write_rows(cfg: Config, paths: list[str], tokenizer: Any, out_dir: str, *, seed: int = 0,
               limit: Optional[int] = None) -> int:
    """Render JSONL sources into Parquet rows in this process (shuffled, packed greedily when
    data.packing): small fixtures for training tests, without a Ray Data pipeline."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatsft.data.conversation import BadRecord
    from chatsft.data.render import RenderOptions
    from chatsft.sources import read_local

    opts = RenderOptions.from_config(cfg.data)
    plan = RunPlan.resolve(cfg)
    fmt = plan.kind.format(cfg.data.template, tokenizer, cfg.data.think)
    samples = []
    for path in paths:
        for conv in read_local(path, limit=limit):
            if isinstance(conv, BadRecord):
                raise conv
            (result,) = fmt.render([conv], opts)
            if isinstance(result, BadRecord):
                raise result
            samples += result.samples
    order = np.random.default_rng(seed).permutation(len(samples))
    samples = [samples[i] for i in order]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "source": []}
    if cfg.data.packing and plan.kind.decoder_only:
        rows["position_ids"] = []
        cur: list = []
        for s in samples + [None]:
            if s is None or (cur and sum(len(c) for c in cur) + len(s) > cfg.data.max_length):
                if cur:
                    rows["input_ids"].append(np.concatenate([c.input_ids for c in cur]))
                    rows["labels"].append(np.concatenate([c.labels for c in cur]))
                    rows["position_ids"].append(np.concatenate([np.arange(len(c), dtype=np.int32) for c in cur]))
                    rows["source"].append([c.source for c in cur])
                cur = []
            if s is not None:
                cur.append(s)
    else:
        for s in samples:
            rows["input_ids"].append(s.input_ids)
            rows["labels"].append(s.labels)
            rows["source"].append([s.source])
    os.makedirs(out_dir, exist_ok=True)
    for old in parquet_files(out_dir):
        os.remove(old)
    table = pa.table({
        k: pa.array([list(map(int, v)) for v in vals], type=pa.list_(pa.int32())) if k != "source"
        else pa.array(vals, type=pa.list_(pa.string()))
        for k, vals in rows.items()})
    # small row groups: workers read theirs (train/data.py), as they do from prepared rows
    pq.write_table(table, os.path.join(out_dir, "part-00000.parquet"), row_group_size=8)
    return table.num_rows
