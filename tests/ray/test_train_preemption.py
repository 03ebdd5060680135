"""A spot interruption: a worker node is drained with a 30 s deadline in mid-run (`ray drain-node
--reason DRAIN_NODE_REASON_PREEMPTION`, the GCS DrainNode call Ray's autoscaler makes for a
preemption). Every rank checkpoints at the next step boundary and stops before the deadline;
the test then takes the node away (as the cloud does at the deadline), and Ray Train restarts
the group from that checkpoint on the node left (scaling.min_workers=1).

The cluster is `ray.cluster_utils.Cluster`: a head with no CPUs and two 1-CPU worker nodes, one
rank on each. Every rank sleeps 0.3 s after each step (tests/faults.py Pace, even: the straggler
meter must name nobody), so the drain lands in mid-run.

Checked: the checkpoint of the step the notice was agreed at was whole before the deadline; the
second attempt trained from the next step (no step redone); the final weights equal a run
resumed from a copy of that checkpoint without interruption (--local, 1 worker as the resumed
group); the preemption (step, seconds to spare) is in result.json's goodput, which counts two
attempts; no rank was named a straggler."""

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from chatsft.train import checkpoint as ckpt
from chatsft.train.driver import Extras
from tests.faults import Pace, StepLog
from trainkit import Timer, rows_for, state_of, tiny_cfg, train_rows, weights

RUN = ["train.max_steps=12", "train.save_every=0", "train.micro_batch_size=2", "train.deepspeed.stage=2",
       "train.keep_checkpoints=0", "train.threads=1", "run.shared_storage=true", "train.lr=1e-3",
       "scaling.num_workers=2", "scaling.min_workers=1", "train.grad_accum=1", "scaling.max_failures=2",
       "train.preemption_grace_s=20"]


def wait_for(what, value, timeout, run):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = value()
        if got:
            return got
        if run.done():
            run.result()
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _preempted(run_dir) -> bool:
    return any("preempted" in json.loads(p.read_text()) for p in run_dir.glob("goodput/*/attempt-*.json"))


@pytest.mark.slow
def test_a_drained_node_becomes_a_checkpoint_and_the_run_goes_on(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # a restarted group's first try may still count the lost node: fail it fast, not in 60 s
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    rows = rows_for(tiny_cfg(tmp_path), str(tmp_path), train_limit=64, eval_limit=0)
    cfg = tiny_cfg(tmp_path / "spot", *RUN)
    run_dir = tmp_path / "spot" / "out" / "t"
    where = tmp_path / "where"
    where.mkdir()
    steps = StepLog(tmp_path / "steps.txt")
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {}
    for i in range(2):
        n = cluster.add_node(num_cpus=1)
        nodes[n.node_id] = n
    cluster.wait_for_nodes()
    pool = ThreadPoolExecutor(1)
    try:
        ray.init(address=cluster.address)
        with Timer():
            run = pool.submit(train_rows, cfg, rows, local=False, extras=Extras(hooks=[Pace(0.3, where), steps]))
            wait_for("step 3", lambda: len(steps.steps()) >= 3, 180, run)
            drained = json.loads((where / "rank1.json").read_text())["node_id"]
            assert drained in nodes and json.loads((where / "rank0.json").read_text())["node_id"] != drained
            asked = time.time()
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node",
                            "--address", cluster.address, "--node-id", drained,
                            "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot interruption (test)",
                            "--deadline-remaining-seconds", "30"], check=True, capture_output=True)
            saved = wait_for("the preemption checkpoint", lambda: ckpt.latest(str(run_dir)), 30, run)
            whole_at = os.path.getmtime(os.path.join(saved, "train_state_rank0.json"))
            assert whole_at < asked + 30, (whole_at - asked)
            print(f"checkpoint whole {whole_at - asked:.1f}s after the drain was asked (deadline 30 s)")
            # the attempt stopped (rank 0 recorded the preemption in its ledger): the cloud may take the node
            wait_for("the attempt to stop", lambda: _preempted(run_dir), asked + 30 - time.time(), run)
            cluster.remove_node(nodes[drained])
            result = run.result(timeout=300)
    finally:
        ray.shutdown()
        cluster.shutdown()
        pool.shutdown(wait=False)

    k = state_of(saved)["step"]
    ran = steps.steps()
    assert 3 <= k < 12 and result.metrics["step"] == 12
    assert ran == list(range(1, k + 1)) + list(range(k + 1, 13)), ran  # resumed at k + 1: nothing redone
    assert result.metrics["resumed_from"].rstrip("/").endswith(os.path.basename(saved))
    assert result.metrics["node_ids"] == [n for n in nodes if n != drained]  # on the node left, alone
    g = json.loads((tmp_path / "spot" / "out" / "result.json").read_text())["goodput"]
    assert g["attempts"] == 2 and g["steps_redone"] == 0, g
    (p,) = g["preemptions"]
    assert p["step"] == k and p["node_id"] == drained and 0 < p["spare_s"] < 30 and "preemption" in p["reason"], p
    assert g["seconds"]["restart"] > 0 and "stragglers" not in result.metrics
    print(g["line"])

    # the same run resumed from a copy of that checkpoint, uninterrupted, on one worker
    again = tmp_path / "again"
    shutil.copytree(saved, again / "out" / "t" / os.path.basename(saved))
    straight = train_rows(tiny_cfg(again, *RUN), rows, local=True)
    assert straight.resume.step == k and straight.metrics["step"] == 12
    wa, wb = weights(result.model_dir), weights(straight.model_dir)
    worst = max(((wa[n] - wb[n]).abs().max() / wa[n].abs().max()).item() for n in wa)
    print(f"preempted and resumed vs uninterrupted from step {k}: worst relative weight difference {worst:.2e}")
    assert worst < 1e-6
