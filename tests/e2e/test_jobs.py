"""`ray job submit` end to end: a real two-node cluster started with `ray start`, token auth on."""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


class LocalCluster:
    """A head and one worker node, each `ray start --block` in its own process group, so the
    test stops exactly these nodes (`ray stop` would stop every Ray on the machine)."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs = root, env, []
        self.gcs = free_port()
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "wb")
        ports = [free_port() for _ in range(4)]
        cmd = [RAY, "start", "--block", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
               f"--temp-dir={self.root / name}", "--object-store-memory=300000000",
               f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
               f"--dashboard-agent-listen-port={ports[2]}", f"--metrics-export-port={ports[3]}", *args]
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self) -> "LocalCluster":
        self._start("head", "--head", f"--port={self.gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard}", "--include-dashboard=true")
        self._wait_dashboard()
        self._start("worker", f"--address=127.0.0.1:{self.gcs}")
        self._wait_nodes(2)
        return self

    def _wait_dashboard(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                req = urllib.request.Request(self.address + "/api/version",
                                             headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
                with urllib.request.urlopen(req, timeout=3):
                    return
            except Exception:
                time.sleep(1)
        raise RuntimeError((self.root / "head.log").read_text()[-3000:])

    def _wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([RAY, "status", f"--address=127.0.0.1:{self.gcs}"], env=self.env,
                                 capture_output=True, text=True)
            if out.stdout.count("node_") >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"{n} nodes did not come up: {out.stdout} {out.stderr}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    c = LocalCluster(root, env).start()
    yield c
    c.stop()


def ray_job(cluster, *args: str) -> str:
    """The `ray job` CLI as a user runs it: the token-auth variables in the client's environment."""
    verb, *rest = args
    out = subprocess.run([RAY, "job", verb, f"--address={cluster.address}", *rest], env=cluster.env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def job_status(text: str) -> str:
    """What `ray job status` prints: a banner for the ends, a plain line while it runs."""
    for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                            (r"Job '[^']+' was stopped", "STOPPED")):
        if re.search(pattern, text):
            return status
    return re.search(r"Status for job '[^']+': (\w+)", text).group(1)


def submit(cluster, entrypoint: str, timeout: float = 900) -> tuple[str, str]:
    runtime_env = {"env_vars": {"CHATSFT_CACHE": os.environ["CHATSFT_CACHE"], "TOKENIZERS_PARALLELISM": "false"}}
    out = ray_job(cluster, "submit", "--no-wait", f"--working-dir={REPO}",
                  f"--runtime-env-json={json.dumps(runtime_env)}", "--", *entrypoint.split(" "))
    job = re.search(r"(raysubmit_\w+)", out).group(1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job_status(ray_job(cluster, "status", job))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, ray_job(cluster, "logs", job)
        time.sleep(3)
    ray_job(cluster, "stop", job)
    raise AssertionError(f"job did not finish: {ray_job(cluster, 'logs', job)[-3000:]}")


def test_train_job_on_two_nodes(cluster, tmp_path):
    run = tmp_path / "run"
    status, logs = submit(cluster, (
        f"{sys.executable} jobs/train.py configs/tiny.yaml scaling.num_workers=2 "
        f"scaling.placement_strategy=SPREAD run.output_dir={run} run.shared_storage=true "
        "data.train=chatsft://samples/train.jsonl data.eval=chatsft://samples/heldout.jsonl "
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
