"""chatsft joining a Ray cluster it did not start (RAY_ADDRESS, `ray start`, a Ray left running)
says which one: its address and size. A Ray it starts itself is not announced as joined."""

import pytest
import ray

from chatsft.raysetup import ensure_ray


@pytest.mark.slow
def test_joining_a_running_cluster_is_said(capsys):
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ensure_ray(address=cluster.address)
        out = capsys.readouterr().out
        assert f"[chatsft] joined the Ray cluster at {cluster.address} (not started by chatsft): 2 nodes, 2 CPUs" \
            in out, out
    finally:
        ray.shutdown()
        cluster.shutdown()
    ensure_ray(address="local", num_cpus=1, include_dashboard=False)
    try:
        assert "joined" not in capsys.readouterr().out
    finally:
        ray.shutdown()
