"""Elastic resume: a run checkpointed by 3 workers goes on with 2 from its latest checkpoint.

The invariant held: the rows of optimizer step s are a function of the stored rows, the seed and
s alone (chatsft.data.order), and a change of worker count keeps the checkpoint's rows per step
G (accumulation becomes G / (micro x workers)). So the resumed run trains steps 3-4 on exactly
the rows an uninterrupted run trains there, on 3 workers or on 2 (tests/unit/test_train_data.py
checks those rows), from the state a 2-worker run has at step 2 up to the order of float sums
(ZeRO-2's state goes through DeepSpeed's universal checkpoint to the new world size). Checked here: its
final weights equal an uninterrupted 2-worker run's (fp32, tight tolerance), and its final data
position (epoch, row) is the uninterrupted run's exactly.
"""

import os

import pytest

from chatsft.train.driver import Extras
from tests.faults import StopAt
from trainkit import Timer, rows_for, state_of, tiny_cfg, train_rows, weights

# eps well above the gradients' float noise: Adam's update is then smooth in the gradient, so
# 3 vs 2 workers' summation order stays at float noise in the weights
RUN = ["train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2", "train.lr=1e-3", "train.eps=1e-3",
       "train.schedule=constant", "train.deepspeed.stage=2", "scaling.max_failures=0",
       "scaling.resources_per_worker={CPU: 0.5}"]


@pytest.mark.slow
def test_three_workers_checkpoint_two_resume(tmp_path, local_ray):
    rows = rows_for(tiny_cfg(tmp_path), str(tmp_path), train_limit=40, eval_limit=0)
    with Timer():  # G = 2 x 3 x 2 = 12 rows per step
        straight = train_rows(tiny_cfg(tmp_path / "straight", *RUN, "scaling.num_workers=2",
                                       "train.grad_accum=3"), rows, local=False)
    elastic = tiny_cfg(tmp_path / "elastic", *RUN, "scaling.num_workers=3", "train.grad_accum=2")
    with Timer(), pytest.raises(Exception, match="stopped after step 2"):  # G = 2 x 2 x 3
        train_rows(elastic, rows, local=False, extras=Extras(hooks=[StopAt(2)], export=False))
    assert os.path.isdir(tmp_path / "elastic" / "out" / "t" / "checkpoint_000002")
    # restarted on 2 workers, the config otherwise unchanged (grad_accum=2 would make 8 rows a step)
    with Timer():
        resumed = train_rows(tiny_cfg(tmp_path / "elastic", *RUN, "scaling.num_workers=2", "train.grad_accum=2"),
                             rows, local=False)
    assert resumed.resume.step == 2 and resumed.resume.workers == (3, 2) and resumed.resume.accum == (2, 3)
    assert "on 2 workers (was 3); accumulation 2 -> 3, 12 rows per step" in resumed.resume.describe()
    assert resumed.metrics["step"] == straight.metrics["step"] == 4
    a, b = state_of(straight.checkpoint), state_of(resumed.checkpoint)
    assert (a["epoch"], a["position"]) == (b["epoch"], b["position"]) == (0, 48)
    wa, wb = weights(straight.model_dir), weights(resumed.model_dir)
    worst = max(((wa[k] - wb[k]).abs().max() / wa[k].abs().max()).item() for k in wa)
    print(f"3 -> 2 workers vs 2 throughout: worst relative weight difference {worst:.2e}")
    assert worst < 1e-5
    # each worker read its share of the rows, not all of them
    per = resumed.metrics["data_bytes_read"]
    assert len(per) == 2 and max(per) < resumed.metrics["data_bytes_total"]
