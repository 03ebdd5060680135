"""The Engine protocol: what the training loop, resume, export and evaluation may ask of the
thing that steps the model, and the few pieces every engine shares.

One implementation per engine (`deepspeed.py`, `fsdp2.py`, `ddp.py`), chosen once by
`chatsft.train.engines.build_engine`. Nothing outside an engine's module touches its library's
private names: a caller that needs the full weights asks `full_state_dict` or `gathered`.

Non-finite gradients skip the optimizer step and are counted (`skipped_steps`); `step`
returns whether it applied and the global gradient norm before clipping.
"""

from __future__ import annotations

import math
from typing import Any, ContextManager, Optional, Protocol

import torch

BASE_LR = "chatsft_base_lr"  # kept in each param group: the schedule multiplies it


class Engine(Protocol):
    kind: str  # "deepspeed" | "fsdp2" | "ddp": recorded in every checkpoint (train/resume.py)
    model: torch.nn.Module  # the HF / PEFT model (FSDP2: sharded in place)
    optimizer: Any  # a torch optimizer whose param_groups carry the lr and BASE_LR
    device: torch.device
    world_size: int
    grad_accum: int
    shards: bool  # parameters are split over the workers: full weights need a collective
    dtype: torch.dtype  # what the forward computes in (bf16 under mixed precision, else fp32)

    def set_lr(self, multiplier: float) -> float:
        """Every group's lr = its base lr x multiplier; returns the first group's."""

    def forward(self, inputs: dict[str, Any]) -> Any:
        """The model's forward on one micro-batch (the loss head may run inside it)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; gradients are averaged over the world on the last of a step."""

    def step(self, clip: float) -> tuple[bool, float]:
        """After exactly grad_accum backward calls: (applied, gradient norm before clipping)."""

    def skip(self) -> None:
        """A step with nothing supervised anywhere: no forward, no update."""

    @property
    def skipped_steps(self) -> int: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def gathered(self) -> ContextManager[None]:
        """Collective: for its duration `model` holds its full weights on every rank, so rank 0
        alone may run it (generation); the other ranks wait in the context."""

    def full_state_dict(self, rank: int) -> Optional[dict[str, torch.Tensor]]:
        """Collective: the full, unsharded weights (the model's state-dict keys) on rank 0, None elsewhere."""

    def save(self, folder: str, rank: int) -> None:
        """Collective: weights and optimizer state; each rank writes its own files into `folder`."""

    def load(self, folder: str, saved_world: Optional[int] = None) -> None:
        """Weights and optimizer state from a checkpoint of this engine written by `saved_world`
        workers (any number). The optimizer's hyperparameters stay the config's."""


# ------------------------------------------------------------------ shared pieces


def with_base_lrs(groups: list[dict], lr: float) -> list[dict]:
    """Copies of the param groups, each with its lr and the BASE_LR the schedule multiplies."""
    out = [dict(g) for g in groups]
    for g in out:
        g.setdefault("lr", lr)
        g[BASE_LR] = g["lr"]
    return out


def set_lr(optimizer: Any, multiplier: float) -> float:
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = group[BASE_LR] * multiplier
        lrs.append(group["lr"])
    return lrs[0] if lrs else 0.0


def config_groups(optimizer: Any) -> list[dict]:
    """The hyperparameters of each group, to put back after a checkpoint's are loaded."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def restore_groups(optimizer: Any, groups: list[dict]) -> None:
    for group, settings in zip(optimizer.param_groups, groups):
        group.update(settings)


def grad_norm(model: torch.nn.Module) -> float:
    """The global L2 norm of the gradients (DTensor shards included: their full norm)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


class Accumulation:
    """A torch engine's count of micro-batches towards the optimizer step, and of the steps its
    non-finite check skipped (ddp and fsdp2 hold one; DeepSpeed counts its own)."""

    def __init__(self, grad_accum: int) -> None:
        self.grad_accum, self.micro, self.skipped = grad_accum, 0, 0

    def last_micro(self) -> bool:
        """The backward of this micro-batch is the one that reduces the gradients across ranks."""
        return self.micro == self.grad_accum - 1

    def step(self, model: torch.nn.Module, optimizer: Any, clip: float) -> tuple[bool, float]:
        assert self.micro == self.grad_accum, "step() after exactly grad_accum backward() calls"
        self.micro = 0
        applied, norm = clip_and_step(model, optimizer, clip)
        self.skipped += 0 if applied else 1
        return applied, norm


def clip_and_step(model: torch.nn.Module, optimizer: Any, clip: float) -> tuple[bool, float]:
    """The plain-torch step of DDP and FSDP2: a non-finite norm drops the gradients and skips."""
    norm = grad_norm(model)
    applied = math.isfinite(norm)
    if applied:
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied, norm


def load_weights(model: torch.nn.Module, state: dict, what: str) -> None:
    """Full weights into a freshly loaded model; a mismatch is the user's (another model or method)."""
    from chatsft.errors import UserError

    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise UserError(f"{what} do not match the model of model.name_or_path / method: "
                        f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
