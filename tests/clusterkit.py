"""A two-node Ray cluster (`ray.cluster_utils.Cluster`) in a child process, for the e2e tests.

Each node has its own temp dir, as nodes of a real cluster have their own disks: two nodes
sharing one (Cluster's default) unpack a job's working dir into the same folder, and the
second node's runtime-env agent deletes and re-extracts it under the job's running driver.
The cluster lives in a child process so that token auth (read from the environment and
cached by Ray at first use) never leaks into the test process's own Ray.

    python tests/clusterkit.py ROOT DASHBOARD_PORT   # prints READY <gcs address>, stops when stdin closes
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(root: str, dashboard_port: int) -> None:
    from ray.cluster_utils import Cluster

    # Every port picked free: other Rays may run on this machine (the head's agent would
    # otherwise take the default 52365, and without its HTTP server no job can be submitted).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port, "dashboard_agent_listen_port": _free_port(),
        "temp_dir": os.path.join(root, "head"),
        "object_store_memory": 200 * 1024 * 1024})
    cluster.add_node(num_cpus=1, temp_dir=os.path.join(root, "worker"), object_store_memory=200 * 1024 * 1024)
    cluster.wait_for_nodes()
    # What `ray start --head --temp-dir` leaves: a job's driver (RAY_ADDRESS=auto) finds its
    # cluster in its node's temp dir, not whichever Ray last wrote /tmp/ray on this machine.
    from ray._private.utils import write_ray_address

    for node in ("head", "worker"):
        write_ray_address(cluster.address, os.path.join(root, node))
    print("READY", cluster.address, flush=True)
    try:
        sys.stdin.read()  # the test closes our stdin (or dies) when it is done
    finally:
        cluster.shutdown()


class TwoNodes:
    """The child process holding the cluster; `env` is what a user's shell has to reach it."""

    def __init__(self, root: Path, env: dict[str, str]):
        import tempfile

        from tests.conftest import free_port

        # The nodes' temp dirs hold Unix sockets, whose paths must stay under 108 bytes:
        # pytest's tmp_path is too deep for them.
        self.root, self.env = Path(tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")), env
        self.log_dir = root
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs = ""
        self.proc = None

    def start(self, timeout: float = 180) -> "TwoNodes":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_dir / "cluster.log", "w")
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.root), str(self.dashboard_port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=self.env, text=True, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY"):
                self.gcs = line.split()[1]
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError((self.log_dir / "cluster.log").read_text()[-3000:])

    def stop(self) -> None:
        import signal

        import shutil

        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
