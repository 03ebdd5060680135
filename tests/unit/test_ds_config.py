"""The DeepSpeed config built from train.*: batch sizes, ZeRO stage and offload, precision, overrides."""

from chatsft.config import load_config
from chatsft.train.ds_config import deepspeed_config, merge


def test_batch_sizes_precision_and_stage():
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=5", "train.precision=bf16",
                             "train.deepspeed.stage=3", "train.deepspeed.offload_params=true",
                             "train.deepspeed.offload_optimizer=true", "train.clip_grad=0.5"])
    ds = deepspeed_config(cfg.train, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"]


def test_overrides_merge_deeply():
    cfg = load_config(None, ['train.deepspeed.overrides={"zero_optimization": {"reduce_bucket_size": 1000}, '
                             '"steps_per_print": 5}'])
    ds = deepspeed_config(cfg.train, world_size=1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                       "reduce_bucket_size": 1000}
    assert ds["steps_per_print"] == 5
    assert merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}
