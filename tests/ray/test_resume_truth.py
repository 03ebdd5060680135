"""One resume truth: the checkpoint a run names (its log, result.json, MLflow) is the one every
worker loads, whichever of Ray Train or `--local` wrote it.

A Ray run, then a `--local` run, then a Ray run in one output folder: the third run names the
`--local` run's checkpoint, its Ray Train workers load that very one (they train only the steps
after it), and the three end with the weights of one uninterrupted run of the same steps."""

import json
import os

import pytest
import torch

from chatsft.train.driver import Extras
from tests.faults import StepLog
from trainkit import Timer, rows_for, tiny_cfg, train_rows, weights

RUN = ["train.save_every=2", "train.micro_batch_size=2", "train.grad_accum=2", "train.keep_checkpoints=2"]


@pytest.mark.slow
def test_ray_then_local_then_ray_is_one_run(tmp_path, local_ray):
    rows = rows_for(tiny_cfg(tmp_path / "straight", *RUN), str(tmp_path), train_limit=40, eval_limit=0)
    with Timer():
        straight = train_rows(tiny_cfg(tmp_path / "straight", *RUN, "train.max_steps=6"), rows, local=True)
    assert straight.metrics["step"] == 6

    def mixed(steps: int):
        return tiny_cfg(tmp_path / "mixed", *RUN, f"train.max_steps={steps}")

    with Timer():
        train_rows(mixed(2), rows, local=False)
        local = StepLog(tmp_path / "local.steps")
        train_rows(mixed(4), rows, local=True, extras=Extras(hooks=[local]))
        third = StepLog(tmp_path / "third.steps")
        last = train_rows(mixed(6), rows, local=False, extras=Extras(hooks=[third]))
    assert local.steps() == [3, 4]
    named = last.resume.checkpoint
    assert os.path.basename(named) == "checkpoint_000004", named
    result = json.loads((tmp_path / "mixed" / "out" / "result.json").read_text())
    assert result["resumed"]["checkpoint"] == named
    # the workers loaded checkpoint 4, the --local run's: they trained steps 5 and 6 only
    assert third.steps() == [5, 6], f"the Ray workers trained steps {third.steps()} after {named} was named"
    assert last.metrics["step"] == 6
    a, b = weights(straight.model_dir), weights(last.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
