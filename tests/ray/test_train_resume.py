"""A run killed after a checkpoint and restarted by Ray Train reaches the same final weights
as an uninterrupted run: weights, optimizer, schedule, data position and RNG all resume."""

import os

import pytest
import torch

from chatsft.train.driver import Extras
from tests.faults import ExitOnce
from trainkit import Timer, rows_for, tiny_cfg, train_rows, weights

RUN = ["train.max_steps=6", "train.save_every=2", "train.micro_batch_size=2", "train.grad_accum=2",
       "train.schedule=cosine", "train.warmup_steps=2", "scaling.max_failures=1", "train.keep_checkpoints=2"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, local_ray):
    cfg = tiny_cfg(tmp_path / "straight", *RUN)
    rows = rows_for(cfg, str(tmp_path), train_limit=40, eval_limit=8)
    with Timer():
        straight = train_rows(cfg, rows, local=True)
    assert straight.metrics["step"] == 6

    marker = tmp_path / "failed-once"
    with Timer():
        # the worker exits (os._exit) after step 3; the latest checkpoint is step 2
        resumed = train_rows(tiny_cfg(tmp_path / "killed", *RUN), rows, local=False,
                             extras=Extras(hooks=[ExitOnce(3, marker)]))
    assert marker.exists(), "the worker was never killed"
    assert resumed.metrics["step"] == 6
    assert os.path.basename(resumed.checkpoint) == "checkpoint_000006"
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], rel=1e-6)
    # and the two runs did learn something different from the start
    assert resumed.metrics["eval_loss"] < resumed.metrics["eval_loss_first"]
