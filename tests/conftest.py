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
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except Exception:
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


@pytest.fixture
def fresh_ray():
    """A local Ray of 2 CPUs for this test alone (prepare may have left one running). With the
    dashboard: Ray Train's placement-group cleaner asks its state API whether a controller is
    gone, and without it the groups of a trial that Tune stopped are never released."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True)
    yield
    ray.shutdown()
