"""The DeepSpeed engine: ZeRO 0-3, CPU offload, bf16/fp16 with fp32 master weights.

The only module of chatsft that touches DeepSpeed's engine (and its private names).
Non-finite gradients: ZeRO's optimizers (stages 1-3, any precision) and DeepSpeed's
bf16/fp16 wrappers check the global norm themselves and skip (`skipped_steps`); stage 0
in fp32 hands the step to the plain torch optimizer with no check, so there this engine
checks the all-reduced norm and drops the gradients before stepping.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
from typing import Any, Optional

import torch

from chatsft.train.engines.base import config_groups, grad_norm, restore_groups, set_lr

STATE_DIR = "state"  # the DeepSpeed tag every checkpoint is saved under


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, groups: list[dict], train: Any, world_size: int,
                 device: torch.device) -> None:
        if device.type == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        from chatsft.train.ds_config import deepspeed_config
        from chatsft.train.optim import adamw, adamw_settings

        if train.deepspeed.offload_optimizer:  # the optimizer steps in CPU memory: DeepSpeed's CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adamw_settings(train))
        else:
            optimizer = adamw(groups, train)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                config=deepspeed_config(train, world_size),
                                                dist_init_required=False)
        self.model = model
        # ZeRO keeps the param-group dicts of the optimizer it wraps: lr set there is used
        self.optimizer = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        self.device, self.world_size, self.grad_accum = device, world_size, train.grad_accum
        self.stage = self.ds.zero_optimization_stage()
        self.shards = self.stage == 3
        self.dtype = (torch.bfloat16 if self.ds.bfloat16_enabled() else
                      torch.float16 if self.ds.fp16_enabled() else torch.float32)
        self.skipped = 0  # steps skipped by this engine's own check (stage 0 in fp32)
        self._micro = 0

    def set_lr(self, multiplier: float) -> float:
        return set_lr(self.optimizer, multiplier)

    def forward(self, inputs: dict[str, Any]):
        # use_cache=False: a cache object in training turns off transformers'
        # detection of packed rows from position_ids (masking_utils)
        return self.ds(**inputs, use_cache=False)

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already scaled the loss by world/N for the whole step:
        # DeepSpeed must not divide it by the accumulation steps again.
        self.ds.backward(loss, scale_wrt_gas=False)
        if self._micro < self.grad_accum - 1:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step
        self._micro += 1

    def step(self, clip: float) -> tuple[bool, float]:
        assert self._micro == self.grad_accum, "step() after exactly grad_accum backward() calls"
        self._micro = 0
        own_check = self.stage == 0 and self.dtype == torch.float32
        norm = None
        clipping = self.ds._config.gradient_clipping
        if own_check:
            norm = grad_norm(self.model)  # stage 0 all-reduced the grads in backward
            if not math.isfinite(norm):
                for p in self.model.parameters():
                    p.grad = None
                # DeepSpeed's fp32 clipping indexes the gradients it finds: none left
                self.ds._config.gradient_clipping = 0.0
        before = self.ds.skipped_steps
        try:
            self.ds.step()
        finally:
            self.ds._config.gradient_clipping = clipping
        if own_check:
            applied = math.isfinite(norm)
            self.skipped += 0 if applied else 1
            return applied, norm
        applied = self.ds.skipped_steps == before
        got = self.ds.get_global_grad_norm()
        norm = float(got) if got is not None else float("nan")
        return applied, (norm if applied else float("inf"))

    def skip(self) -> None:
        self._micro = 0

    @property
    def skipped_steps(self) -> int:
        return self.skipped + self.ds.skipped_steps

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def gathered(self):
        if not self.shards:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def full_state_dict(self, rank: int) -> Optional[dict[str, torch.Tensor]]:
        if self.shards:
            state = self.ds._zero3_consolidated_16bit_state_dict()  # full weights on rank 0 only
            return state if rank == 0 else None
        return self.model.state_dict() if rank == 0 else None  # ZeRO 0-2 keep whole weights

    # ------------------------------------------------------------- checkpoints

    def save(self, folder: str, rank: int) -> None:
        self.ds.save_checkpoint(folder, tag=STATE_DIR, client_state={"skipped": self.skipped})

    def load(self, folder: str, saved_world: Optional[int] = None) -> None:
        groups = config_groups(self.optimizer)
        if saved_world not in (None, self.world_size) and self.stage >= 1:
            # ZeRO partitions the optimizer state by world size and DeepSpeed refuses another
            # one; its universal checkpoint is the world-size-free form it loads at any size.
            with _universal(folder) as converted:
                self.ds._config.load_universal_checkpoint = True
                try:
                    _, client = self.ds.load_checkpoint(converted, tag=STATE_DIR, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
                finally:
                    self.ds._config.load_universal_checkpoint = False
        else:
            _, client = self.ds.load_checkpoint(folder, tag=STATE_DIR, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"{folder}: no DeepSpeed checkpoint to resume from")
        self.skipped = int(client.get("skipped", 0))
        restore_groups(self.optimizer, groups)


@contextlib.contextmanager
def _universal(folder: str):
    """The DeepSpeed checkpoint under `folder` converted to the universal format (world-size free),
    in a scratch folder for the duration."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tempfile.mkdtemp(prefix="chatsft-universal-")
    try:
        ds_to_universal(SimpleNamespace(
            input_folder=os.path.join(folder, STATE_DIR), output_folder=os.path.join(out, STATE_DIR),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True))
        with open(os.path.join(out, "latest"), "w") as f:
            f.write(STATE_DIR)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def holds(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, STATE_DIR))


def checkpoint_weights(folder: str) -> dict:
    """The full model weights of a DeepSpeed checkpoint folder, in this process (no group)."""
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    model_states = sorted(glob.glob(os.path.join(folder, STATE_DIR, "*model_states.pt")))
    if model_states:
        meta = torch.load(model_states[0], map_location="cpu", weights_only=False)
        zero3 = meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 3
        if not zero3 and meta.get("module"):
            return meta["module"]  # ZeRO 0-2: the full module is in rank 0's model states
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(folder, tag=STATE_DIR)
