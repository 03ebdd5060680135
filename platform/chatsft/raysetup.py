"""Connecting to Ray, in one place: the CLI, jobs, prepare, train and sweep all go through here."""

from __future__ import annotations

import os
from typing import Any


def runtime_env() -> dict[str, Any]:
    """Ship this very chatsft to the workers (a checkout, or a Ray job's working dir), not
    whichever version a cluster node's Python may have installed. Ray accepts local folders
    only at the job level (ray.init), so whoever calls ray.init passes this."""
    import chatsft

    return {"py_modules": [os.path.dirname(os.path.abspath(chatsft.__file__))]}


def ensure_ray(**kwargs: Any) -> None:
    """Join the cluster this runs in (RAY_ADDRESS, which `ray job submit` sets, or one started
    with `ray start` on this machine), else start a local Ray; no-op when already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env(), **kwargs)
