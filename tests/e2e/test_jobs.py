"""`ray job submit` end to end: a real two-node cluster (ray.cluster_utils.Cluster, each node
with its own temp dir), the dashboard and token auth on, driven by the `ray job` CLI."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.clusterkit import TwoNodes

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes, the dashboard on, token auth as `ray start` has it (RAY_AUTH_MODE=token and the
    token in the environment of the nodes and of the `ray job` client). The test's PYTHONPATH
    is left out: workers must find chatsft in the job's working dir."""
    root = tmp_path_factory.mktemp("ray")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    c = TwoNodes(root, env).start()
    yield c
    c.stop()


def ray_job(cluster, *args: str, timeout: float = 300, check: bool = True) -> str:
    """The `ray job` CLI as a user runs it: the token-auth variables in the client's environment."""
    verb, *rest = args
    for _ in range(15):
        out = subprocess.run([RAY, "job", verb, f"--address={cluster.address}", *rest], env=cluster.env,
                             capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in out.stderr:  # the head's agent is still starting
            break
        time.sleep(2)
    assert out.returncode == 0 or not check, out.stdout + out.stderr
    return out.stdout + out.stderr


def job_status(text: str) -> str:
    """The end of a job as `ray job submit` prints it when it has waited for it."""
    for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                            (r"Job '[^']+' was stopped", "STOPPED")):
        if re.search(pattern, text):
            return status
    return "UNKNOWN"


def submit(cluster, entrypoint: str, timeout: float = 900, working_dir: Path = REPO) -> tuple[str, str]:
    """`ray job submit` waiting for the end (exit 1 when the job failed), its logs tailed."""
    runtime_env = {"env_vars": {"CHATSFT_CACHE": os.environ["CHATSFT_CACHE"], "TOKENIZERS_PARALLELISM": "false"}}
    out = ray_job(cluster, "submit", f"--working-dir={working_dir}", f"--runtime-env-json={json.dumps(runtime_env)}",
                  "--", *entrypoint.split(" "), timeout=timeout, check=False)
    return job_status(out), out


def test_train_job_on_two_nodes(cluster, tmp_path):
    run = tmp_path / "run"
    # 200 of the sample conversations: what is tested is the job around the run, not its size
    lines = (REPO / "platform" / "chatsft" / "samples" / "train.jsonl").read_text().splitlines(True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:200]))
    status, logs = submit(cluster, (
        f"{sys.executable} jobs/train.py configs/tiny.yaml scaling.num_workers=2 "
        f"scaling.placement_strategy=SPREAD run.output_dir={run} run.shared_storage=true "
        f"data.train={tmp_path / 'train.jsonl'} data.eval=chatsft://samples/heldout.jsonl "
        "train.max_steps=12 train.save_every=6 eval.max_examples=8"))
    assert status == "SUCCEEDED", logs[-4000:]
    result = json.loads((run / "result.json").read_text())
    node_ids = result["metrics"]["node_ids"]
    assert len(node_ids) == 2 and len(set(node_ids)) == 2, node_ids  # one worker per node
    assert result["metrics"]["step"] == 12
    assert result["checkpoint"] and Path(result["checkpoint"]).is_dir()
    assert (run / "model" / "config.json").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("chatsft").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]


def test_broken_config_job_fails_with_the_key_in_its_logs(cluster):
    status, logs = submit(cluster, f"{sys.executable} jobs/train.py configs/tiny.yaml train.lrr=3")
    assert status == "FAILED"
    assert "train.lrr: unknown key (did you mean train.lr?)" in logs


def test_ten_jobs_in_a_row_keep_their_working_dir(cluster, tmp_path):
    """Each job joins the cluster the way jobs/*.py do, then reads its config file while both
    nodes run its tasks. Every submission is a new working-dir package (a marker file changes),
    so every one goes through the moment the nodes unpack it, where jobs used to lose it."""
    work = tmp_path / "work"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in [n for n in files if n.startswith(("platform/", "configs/"))] + ["tests/e2e/job_probe.py"]:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, work / name)
    results = []
    for i in range(10):
        (work / "submission.txt").write_text(f"{i}\n")
        status, logs = submit(cluster, f"{sys.executable} tests/e2e/job_probe.py", timeout=300, working_dir=work)
        assert status == "SUCCEEDED", f"job {i + 1} of 10: {logs[-3000:]}"
        results.append(json.loads(re.search(r"^PROBE (\{.*\})$", logs, re.M).group(1)))
    for r in results:
        # the job's own code reached the driver and the workers: unpacked from its working dir
        # on each node, never the copy installed in the cluster's Python
        assert all("/working_dir_files/" in c and c.endswith("/platform/chatsft") for c in r["code"]), r
        assert "/working_dir_files/" in r["driver_code"], r
    assert max(len(r["nodes"]) for r in results) == 2, results  # tasks ran on both nodes
