"""Preflight of a multi-node run, before any compute: every node writes and reads
run.output_dir and loads the model's config and tokenizer; the error names the node that cannot."""

import pytest
import ray
from ray.cluster_utils import Cluster

from chatsft.errors import UserError
from chatsft.plan import RunPlan
from chatsft.train.driver import check_storage
from trainkit import tiny_cfg


@pytest.mark.slow
def test_preflight_names_the_node_that_cannot_load_the_model(tmp_path, tiny_llama_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    # this node's model cache is under a file: a built-in model cannot be built there
    bad = cluster.add_node(num_cpus=1, env_vars={"CHATSFT_CACHE": str(blocker / "cache")})
    cluster.wait_for_nodes()
    ray.shutdown()  # an earlier test may have left a Ray running
    ray.init(address=cluster.address)
    try:
        out = tmp_path / "out"
        # the model as a folder every node sees: both nodes pass, and leave no probe behind
        check_storage(RunPlan.resolve(tiny_cfg(tmp_path, "run.shared_storage=true",
                                               f"model.name_or_path={tiny_llama_dir}")))
        assert not list(out.glob(".preflight-*"))

        with pytest.raises(UserError) as e:
            check_storage(RunPlan.resolve(tiny_cfg(tmp_path, "run.shared_storage=true")))
        msg = str(e.value)
        assert msg.startswith("preflight: node ") and f"{bad.node_id[:8]})" in msg, msg
        assert "model.name_or_path=builtin:tiny-llama: cannot load its config or tokenizer" in msg, msg
        assert "\n" not in msg

        with pytest.raises(UserError, match="a local path on a 2-node cluster"):
            check_storage(RunPlan.resolve(tiny_cfg(tmp_path)))
    finally:
        ray.shutdown()
        cluster.shutdown()
