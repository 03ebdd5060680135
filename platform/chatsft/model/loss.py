"""The token loss: labels shifted once, here; a sum and a count, never a mean.

An optimizer step divides the summed token losses of all its micro-batches on
all workers by the number of their supervised tokens (all-reduced); returning
the sum and the count lets the loop do that division once, so the split into
micro-batches, accumulation steps and workers does not change the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from chatsft.data.schema import IGNORE


def causal_targets(labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """For a causal LM, the label each logit position predicts: labels[t + 1] at position t.

    The last position predicts nothing. In packed rows the first token of each
    packed sequence (position_ids == 0) is never a target: predicting it would
    read across the border from the previous sequence.
    """
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts = position_ids[:, 1:] == 0
        targets[:, :-1] = targets[:, :-1].masked_fill(starts, IGNORE)
    return targets


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of supervised tokens); both 0 when nothing is supervised.

    `targets` are aligned with `logits` (see causal_targets). Logits longer than
    the targets (prompt tuning prepends virtual tokens) are cut to their tail.
    The cross-entropy is computed in fp32 whatever the model's dtype.
    """
    if logits.shape[1] != targets.shape[1]:
        logits = logits[:, -targets.shape[1]:]
    flat_t = targets.reshape(-1)
    count = (flat_t != IGNORE).sum()
    if int(count) == 0:
        # zero with a graph, so backward still runs (every rank must take part)
        return logits.sum() * 0.0, count
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_t,
                            ignore_index=IGNORE, reduction="sum")
    return total, count
