"""Shared fixtures: the tiny built-in tokenizer and model, built once into a repo-local cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built models are deterministic; cache them beside the repo (git-ignored) so
# repeated runs and Ray workers started by the tests reuse one copy.
os.environ.setdefault("CHATSFT_CACHE", str(REPO / ".cache" / "chatsft"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: a run's end and a worker's death are
# noticed that late. Tests start dozens of short runs; set before any Ray starts, so its
# processes inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def tiny_llama_dir() -> str:
    from chatsft.builtin import resolve

    return resolve("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_t5_dir() -> str:
    from chatsft.builtin import resolve

    return resolve("builtin:tiny-t5")


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def make_tokenizer(tmp_path_factory):
    """A BPE trained on exactly `texts` with room to spare: every word becomes one token,
    so tests can state expected tokens as words."""

    def build(texts, vocab_size=5000):
        from chatsft.builtin import build_tokenizer

        return build_tokenizer(tmp_path_factory.mktemp("tok"), texts=list(texts) * 3, vocab_size=vocab_size)

    return build


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1: SQLite backend, artifacts in a temp dir (or at
    `artifacts`, e.g. s3://bucket/prefix, which the server reaches with the AWS_* variables of
    this process's environment)."""

    def __init__(self, root: Path, artifacts: Optional[str] = None):
        self.root = root
        self.artifacts = artifacts or str(root / "artifacts")
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 180.0) -> "MlflowServer":
        import subprocess
        import sys
        import time
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", self.artifacts],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            # its job runner (huey consumers, 15 threads polling the store) serves no test here and
            # starves the tracking API of a loaded 2-core machine
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    healthy = r.status == 200
                if healthy:
                    # /health answers before the store does: its first query sets up the database,
                    # which on a loaded machine outlasts a client's timeout. Up means the store answers.
                    with urllib.request.urlopen(self.uri + "/api/2.0/mlflow/experiments/get-by-name"
                                                "?experiment_name=Default",
                                                timeout=max(5.0, deadline - time.time())) as r:
                        if r.status == 200:
                            return self
            except Exception:
                pass  # not up yet: asked again
            time.sleep(0.5)
        raise RuntimeError("mlflow server did not come up")

    def stop(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


_LOCAL_RAY: dict[str, str] = {}


def _ray_is_idle(timeout: float) -> bool:
    """Every CPU of the local Ray free again (placement groups of finished runs released)."""
    import time

    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
        if total and free >= total:
            return True
        time.sleep(0.2)
    return False


def use_local_ray() -> None:
    """A local Ray of 2 CPUs, shared by the tests that ask for it: starting one costs seconds,
    and a test pass holds dozens of runs. A test gets it only when nothing of an earlier test
    holds its CPUs; a Ray of someone else's (a test's cluster, or one that prepare started) is
    shut down first. With the dashboard: Ray Train's placement-group cleaner asks its state
    API whether a controller is gone, and without it the groups of a trial that Tune stopped
    are never released."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _LOCAL_RAY.get("gcs"):
        ray.shutdown()
    if ray.is_initialized() and not _ray_is_idle(5):
        ray.shutdown()  # something of the last test still holds CPUs: starting anew is quicker
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
        _LOCAL_RAY["gcs"] = ray.get_runtime_context().gcs_address


@pytest.fixture
def local_ray():
    use_local_ray()
    yield
