"""Connecting to Ray, in one place: the CLI, jobs, prepare, train and sweep all go through here."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint: the job's
# runtime env (working_dir, env_vars, ...) as JSON. ray.init merges whatever it is given into it.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _package_dir() -> str:
    import chatsft

    return os.path.dirname(os.path.abspath(chatsft.__file__))


def job_runtime_env() -> Optional[dict[str, Any]]:
    """The runtime env of the Ray job this process is the entrypoint of, or None outside a job."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    return json.loads(raw).get("runtime_env") or {}


def runtime_env() -> dict[str, Any]:
    """What ray.init must add so that workers import this very chatsft, not whichever version
    a cluster node's Python may have installed.

    Outside a job: the package folder as py_modules (Ray accepts local folders only at the job
    level, so whoever calls ray.init passes this).

    Inside a job (`ray job submit --working-dir .`): the job's runtime env stays as it is and
    is only extended. Ray merges what ray.init is given into it; a py_modules folder there
    would be a second copy of code the working dir already carries to every worker (which
    starts in it), uploaded and unpacked again by every node for every job. All workers need
    is the source root on their path, relative to the working dir, since each node unpacks it
    in a folder of its own."""
    job = job_runtime_env()
    if job is None:
        return {"py_modules": [_package_dir()]}
    source_root = os.path.dirname(_package_dir())
    inside = os.path.relpath(source_root, os.getcwd())
    if not job.get("working_dir") or inside == os.curdir or inside.startswith(os.pardir):
        # chatsft is the cluster's installed one (or the working dir's root is on the path already)
        return {}
    if "PYTHONPATH" in (job.get("env_vars") or {}):
        return {}  # the submitter set the workers' path; a second value would conflict (Ray refuses)
    return {"env_vars": {"PYTHONPATH": inside}}


def ensure_ray(**kwargs: Any) -> None:
    """Join the cluster this runs in (RAY_ADDRESS, which `ray job submit` sets, or one started
    with `ray start` on this machine), else start a local Ray; no-op when already connected.
    Joining a cluster this process did not start is said, with its address and size: a Ray left
    running on the machine is joined as silently as the one a job was submitted to."""
    import ray

    if ray.is_initialized():
        return
    from chatsft.console import quiet_driver

    quiet_driver()  # before the workers start: they inherit it
    ray.init(runtime_env=runtime_env() or None, **kwargs)
    node = getattr(ray._private.worker, "_global_node", None)  # this driver's node; head: Ray started here
    if node is not None and not node.is_head():
        sys.stdout.write(f"[chatsft] {joined_cluster()}\n")
        sys.stdout.flush()


def joined_cluster() -> str:
    """The line that names the running Ray cluster this process is connected to."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    gpus = f", {total['GPU']:g} GPUs" if total.get("GPU") else ""
    return (f"joined the Ray cluster at {ray.get_runtime_context().gcs_address} (not started by chatsft): "
            f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {total.get('CPU', 0):g} CPUs{gpus}")
