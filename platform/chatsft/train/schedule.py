"""Learning-rate schedules as pure functions of the optimizer step.

The loop sets each param group's lr to base_lr * multiplier(step) before every
optimizer step, rather than keeping a scheduler object: the schedule then
needs no state in checkpoints, and steps that are skipped (no supervised
token, non-finite gradients) do not shift it.
"""

from __future__ import annotations

import math
from typing import Any


def total_steps(rows: int, global_batch: int, epochs: int, max_steps: int) -> int:
    per_epoch = max(1, math.ceil(rows / global_batch))
    total = epochs * per_epoch
    return min(total, max_steps) if max_steps > 0 else total


def warmup_steps(train: Any, total: int) -> int:
    if train.warmup_steps > 0:
        return min(train.warmup_steps, total)
    return int(train.warmup_ratio * total)


def lr_multiplier(step: int, total: int, train: Any) -> float:
    """Multiplier of train.lr (and of each group's lr) for optimizer step `step` (0-based)."""
    total = max(total, 1)
    if train.schedule == "linear":
        # nanochat SFT: start at init_lr_frac and decay linearly to zero at the end
        return train.init_lr_frac * (1.0 - step / total)
    warm = warmup_steps(train, total)
    if step < warm:
        return (step + 1) / warm
    if train.schedule == "constant":
        return 1.0
    # cosine from 1 at the end of warmup to min_lr_frac at the last step
    span = max(total - warm, 1)
    progress = min((step - warm) / span, 1.0)
    floor = train.min_lr_frac
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
