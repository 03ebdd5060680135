"""The plain-torch engine: the model itself, or DDP when there are several workers, with torch's
AdamW and autocast. It needs no DeepSpeed install (GPU benchmarks on machines without it);
every rank holds the whole model and optimizer, so rank 0 alone saves them."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch

from chatsft.train.engines.base import Accumulation, config_groups, restore_groups, set_lr

STATE_FILE = "torch_state.pt"


class DDPEngine:
    kind = "ddp"
    shards = False

    def __init__(self, model: torch.nn.Module, groups: list[dict], train: Any, world_size: int,
                 device: torch.device) -> None:
        from chatsft.train.optim import adamw

        if train.precision == "fp16":
            raise ValueError("train.precision: fp16 needs train.engine=deepspeed (loss scaling); use bf16")
        model.to(device)
        self.model = model
        self.optimizer = adamw(groups, train, fused=train.fused_optimizer)
        self.forward_module: Any = model
        if world_size > 1:
            self.forward_module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.autocast = torch.bfloat16 if train.precision == "bf16" else None
        self.dtype = self.autocast or torch.float32
        self.device, self.world_size, self.grad_accum = device, world_size, train.grad_accum
        self.acc = Accumulation(train.grad_accum)

    def set_lr(self, multiplier: float) -> float:
        return set_lr(self.optimizer, multiplier)

    def _no_sync(self):
        # DDP: all-reduce only on the last micro-batch of a step
        if self.world_size > 1 and not self.acc.last_micro():
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def forward(self, inputs: dict[str, Any]):
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with ctx, self._no_sync():
            # use_cache=False: a cache object in training turns off transformers'
            # detection of packed rows from position_ids (masking_utils)
            return self.forward_module(**inputs, use_cache=False)

    def backward(self, loss: torch.Tensor) -> None:
        with self._no_sync():
            loss.backward()
        self.acc.micro += 1

    def step(self, clip: float) -> tuple[bool, float]:
        return self.acc.step(self.model, self.optimizer, clip)

    def skip(self) -> None:
        self.acc.micro = 0

    @property
    def skipped_steps(self) -> int:
        return self.acc.skipped

    def train(self) -> None:
        self.forward_module.train()

    def eval(self) -> None:
        self.forward_module.eval()

    def gathered(self):
        return contextlib.nullcontext()  # every rank holds the whole model

    def full_state_dict(self, rank: int) -> Optional[dict[str, torch.Tensor]]:
        return self.model.state_dict() if rank == 0 else None

    def save(self, folder: str, rank: int) -> None:
        if rank == 0:  # identical replicas on every rank
            os.makedirs(folder, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "skipped": self.acc.skipped}, os.path.join(folder, STATE_FILE))

    def load(self, folder: str, saved_world: Optional[int] = None) -> None:
        groups = config_groups(self.optimizer)
        state = torch.load(os.path.join(folder, STATE_FILE), map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.acc.skipped = int(state["skipped"])
        restore_groups(self.optimizer, groups)


def holds(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, STATE_FILE))


def checkpoint_weights(folder: str) -> dict:
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)["model"]
