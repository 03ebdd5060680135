"""Elastic training under Ray's autoscaler: a run whose workers do not fit the head starts when
the autoscaler adds nodes, and goes on from its latest checkpoint when a worker node is removed.

The cluster is Ray's fake multi-node provider (tests/clusterkit.py `Autoscaling`, the config of
`ray.cluster_utils.AutoscalingCluster`): a head with 0 CPUs and up to two 1-CPU worker nodes,
started by the autoscaler when the run's Ray Train controller asks for resources. The run wants
2 workers and goes on with 1 (scaling.min_workers=1). Every rank parks after step 3 (the latest
checkpoint is step 2); the test shuts rank 1's node down as the provider's terminate_node does
(SIGTERM to its raylet), and the autoscaler does not replace it (its slot stays taken, as when
the cloud has no capacity: `replace_lost=False`), so the outcome does not hang on a race with a
replacement. Ray Train restarts the group from checkpoint 2 with the one worker left (its first
try may still count the lost node and time out: RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 20 s here).

Checked: the nodes came with the run (the head alone before it; both ranks on nodes the
autoscaler added); the run resumed at step 2 on the remaining node alone and reached step 6;
each checkpoint's data position is steps x rows per step (4) exactly, with the world size that
wrote it, and each is whole (every file its rank-0 state lists). That a resume at another worker count
ends with an uninterrupted run's weights is test_train_elastic.py's (not repeated here: a
second run would double this test's time).
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from chatsft.errors import UserError
from chatsft.plan import RunPlan
from chatsft.train.driver import Extras, check_storage
from tests.clusterkit import Autoscaling
from chatsft.train import checkpoint as ckpt
from tests.faults import ParkOnce
from trainkit import Timer, rows_for, state_of, tiny_cfg, train_rows

# 2 workers x micro 2 x accumulation 1 = 4 rows per step; on 1 worker accumulation becomes 2.
RUN = ["train.max_steps=6", "train.save_every=2", "train.micro_batch_size=2", "train.deepspeed.stage=2",
       "train.keep_checkpoints=0", "run.shared_storage=true"]
ELASTIC = ["scaling.num_workers=2", "scaling.min_workers=1", "train.grad_accum=1", "scaling.max_failures=2"]


def wait_for(what, value, timeout, run=None):
    """Poll `value()` until it is truthy; fail naming `what` at the deadline, or at once if the
    run ended meanwhile (its error shown)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = value()
        if got:
            return got
        if run is not None and run.done():
            run.result()  # raises the run's error
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Clock:
    """Seconds since the cluster started, printed at each milestone: where this test's time goes."""

    def __init__(self):
        self.t0 = time.time()

    def __call__(self, what):
        print(f"[autoscale +{time.time() - self.t0:.1f}s] {what}", flush=True)


def parked(folder, ranks=2):
    found = sorted(p for p in os.listdir(folder) if p.startswith("parked-rank"))
    if len(found) < ranks:
        return None
    return [json.loads((folder / name).read_text()) for name in found]


@pytest.mark.slow
def test_autoscaled_run_loses_a_node_and_goes_on(tmp_path):
    rows = rows_for(tiny_cfg(tmp_path), str(tmp_path), train_limit=40, eval_limit=0)

    park = tmp_path / "park"
    park.mkdir()
    cfg = tiny_cfg(tmp_path / "elastic", *RUN, *ELASTIC)
    ray.shutdown()  # prepare in an earlier test may have left a Ray running
    clock = Clock()
    cluster = Autoscaling(tmp_path / "cluster", head_cpus=0, worker_cpus=1, max_workers=2,
                           replace_lost=False).start()
    pool = ThreadPoolExecutor(1)
    try:
        ray.init(address=cluster.gcs)
        clock("head up")
        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(before) == 1 and ray.cluster_resources().get("CPU", 0) == 0, ray.nodes()
        # the preflight of `chatsft train` sees one node, which cannot hold the workers: the run
        # will be multi-node, so a local run.output_dir must be shared storage
        with pytest.raises(UserError, match="a local path on a cluster whose one node cannot hold"):
            check_storage(RunPlan.resolve(tiny_cfg(tmp_path / "elastic", *RUN, *ELASTIC, "run.shared_storage=false")))
        check_storage(RunPlan.resolve(cfg))  # shared: the head writes and reads it, loads the tokenizer
        clock("preflight")
        with Timer():
            run = pool.submit(train_rows, cfg, rows, local=False,
                              extras=Extras(hooks=[ParkOnce(3, park, world=2)]))
            ranks = wait_for("both ranks after step 3", lambda: parked(park), 240, run)
            clock("both ranks parked after step 3")
            # the checkpoint of step 2 is whole in the run's folder before its node goes
            run_dir = tmp_path / "elastic" / "out" / "t"
            wait_for("checkpoint 2", lambda: (ckpt.latest(str(run_dir)) or "").endswith("checkpoint_000002"), 60, run)
            clock("checkpoint 2 written")
            assert [r["world"] for r in ranks] == [2, 2]
            nodes = [r["node_id"] for r in ranks]
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            # both on nodes the autoscaler added for the run
            assert len(set(nodes)) == 2 and set(nodes) <= alive - before, (nodes, before, alive)
            (park / "released").write_text("")
            cluster.remove(nodes[1])
            clock(f"node {nodes[1][-5:]} removed")
            result = run.result(timeout=300)
            clock("run done")
    finally:
        ray.shutdown()
        cluster.stop()  # a run still going (a failed assertion) ends with its cluster
        pool.shutdown(wait=False)

    m = result.metrics
    assert m["step"] == 6
    assert m["node_ids"] == [nodes[0]], (m["node_ids"], nodes)  # resumed on the node that is left, alone
    # every checkpoint: its data position is steps x 4 rows, with the world size that wrote it
    states = [state_of(run_dir / f"checkpoint_{s:06d}") for s in (2, 4, 6)]
    # (checkpoint 2 is of 1 worker when the group started before the second node was up and
    # Ray Train grew it at its next elastic check: the 2-worker group then resumed from it)
    first = states[0]["world_size"]
    assert first in (1, 2) and [(s["step"], s["epoch"], s["position"], s["world_size"]) for s in states] == \
        [(2, 0, 8, first), (4, 0, 16, 1), (6, 0, 24, 1)], states
    # every checkpoint whole, as each group wrote it (none was cut off by the node's removal)
    found = [(os.path.basename(f.path), f.problem) for f in ckpt.scan(str(run_dir))]
    assert found == [("checkpoint_000002", None), ("checkpoint_000004", None), ("checkpoint_000006", None)], found
    print(f"checkpoint 2 by {first} workers; resumed at step 2 on 1 worker after the node was removed")
    assert os.path.isfile(os.path.join(result.model_dir, "config.json"))  # and it exported the model
