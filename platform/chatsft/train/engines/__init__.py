"""The engines that step a model on a worker, behind one protocol (base.Engine), and the
factory that picks one from `train.engine`, once."""

from __future__ import annotations

from typing import Any

import torch

from chatsft.train.engines.base import BASE_LR, Engine, load_weights, with_base_lrs

__all__ = ["BASE_LR", "KINDS", "Engine", "build_engine", "checkpoint_weights", "load_weights"]

KINDS = ("deepspeed", "fsdp2", "ddp")


def build_engine(model: torch.nn.Module, groups: list[dict], train: Any, *, world_size: int,
                 device: torch.device) -> Engine:
    """The engine of `train.engine` around `model`, its optimizer over `groups` (optim.param_groups)."""
    groups = with_base_lrs(groups, train.lr)
    if train.engine == "deepspeed":
        from chatsft.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, groups, train, world_size, device)
    if train.engine == "fsdp2":
        from chatsft.train.engines.fsdp2 import FSDP2Engine

        return FSDP2Engine(model, groups, train, world_size, device)
    if train.engine == "ddp":
        from chatsft.train.engines.ddp import DDPEngine

        return DDPEngine(model, groups, train, world_size, device)
    raise AssertionError(f"train.engine {train.engine!r} not handled")  # the config's Literal forbids it


def checkpoint_weights(folder: str) -> dict:
    """The full model weights of a local checkpoint folder of any engine, in this process."""
    from chatsft.errors import UserError
    from chatsft.train.engines import ddp, deepspeed, fsdp2

    for module in (ddp, fsdp2, deepspeed):
        if module.holds(folder):
            return module.checkpoint_weights(folder)
    raise UserError(f"{folder}: not a chatsft checkpoint (no {deepspeed.STATE_DIR}/, {fsdp2.STATE_DIR}/ "
                    f"or {ddp.STATE_FILE} of an engine)")
