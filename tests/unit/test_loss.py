"""The token loss: one shift, packed borders masked, a sum and a count (never a mean), no NaN."""

import math

import torch
import torch.nn.functional as F

from chatsft.data.schema import IGNORE
from chatsft.model.loss import causal_targets, token_loss


def test_causal_targets_shift_once():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7]])
    t = causal_targets(labels)
    # position t predicts labels[t + 1]; the last position predicts nothing
    assert t.tolist() == [[IGNORE, 5, 6, 7, IGNORE]]


def test_packed_border_is_never_a_target():
    # two packed sequences: [1 2 3] and [4 5]; every token supervised (train_on: all_tokens)
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    t = causal_targets(labels, pos)
    # position 2 (last of seq 1) must not learn to predict 4 (first of seq 2)
    assert t.tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    # without position_ids the border would be crossed
    assert causal_targets(labels).tolist() == [[2, 3, 4, 5, IGNORE]]


def test_loss_is_sum_and_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[1, IGNORE, 3, IGNORE], [IGNORE, IGNORE, 6, 2]])
    total, count = token_loss(logits, targets)
    assert int(count) == 4
    mean = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(total, mean * 4, atol=1e-6)


def test_split_invariance_of_sum_over_count():
    """Sum of per-micro-batch sums / total count == loss of the whole batch, whatever the split."""
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 11)
    targets = torch.randint(0, 11, (4, 6))
    targets[torch.rand(4, 6) < 0.5] = IGNORE
    whole, n = token_loss(logits, targets)
    parts = [token_loss(logits[i:i + 1], targets[i:i + 1]) for i in range(4)]
    assert int(sum(c for _, c in parts)) == int(n)
    assert torch.allclose(sum(s for s, _ in parts) / n, whole / n, atol=1e-6)


def test_no_supervised_token_gives_zero_not_nan():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    targets = torch.full((1, 3), IGNORE)
    total, count = token_loss(logits, targets)
    assert int(count) == 0 and float(total.detach()) == 0.0 and not math.isnan(float(total.detach()))
    total.backward()  # still differentiable: every rank can run its backward
    assert torch.all(logits.grad == 0)


def test_longer_logits_use_the_tail():
    # prompt tuning prepends virtual tokens: logits are longer than the targets
    logits = torch.randn(1, 5, 4)
    targets = torch.tensor([[IGNORE, 2, 3]])
    total, count = token_loss(logits, targets)
    ref, _ = token_loss(logits[:, 2:], targets)
    assert int(count) == 2 and torch.allclose(total, ref)
