"""The DeepSpeed config built from `train.*` (plus `train.deepspeed.overrides` merged in)."""

from __future__ import annotations

import copy
from typing import Any


def deepspeed_config(train: Any, world_size: int) -> dict[str, Any]:
    ds = train.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.stage == 3:
        # export gathers the full weights once at the end
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": float(train.clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # torch's AdamW under ZeRO: DeepSpeed only lists its own optimizers as tested
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge(config, ds.overrides)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
