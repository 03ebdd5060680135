"""The hang watchdog (train.stall_timeout_s): one rank stops making progress once; every rank's
stack reaches the run's storage and MLflow, the attempt fails naming that rank and its node,
Ray Train restarts it from the latest checkpoint, and the run ends with the same weights as
an uninterrupted one."""

import json

import pytest
import torch

from chatsft import storage
from chatsft.plan import RunPlan
from chatsft.train.driver import Extras, train_tracked
from tests.faults import HangOnce
from trainkit import Timer, rows_for, tiny_cfg, train_rows, weights

RUN = ["train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2", "scaling.num_workers=2",
       "scaling.max_failures=1", "train.stall_timeout_s=10"]


@pytest.mark.slow
def test_a_hung_rank_is_reported_and_the_run_restarts_to_the_same_weights(tmp_path, local_ray):
    cfg = tiny_cfg(tmp_path / "straight", *RUN)
    rows = rows_for(cfg, str(tmp_path), train_limit=24, eval_limit=4)
    with Timer():
        straight = train_rows(cfg, rows, local=False, extras=Extras(tasks=[]))  # the watchdog on, never firing
    assert straight.stalls == []

    marker = tmp_path / "hung-once"
    hung = tiny_cfg(tmp_path / "hung", *RUN, "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    with Timer():
        # rank 1 sleeps after step 3 (its 600 s would outlast the test); the latest checkpoint is step 2
        resumed = train_tracked(RunPlan.resolve(hung), rows, tracked=True,
                                extras=Extras(tasks=[], hooks=[HangOnce(3, marker, rank=1)]))
    assert marker.exists(), "rank 1 never hung"
    assert resumed.metrics["step"] == 4
    assert len(resumed.stalls) == 1, resumed.stalls
    reason = resumed.stalls[0]
    assert "\n" not in reason and reason.startswith("train.stall_timeout_s=10: no optimizer step finished in 10s")
    node_ids = resumed.metrics["node_ids"]  # one node here: the reason names it by host and id
    assert f"slowest: rank 1 on node " in reason and f"({node_ids[1][:8]})" in reason, reason
    assert "(last progress: the end of step 3; the other ranks got further)" in reason, reason

    # every rank's stack, in the run's storage: rank 1 is in the hook, rank 0 waits in step 4
    reports = storage.list_files(storage.join(RunPlan.resolve(hung).checkpoint_dir, "stalls"), recursive=True)
    names = sorted(storage.basename(f.path) for f in reports)
    assert names == ["rank0.json", "rank0.txt", "rank1.json", "rank1.txt", "reason.txt"], names
    stacks = {storage.basename(f.path): storage.read_text(f.path) for f in reports}
    assert "faults.py" in stacks["rank1.txt"] and "Current thread" in stacks["rank1.txt"]
    assert "faults.py" not in stacks["rank0.txt"] and "loop.py" in stacks["rank0.txt"]
    assert json.loads(stacks["rank0.json"])["what"] == "the start of step 4"

    # and in MLflow, with the reason as a tag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stall_reason"] == reason
    (attempt,) = client.list_artifacts(resumed.run_id, "stalls")
    logged = sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(resumed.run_id, attempt.path))
    assert logged == names

    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
