"""Sequence parallelism (`scaling.sequence_parallel: N`), Ulysses-style.

N consecutive ranks of one node form a sequence group. They read the same rows
(their data-parallel rank is rank // N, of world / N), each row padded to a
multiple of N and cut into N equal parts after its labels were shifted once on
the whole row (chatsft.model.batch.shard_sequence): rank i of the group runs
the model on part i, with that part's global position_ids (RoPE is right as
is). Around attention an all-to-all turns [all heads, L/N tokens] into
[H/N heads, all L tokens], attention runs over the whole row for those heads
with the whole row's mask (causal; block-diagonal for packed rows, rebuilt
from the gathered global position_ids, since the model only saw its part), and
a second all-to-all turns the result back.

Why the engine needs no change: parameters stay replicated on every rank; the
all-to-all's backward sends each part's attention gradient back to the rank
that computed its q/k/v, so rank r's gradient is the whole loss's gradient
through the tokens of part r, and the sum over all ranks (what ZeRO and DDP
reduce, as an average over the world that the loop's world / N scaling
undoes) is the gradient of the step. Each rank's loss is the summed
cross-entropy of its own learned positions; the loop's count of learned
tokens, all-reduced over the world, is the whole step's as before.

DeepSpeed's own Ulysses (deepspeed.runtime.sequence_parallel.ulysses_sp, ALST)
was read and not used: it drops the mask for sdpa (packed rows would attend
across their borders), it replaces the process-wide `sdpa` entry (every model
of the process), and it builds its groups through deepspeed.comm's mpu. This
is the same all-to-all on torch.distributed's differentiable collective,
registered under its own name in transformers' AttentionInterface and set on
this model only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from chatsft.errors import UserError

NAME = "chatsft_sequence_parallel"  # the attention implementation this module registers
_UNSET = object()


@dataclass
class SequenceGroup:
    """This rank's place in the layout: world = data-parallel x sequence-parallel."""

    size: int  # N: ranks sharing one sequence
    index: int  # this rank's part of each sequence (rank % N)
    dp_rank: int  # rank // N: which rows this rank reads
    dp_world: int  # world // N: how many readers of distinct rows
    group: Any = None  # the torch.distributed group of the N ranks (None when N == 1)
    # (this forward's local position_ids, the whole row's, its mask or _UNSET): every layer, and a
    # checkpointed layer's recompute, sees the same local tensor
    _cache: Any = field(default=None, repr=False)

    @property
    def on(self) -> bool:
        return self.size > 1


def start(rank: int, world: int, size: int, node_ids: Optional[list[str]] = None) -> SequenceGroup:
    """The group of `rank` (collective when size > 1: every rank creates every group, in order).
    `node_ids` (rank order) checks that each group sits on one node."""
    if world % size:
        raise UserError(f"scaling.sequence_parallel={size}: does not divide the {world} workers; "
                        f"use a worker count that is a multiple of {size}")
    sg = SequenceGroup(size, rank % size, rank // size, world // size)
    if size == 1:
        return sg
    if node_ids is not None:
        for first in range(0, world, size):
            nodes = set(node_ids[first:first + size])
            if len(nodes) > 1:
                raise UserError(f"scaling.sequence_parallel={size}: ranks {first}-{first + size - 1} share "
                                f"sequences but run on {len(nodes)} nodes; give every node a multiple of "
                                f"{size} workers (scaling.resources_per_worker, placement)")
    for first in range(0, world, size):
        g = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            sg.group = g
    return sg


# ----------------------------------------------------------------------- the model


def enable(model: Any, sg: SequenceGroup) -> str:
    """Switch `model` (a Hugging Face model or a PEFT wrapper of one) to the sequence-parallel
    attention of `sg`; returns the attention it wraps ('' when N == 1)."""
    if not sg.on:
        return ""
    from transformers import AttentionInterface

    base = _base(model)
    text = base.config.get_text_config()
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text, key, None)
        if heads is None or heads % sg.size:
            raise UserError(f"scaling.sequence_parallel={sg.size}: the model's {key}={heads} is not divisible "
                            f"by {sg.size}")
    core = base.config._attn_implementation
    if core in (None, NAME):
        core = "sdpa"
    core = core if core.startswith("flash_attention") else "sdpa"  # eager would need an additive mask
    AttentionInterface.register(NAME, _attention(sg, core))
    base._chatsft_attention = base.config._attn_implementation
    base.set_attn_implementation(NAME)
    return core


@contextlib.contextmanager
def plain(model: Any):
    """The model's own attention for the duration (generation on one rank, export)."""
    base = _base(model)
    was = base.config._attn_implementation
    if was != NAME:
        yield
        return
    base.set_attn_implementation(base._chatsft_attention)
    try:
        yield
    finally:
        base.set_attn_implementation(NAME)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention(sg: SequenceGroup, core: str):
    from transformers import AttentionInterface

    core_fn = AttentionInterface()[core]
    n, group = sg.size, sg.group

    def attention(module, query, key, value, attention_mask, **kwargs):
        # query [B, H, L/N, D], key/value [B, Hkv, L/N, D]: this rank's tokens, every head
        local = kwargs.pop("position_ids", None)
        if local is None:
            raise RuntimeError("sequence parallelism needs position_ids in every forward (shard_sequence)")
        whole = _whole_positions(sg, local)
        q, k, v = (_heads_to_sequence(t, group, n) for t in (query, key, value))
        if core == "sdpa":
            out, weights = core_fn(module, q, k, v, _whole_mask(sg, local, whole), **kwargs)
        else:  # flash attention finds packed borders in the whole row's position_ids itself
            out, weights = core_fn(module, q, k, v, None, position_ids=whole, **kwargs)
        # out [B, L, H/N, D] -> this rank's tokens, every head: [B, L/N, H, D]
        out = _sequence_to_heads(out.transpose(1, 2), group, n).transpose(1, 2)
        return out.contiguous(), weights

    return attention


def _whole_positions(sg: SequenceGroup, local):
    """The whole row's position_ids [B, L] from every rank's part (once per forward)."""
    if sg._cache is not None and sg._cache[0] is local:
        return sg._cache[1]
    parts = [torch.empty_like(local) for _ in range(sg.size)]
    dist.all_gather(parts, local.contiguous(), group=sg.group)
    whole = torch.cat(parts, dim=1)
    sg._cache = (local, whole, _UNSET)
    return whole


def _whole_mask(sg: SequenceGroup, local, whole):
    """None (plain causal) when no row holds more than one sequence, else the block-diagonal
    causal mask [B, 1, L, L] that transformers builds for a packed row (the same borders:
    masking_utils.find_packed_sequence_indices)."""
    from transformers.masking_utils import find_packed_sequence_indices

    if sg._cache[2] is not _UNSET:
        return sg._cache[2]
    seq = find_packed_sequence_indices(whole)
    mask = None
    if seq is not None:
        length = whole.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=whole.device).tril()
        mask = (causal[None] & (seq[:, :, None] == seq[:, None, :]))[:, None]
    sg._cache = (local, whole, mask)
    return mask


def _heads_to_sequence(x, group, n: int):
    """[B, H, L/N, D] on each rank -> [B, H/N, L, D]: this rank's heads over the whole row."""
    b, h, part, d = x.shape
    send = x.reshape(b, n, h // n, part, d).transpose(0, 1).contiguous()  # [N, B, H/N, L/N, D]: to rank j
    got = _exchange(send, group)  # got[i]: rank i's tokens, this rank's heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * part, d)


def _sequence_to_heads(y, group, n: int):
    """[B, H/N, L, D] -> [B, H, L/N, D]: every head over this rank's tokens (the inverse)."""
    b, h, length, d = y.shape
    send = y.reshape(b, h, n, length // n, d).permute(2, 0, 1, 3, 4).contiguous()  # [N, B, H/N, L/N, D]
    got = _exchange(send, group)  # got[i]: rank i's heads, this rank's tokens
    return got.transpose(0, 1).reshape(b, n * h, length // n, d)


def _exchange(send, group):
    """Differentiable all-to-all along dim 0 (part j to rank j): its gradient is the same exchange
    of the incoming gradient. (torch.distributed.nn.functional's is deprecated, and the
    replacement torch names lives in a private module.)"""
    return _AllToAll.apply(send, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x, group):
    x = x.contiguous()  # first: empty_like keeps a permuted gradient's strides, the collective does not
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out
