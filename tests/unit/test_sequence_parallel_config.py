"""scaling.sequence_parallel: refusals at config load (one line naming the key), the layout line,
the rows per step of the data-parallel workers, and the cut of a batch along the sequence."""

import numpy as np
import pytest

from chatsft.config import ConfigError, load_config

BASE = ["model.name_or_path=builtin:tiny-llama", "tracking.enabled=false"]


@pytest.mark.parametrize("overrides, key", [
    (["scaling.num_workers=3", "scaling.sequence_parallel=2"], "scaling.sequence_parallel=2"),
    (["scaling.num_workers=4", "scaling.min_workers=1", "scaling.sequence_parallel=2"], "scaling.sequence_parallel=2"),
    (["scaling.sequence_parallel=0"], "scaling.sequence_parallel"),
    (["scaling.num_workers=2", "scaling.sequence_parallel=2", "train.compile=layers", "train.deepspeed.stage=2"],
     "train.compile=layers"),
    (["scaling.num_workers=2", "scaling.sequence_parallel=2", "method.name=prompt_tuning"], "method.name"),
    (["train.activation_offload=true"], "train.activation_offload"),
])
def test_refused_at_config_load_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + overrides)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_heads_not_divisible_and_local_runs_are_refused_by_the_plan(tmp_path, tiny_llama_dir):
    from chatsft.plan import RunPlan

    # the tiny Llama has 4 heads: 8 ranks per sequence cannot share them
    cfg = load_config(None, BASE + [f"run.output_dir={tmp_path}", "scaling.num_workers=8",
                                    "scaling.sequence_parallel=8"])
    with pytest.raises(ConfigError, match=r"scaling.sequence_parallel=8: .*num_attention_heads=4"):
        RunPlan.resolve(cfg)
    cfg = load_config(None, BASE + [f"run.output_dir={tmp_path}", "scaling.num_workers=2",
                                    "scaling.sequence_parallel=2"])
    with pytest.raises(ConfigError, match="scaling.sequence_parallel=2: --local"):
        RunPlan.resolve(cfg, local=True)


def test_layout_line_and_rows_per_step_of_the_data_parallel_workers(tmp_path):
    from chatsft.plan import RunPlan

    cfg = load_config(None, BASE + [f"run.output_dir={tmp_path}", "scaling.num_workers=4",
                                    "scaling.sequence_parallel=2", "data.max_length=512",
                                    "train.micro_batch_size=2", "train.grad_accum=3"])
    plan = RunPlan.resolve(cfg)
    assert plan.layout == "4 workers: 2 data-parallel x 2 sequence-parallel; each rank holds 256 of 512 tokens"
    assert plan.global_batch == 2 * 3 * 2  # what 2 workers without it take
    two = RunPlan.resolve(load_config(None, BASE + [f"run.output_dir={tmp_path}", "scaling.num_workers=2",
                                                    "train.micro_batch_size=2", "train.grad_accum=3"]))
    assert two.global_batch == plan.global_batch


def test_a_batch_cut_along_the_sequence_keeps_targets_positions_and_counts():
    import torch

    from chatsft.data.schema import IGNORE, Row
    from chatsft.model.batch import collate, shard_sequence

    rows = [Row(np.arange(10, 17), np.arange(10, 17), np.array([0, 1, 2, 0, 1, 2, 3])),
            Row(np.arange(20, 24), np.array([IGNORE, IGNORE, 22, 23]), np.arange(4))]
    whole = collate(rows, pad_id=0, multiple=4)
    assert whole.inputs["input_ids"].shape == (2, 8)  # 7 padded to a multiple of 4
    parts = [shard_sequence(whole, i, 4) for i in range(4)]
    assert torch.equal(torch.cat([p.targets for p in parts], 1), whole.targets)  # shifted once, whole row
    assert torch.equal(torch.cat([p.inputs["position_ids"] for p in parts], 1), whole.inputs["position_ids"])
    assert sum(p.num_targets for p in parts) == whole.num_targets
    assert sum(p.tokens for p in parts) == whole.tokens
    # unpacked rows get their global positions
    plain = collate([Row(np.arange(5), np.arange(5), None)], pad_id=0, multiple=2)
    assert shard_sequence(plain, 1, 2).inputs["position_ids"].tolist() == [[3, 4, 5]]
