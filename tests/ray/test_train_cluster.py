"""Two Ray nodes (ray.cluster_utils.Cluster), one worker each, train together under ZeRO-3:
the loss goes down, the workers ran on distinct nodes, and the exported model generates."""

import pytest
import ray
from ray.cluster_utils import Cluster

from trainkit import Timer, rows_for, tiny_cfg, train_rows


@pytest.mark.slow
def test_two_nodes_zero3(tmp_path):
    cfg = tiny_cfg(tmp_path, "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD",
                   "train.deepspeed.stage=3", "train.max_steps=8", "train.micro_batch_size=4",
                   "train.lr=3e-3", "train.log_every=4", "run.shared_storage=true")
    rows = rows_for(cfg, str(tmp_path), train_limit=64, eval_limit=16)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.shutdown()  # prepare in an earlier test may have left a Ray running
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        with Timer():
            result = train_rows(cfg, rows, local=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    m = result.metrics
    assert len(set(m["node_ids"])) == 2, m["node_ids"]
    assert m["eval_loss"] < m["eval_loss_first"] - 0.5, (m["eval_loss_first"], m["eval_loss"])
    assert m["skipped_steps"] == 0

    # the export gathered the ZeRO-3 partitions: transformers loads it and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.model_dir)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello. I live in Paris."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
