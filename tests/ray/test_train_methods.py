"""Local-mode training runs (the same per-worker function, no Ray): seq2seq, LoRA, steps with
no supervised token, non-finite steps skipped and counted, `chatsft export` from a checkpoint."""

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import chatsft.model.loss as loss_module
from chatsft.plan import RunPlan
from chatsft.train.driver import Extras, Rows
from chatsft.train.export import export_cli
from trainkit import Timer, rows_for, tiny_cfg, train_rows, weights


@pytest.mark.slow
def test_t5_trains_on_seq2seq_rows(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.name_or_path=builtin:tiny-t5", "data.organization=split_turn",
                   "train.max_steps=10", "train.micro_batch_size=8", "train.lr=3e-3", "train.log_every=5")
    rows = rows_for(cfg, str(tmp_path), train_limit=40, eval_limit=10)
    with Timer():
        m = train_rows(cfg, rows, local=True).metrics
    assert m["eval_loss"] < m["eval_loss_first"] - 0.5, m


@pytest.mark.slow
def test_lora_trains_and_exports_merged(tmp_path, tiny_llama_dir):
    cfg = tiny_cfg(tmp_path, "method.name=lora", "method.lora.r=8", "train.max_steps=8", "train.lr=1e-2",
                   "train.micro_batch_size=8", "train.log_every=4")
    rows = rows_for(cfg, str(tmp_path), train_limit=64, eval_limit=16)
    with Timer():
        result = train_rows(cfg, rows, local=True)
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_first"] - 0.2, m
    merged, base = weights(result.model_dir), weights(tiny_llama_dir)
    assert not any("lora" in k for k in merged)  # merged into the weights
    assert any(not torch.equal(merged[k], base[k]) for k in base if k in merged)


def _write(folder, rows):
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({
        "input_ids": pa.array([r[0] for r in rows], type=pa.list_(pa.int32())),
        "labels": pa.array([r[1] for r in rows], type=pa.list_(pa.int32())),
        "source": pa.array([["t:%d" % i] for i in range(len(rows))], type=pa.list_(pa.string())),
    }), os.path.join(folder, "part-00000.parquet"))


@pytest.mark.slow
def test_steps_without_supervised_tokens_are_skipped_cleanly(tmp_path, tiny_llama_dir):
    ids = list(range(10, 30))
    unsupervised = [(ids, [-100] * len(ids))] * 7
    supervised = [(ids, [-100] * 10 + ids[10:])]
    _write(tmp_path / "rows", unsupervised + supervised)
    rows = Rows(str(tmp_path / "rows"), None, 8, 0)
    # 4 steps of 2 rows (micro 1 x accum 2): one step holds the supervised row
    cfg = tiny_cfg(tmp_path, "train.micro_batch_size=1", "train.grad_accum=2", "train.log_every=1")
    seen = []
    result = train_rows(cfg, rows, local=True, extras=Extras(callbacks=[lambda step, m: seen.append(m)]))
    assert result.metrics["step"] == 4
    assert result.metrics["empty_steps"] == 3 and result.metrics["skipped_steps"] == 0
    for m in seen:
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values()), m
    assert sum("train_loss" in m for m in seen) == 1
    after, before = weights(result.model_dir), weights(tiny_llama_dir)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed.stage=2", "deepspeed.stage=0", "engine=ddp"])
def test_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, engine):
    real = loss_module.learned_cross_entropy  # the default loss head's (train.loss_head=learned)
    calls = {"n": 0}

    def poisoned(*args):
        total = real(*args)
        calls["n"] += 1
        return total * float("nan") if calls["n"] == 3 else total

    monkeypatch.setattr(loss_module, "learned_cross_entropy", poisoned)
    cfg = tiny_cfg(tmp_path, f"train.{engine}", "train.max_steps=4", "train.micro_batch_size=2",
                   "train.grad_accum=2")  # call 3 = step 2's first micro-batch
    rows = rows_for(cfg, str(tmp_path), train_limit=16, eval_limit=0)
    result = train_rows(cfg, rows, local=True)
    assert result.metrics["skipped_steps"] == 1, result.metrics
    assert all(torch.isfinite(t).all() for t in weights(result.model_dir).values())


@pytest.mark.slow
def test_export_cli_rebuilds_the_model_from_the_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.max_steps=3")
    rows = rows_for(cfg, str(tmp_path), train_limit=16, eval_limit=0)
    result = train_rows(cfg, rows, local=True)
    out = export_cli(RunPlan.resolve(cfg, local=True), out=str(tmp_path / "exported"))
    a, b = weights(result.model_dir), weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
