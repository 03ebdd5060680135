"""The token loss: labels shifted once, here; a sum and a count, never a mean.

An optimizer step divides the summed token losses of all its micro-batches on
all workers by the number of their supervised tokens (all-reduced); returning
the sum and the count lets the loop do that division once, so the split into
micro-batches, accumulation steps and workers does not change the gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

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


# ------------------------------------------------------------------ the loss head
#
# In SFT only the learned positions carry loss (often a third to a half of a packed
# row), yet a plain forward projects every position onto the vocabulary: for a
# Qwen2.5-0.5B shape (vocab 151,936 x 896) that is about a quarter of the forward
# FLOPs and ~1.2 GB of fp32 logits per 2048-token row, kept for backward. The
# learned head projects only the learned positions, a chunk at a time, and
# computes the gradient of each chunk while its logits are at hand, so no
# [tokens, vocab] tensor ever exists and backward has nothing to recompute.

LossFn = Callable[[Callable[[dict], Any], dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# chunk 0 (auto): rows of fp32 logits that fit this many bytes
CHUNK_BYTES = 256 * 2**20
# config attributes of architectures that transform the head's output (softcapping,
# scaling) before returning logits: a loss computed inside the head would skip that
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def full_loss(forward: Callable[[dict], Any], inputs: dict, targets: torch.Tensor):
    """(sum, count) from the model's full logits: the reference the learned head must equal."""
    return token_loss(forward(inputs).logits, targets)


def loss_function(model: torch.nn.Module, head: str = "learned", chunk: int = 0,
                  device: Any = "cpu") -> tuple[LossFn, str]:
    """The loss of training and validation for `model`: (fn, what it is in words).

    fn(forward, inputs, targets) -> (sum of token cross-entropies, supervised tokens),
    where `forward(inputs)` runs the model (an engine, DDP or the model itself).
    head `learned` (and the `liger` / `cce` kernels) turns the model's own output layer
    into a `LearnedHead` (same parameters and state-dict keys) when it is a plain
    nn.Linear and the architecture returns its output unchanged; otherwise, and for
    `full`, the full logits are used.
    """
    if head == "full":
        return full_loss, "full logits (train.loss_head=full)"
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head == "cce" and getattr(out, "bias", None) is not None:
        from chatsft.errors import UserError

        raise UserError("train.loss_head=cce: Cut Cross-Entropy takes no output bias and this model's output "
                        "layer has one; use train.loss_head=liger or learned")
    kernel = _kernel(head, torch.device(device)) if head in KERNELS else None
    config = getattr(model, "config", None)
    transform = next((a for a in _LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)), None)
    if out is None or type(out) not in (torch.nn.Linear, LearnedHead) or transform:
        why = f"the model's config sets {transform}" if transform else \
            f"the output layer is a {type(out).__name__}, not a plain Linear"
        return full_loss, f"full logits ({why})"
    out.__class__ = LearnedHead  # a subclass with no state of its own: nothing else changes
    size = chunk or max(64, CHUNK_BYTES // (4 * out.out_features))

    def learned_loss(forward: Callable[[dict], Any], inputs: dict, targets: torch.Tensor):
        out._job = (targets, size, kernel)
        try:
            total = forward(inputs).logits
        finally:
            out._job = None
        if total.dim() != 0:
            raise RuntimeError("the learned loss head was not called by the model's forward")
        return total, (targets != IGNORE).sum()

    if kernel is not None:
        return learned_loss, f"learned positions only, {KERNELS[head][0]}'s kernel (train.loss_head={head})"
    return learned_loss, f"learned positions only, in chunks of {size} tokens"


# train.loss_head -> (the kernel's name, its package on PyPI)
KERNELS = {"liger": ("Liger fused linear cross-entropy", "liger-kernel"),
           "cce": ("Cut Cross-Entropy", "cut-cross-entropy")}


def _kernel(head: str, device: torch.device) -> Callable:
    """A fused GPU kernel with learned_cross_entropy's signature: sum of token CEs of the rows."""
    from chatsft.errors import UserError

    name, package = KERNELS[head]
    if device.type != "cuda":
        raise UserError(f"train.loss_head={head}: {name} is a CUDA (Triton) kernel and this worker runs on "
                        f"{device.type}; use train.loss_head=learned (the same loss, chunked)")
    try:
        if head == "liger":
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
            return lambda hidden, weight, bias, targets, chunk: fused(weight, hidden, targets, bias).float()
        from cut_cross_entropy import linear_cross_entropy

        def cce(hidden, weight, bias, targets, chunk):  # no bias: loss_function refuses a head with one
            if torch.is_autocast_enabled(hidden.device.type):  # its kernels take the dtype they are given
                dtype = torch.get_autocast_dtype(hidden.device.type)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction="sum").float()

        return cce
    except ImportError:
        raise UserError(f"train.loss_head={head}: the {package} package is not installed here: "
                        f"pip install {package}, or use train.loss_head=learned") from None


class LearnedHead(torch.nn.Linear):
    """A model's own nn.Linear output layer that, while a loss function has set `_job`, returns
    the summed cross-entropy of the learned positions instead of logits; otherwise
    (generation, export) it is the plain Linear."""

    _job: Optional[tuple[torch.Tensor, int, Optional[Callable]]] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        job = self._job
        if job is None:
            return super().forward(hidden)
        self._job = None  # one forward per job
        targets, chunk, kernel = job
        if hidden.shape[1] > targets.shape[1]:
            hidden = hidden[:, -targets.shape[1]:]  # prompt tuning's virtual tokens come first
        if hidden.shape[:2] != targets.shape:
            raise RuntimeError(f"learned loss head: hidden states {tuple(hidden.shape)} do not match "
                               f"targets {tuple(targets.shape)}")
        keep = targets != IGNORE
        if kernel is not None and bool(keep.any()):  # (an empty row set is the chunked path's job)
            return kernel(hidden[keep], self.weight, self.bias, targets[keep], chunk)
        return learned_cross_entropy(hidden[keep], self.weight, self.bias, targets[keep], chunk)


def learned_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T + bias, targets[i]) in fp32, `chunk` rows at a time; 0 for no rows."""
    wanted = (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if torch.is_grad_enabled() and wanted:
        return _ChunkedCE.apply(hidden, weight, bias, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start:start + chunk], weight, bias).float()
        t = targets[start:start + chunk]
        total += (torch.logsumexp(logits, -1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
    return total


class _ChunkedCE(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients (softmax - onehot, through
    the projection); backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # Under autocast the projections below run in its dtype; an in-place addmm_ is never
        # autocast, so the weight gradient's matmul is cast by hand (in fp32 it was the slowest
        # matmul of a GPU step) and accumulated in the weight's own dtype.
        device = hidden.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            p = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            p[torch.arange(len(t), device=t.device), t] -= 1.0
            if need_h:
                grad_h[start:start + chunk] = p.to(weight.dtype) @ weight
            if need_w and cast is not None:
                grad_w += p.t().to(cast) @ h.to(cast)
            elif need_w:
                grad_w.addmm_(p.t().to(h.dtype), h)
            if need_b:
                grad_b += p.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b.to(bias.dtype) if need_b else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = tuple(g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None)
