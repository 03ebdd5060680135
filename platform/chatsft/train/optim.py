"""The optimizer: AdamW over trainable parameters grouped by role (per-group lr) and decay."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatsft.config import TrainConfig


def param_groups(model, train_cfg: "TrainConfig") -> list[dict]:
    """Trainable parameters grouped by role and decay, for AdamW.

    Roles: `embeddings` (the input embedding module, including LoRA/modules_to_save
    pieces inside it), `head` (the output embeddings when they are not the same tensor
    as the input ones), `matrices` (everything else, prompt tuning's virtual tokens
    too). Learning rate: `train.lr_groups.<role>` or `train.lr`. Weight decay applies
    to tensors of 2 or more dimensions only (never norms, biases or other vectors).
    Each group: {"name": "<role>/decay|no_decay", "params", "lr", "weight_decay"};
    empty groups are left out, every trainable parameter is in exactly one group.
    """
    embed_ids = _module_param_ids(model.get_input_embeddings())
    head_ids = _module_param_ids(model.get_output_embeddings()) - embed_ids
    buckets: dict[tuple[str, bool], list] = {}
    for _, p in model.named_parameters():  # shared (tied) tensors come once
        if not p.requires_grad:
            continue
        role = "embeddings" if id(p) in embed_ids else "head" if id(p) in head_ids else "matrices"
        # ZeRO-3 partitioned parameters are flat; ds_shape keeps the real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        buckets.setdefault((role, ndim >= 2), []).append(p)
    groups = []
    for role in ("embeddings", "head", "matrices"):
        lr = getattr(train_cfg.lr_groups, role)
        for decay in (True, False):
            params = buckets.get((role, decay))
            if params:
                groups.append({
                    "name": f"{role}/{'decay' if decay else 'no_decay'}",
                    "params": params,
                    "lr": train_cfg.lr if lr is None else lr,
                    "weight_decay": train_cfg.weight_decay if decay else 0.0,
                })
    return groups


def _module_param_ids(module) -> set[int]:
    return set() if module is None else {id(p) for p in module.parameters()}


def adamw(groups: list[dict], train: "TrainConfig", fused: bool = False):
    """torch's AdamW over `groups` (the DeepSpeed engine brings its own CPU Adam for offload)."""
    import torch

    kwargs = adamw_settings(train)
    if fused:  # one kernel for all parameters (CUDA and CPU): ~6x the loop's speed on CPU
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def adamw_settings(train: "TrainConfig") -> dict:
    return dict(lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay)
