"""How many CPU threads a training worker uses: the machine's cores with --local, the worker's
CPU resources on Ray, train.threads over both."""

import pytest

from chatsft.config import ConfigError, load_config
from chatsft.plan import RunPlan, local_cores


def test_local_uses_every_core_ray_the_workers_cpus():
    cfg = load_config(None, ["scaling.resources_per_worker={CPU: 3}"])
    assert RunPlan.resolve(cfg, local=True).threads == local_cores()
    assert RunPlan.resolve(cfg, local=False).threads == 3
    assert RunPlan.resolve(load_config(None), local=False).threads == 1  # the default worker: {CPU: 1}


def test_train_threads_overrides_both():
    cfg = load_config(None, ["train.threads=5", "scaling.resources_per_worker={CPU: 2}"])
    assert RunPlan.resolve(cfg, local=True).threads == 5
    assert RunPlan.resolve(cfg, local=False).threads == 5


def test_negative_threads_is_refused():
    with pytest.raises(ConfigError, match="train.threads"):
        load_config(None, ["train.threads=-1"])
