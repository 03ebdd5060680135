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


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][:1] != "Z"  # a zombie has exited
    except OSError:
        return False


class Autoscaling:
    """A Ray cluster grown and shrunk by Ray's autoscaler with its fake multi-node provider
    (`fake_multinode`, what `ray.cluster_utils.AutoscalingCluster` starts): a head of `head_cpus`
    and worker nodes of one type, raylets on this machine, added when work asks for them.

    Not AutoscalingCluster itself: in Ray 2.60 its constructor reads an example.yaml that the
    wheel does not ship, and its start() and shutdown() run `ray stop --force`, which ends every
    Ray process of the user on the machine. The same config here, started with `ray start --head`
    on free ports in a temp dir of its own, in a process group of its own that stop() ends. The
    autoscaler (v1, Ray 2.60's default) runs in the head's monitor process and starts each worker
    node there as a `ray._private.node.Node` whose node id is the provider's fake one."""

    WORKER_TYPE = "ray.worker.cpu"

    def __init__(self, root: Path, *, head_cpus: int = 0, worker_cpus: int = 1, max_workers: int = 2,
                 object_store_mb: int = 128, replace_lost: bool = True):
        import tempfile

        from ray._private.services import get_node_ip_address

        from tests.conftest import free_port

        # temp dirs hold Unix sockets (paths under 108 bytes): pytest's tmp_path is too deep
        self.root = Path(tempfile.mkdtemp(prefix="rayas-", dir="/tmp"))
        self.log_dir = root
        self.port = free_port()
        self.gcs = f"{get_node_ip_address()}:{self.port}"
        self.head_cpus = head_cpus
        store = object_store_mb * 1024 * 1024
        self.config = {
            "cluster_name": "chatsft-fake", "max_workers": max_workers,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.gcs,
                         # False: a node whose raylet is gone keeps its slot (max_workers) and is
                         # never replaced, as when the cloud has no capacity left for it
                         "worker_liveness_check": replace_lost},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                self.WORKER_TYPE: {"resources": {"CPU": worker_cpus, "object_store_memory": store},
                                   "node_config": {}, "min_workers": 0, "max_workers": max_workers},
            },
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }
        self.proc = None
        self.head_dir = self.root / "head0"

    def start(self, timeout: float = 120) -> "Autoscaling":
        import json

        from tests.conftest import free_port

        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.root / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        ray_bin = str(Path(sys.executable).with_name("ray"))
        env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                   # a node whose raylet is gone is given up (and replaced) after this many seconds
                   AUTOSCALER_HEARTBEAT_TIMEOUT_S="5",
                   # without it `ray start --head` turns token auth on when ~/.ray/auth_token exists
                   RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
                   # Ray Train gives up a worker group whose placement group is not ready in this
                   # time and decides again (default 60 s): after a node is lost, its first try
                   # may still count it (the autoscaling coordinator's view is up to 20 s old)
                   RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20"))
        env.pop("RAY_ADDRESS", None)
        # Twice: on an overloaded machine the head's raylet may miss Ray's fixed 30 s to register
        for attempt in range(2):
            log = self.log_dir / f"cluster{attempt}.log"
            # --block: this process holds the head; its process group holds every node the
            # autoscaler starts (the monitor starts them, and Ray starts nothing in a new session)
            with open(log, "w") as out:
                self.proc = subprocess.Popen(
                    [ray_bin, "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                     f"--autoscaling-config={config}", f"--temp-dir={self.root / f'head{attempt}'}",
                     "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
                     f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                     f"--object-store-memory={100 * 1024 * 1024}", "--disable-usage-stats"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.head_dir = self.root / f"head{attempt}"
            deadline = time.time() + timeout
            while time.time() < deadline and self.proc.poll() is None:
                if "--block" in log.read_text():  # "Ray runtime started ... --block"
                    return self
                time.sleep(0.5)
            self._kill()
        self.stop()
        raise RuntimeError(log.read_text()[-3000:])

    def pids_of(self, node_id: str) -> list[int]:
        """This cluster's processes of one node: its command line names the node id (raylet,
        agents); only processes of this cluster's process group."""
        pgid, out = os.getpgid(self.proc.pid), []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
                if node_id.encode() in cmd and os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except (OSError, ProcessLookupError):
                continue
        return out

    def remove(self, node_id: str, grace: float = 30) -> list[int]:
        """Take a worker node away as the provider's terminate_node does (SIGTERM to its raylet,
        SIGKILL after `grace` seconds): a node the autoscaler or the cloud shuts down while it
        runs work. Its workers and agents end with their raylet."""
        import signal

        pids = self.pids_of(node_id)
        assert pids, f"no process of node {node_id}"
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        return pids

    def stop(self) -> None:
        import glob
        import shutil

        if self.proc is None:
            return
        for log in glob.glob(str(self.head_dir / "session_latest" / "logs" / "monitor.*")):
            shutil.copy(log, self.log_dir)  # the autoscaler's own account, kept beside the test's files
        self._kill()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill(self) -> None:
        """What `ray stop --force` does, to this cluster's processes only (SIGTERM drains 30 s)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        except ProcessLookupError:
            pass
