"""Training rows -> the tensors of one micro-batch, right-padded, with targets aligned to the logits.

Shared by training and evaluation, so the loss of a row is computed the same way in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from chatsft.data.schema import IGNORE, Row


@dataclass
class Batch:
    """Tensors of one micro-batch, ready for the model; `targets` are aligned with the logits."""

    inputs: dict[str, Any]
    targets: Any  # LongTensor [B, T]: the label each logit position predicts, IGNORE elsewhere
    num_targets: int
    tokens: int  # tokens of real rows, padding excluded (throughput)
    slots: int  # token positions the model computes (padding included)


def collate(rows: Sequence[Row], *, pad_id: int, multiple: int = 1) -> Batch:
    """Pad a micro-batch of a decoder-only model on the right. Rows carry no attention mask:
    packed rows carry position_ids (attention is then block-diagonal per packed sequence);
    unpacked rows need nothing but causality, since right padding only ever follows a row's
    real tokens, which causal attention never lets them see. A mask would change no logit or
    gradient of a real token, and it costs: it turns attention off its causal kernel onto a
    masked one (fwd+bwd of the tiny Llama on 16 padded rows: 1.3x slower with the mask).

    `multiple`: rows are padded to a multiple of it (sequence parallelism splits each row into
    that many equal parts, `shard_sequence`)."""
    import torch

    from chatsft.model.loss import causal_targets

    tokens = sum(len(r.input_ids) for r in rows)
    rows = [_fill_empty(r, pad_id) for r in rows]
    length = -(-max(len(r.input_ids) for r in rows) // multiple) * multiple
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    packed = any(r.position_ids is not None for r in rows)
    if packed:
        pos = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.from_numpy(r.input_ids)
        labels[i, :n] = torch.from_numpy(r.labels)
        if packed:
            p = r.position_ids if r.position_ids is not None else np.arange(n)
            pos[i, :n] = torch.from_numpy(np.asarray(p, dtype=np.int64))
            # padding is a sequence of its own (positions restart at 0): it never
            # joins the block of the last real sequence
            pos[i, n:] = torch.arange(length - n)
    if packed:
        inputs = {"input_ids": ids, "position_ids": pos}
        targets = causal_targets(labels, pos)
    else:
        inputs = {"input_ids": ids}
        targets = causal_targets(labels, None)
    return _batch(inputs, targets, tokens)


def collate_pairs(rows: Sequence[Row], *, pad_id: int, decoder_start: Callable) -> Batch:
    """Pad a micro-batch of an encoder-decoder model on the right: encoder inputs and decoder
    targets separately. Encoders read their padding both ways, so they keep their mask."""
    import torch

    tokens = sum(len(r.input_ids) + len(r.labels) for r in rows)
    rows = [_fill_empty(r, pad_id) for r in rows]
    enc_len = max(len(r.input_ids) for r in rows)
    dec_len = max(len(r.labels) for r in rows)
    ids = torch.full((len(rows), enc_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), enc_len), dtype=torch.long)
    labels = torch.full((len(rows), dec_len), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.input_ids)] = torch.from_numpy(r.input_ids)
        mask[i, :len(r.input_ids)] = 1
        labels[i, :len(r.labels)] = torch.from_numpy(r.labels)
    # The decoder reads the labels shifted right: that shift is the model's own
    # (prepare_decoder_input_ids_from_labels); logits are then aligned with labels.
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_start(labels)}
    return _batch(inputs, labels, tokens)


def _batch(inputs: dict[str, Any], targets: Any, tokens: int) -> Batch:
    num = int((targets != IGNORE).sum())
    slots = sum(int(v.numel()) for k, v in inputs.items() if k in ("input_ids", "decoder_input_ids"))
    return Batch(inputs, targets, num, tokens, slots)


def shard_sequence(batch: Batch, index: int, parts: int) -> Batch:
    """Part `index` of `parts` equal parts of a causal micro-batch along the sequence (sequence
    parallelism; collate padded it to a multiple of `parts`). The targets were shifted on the
    whole row before the split, so the last token of a part still predicts the first of the next.
    Every part carries its global position_ids (unpacked rows: 0..L-1 cut the same way), which
    RoPE reads and from which the sequence-parallel attention rebuilds the whole row's mask.
    `tokens` is shared out so that the parts' sum is the batch's."""
    import torch

    if parts == 1:
        return batch
    ids = batch.inputs["input_ids"]
    length = ids.shape[1]
    if length % parts:
        raise ValueError(f"sequence length {length} is not a multiple of {parts}: collate(multiple={parts})")
    pos = batch.inputs.get("position_ids")
    if pos is None:
        pos = torch.arange(length, dtype=torch.long).expand_as(ids)
    size = length // parts
    cut = slice(index * size, (index + 1) * size)
    targets = batch.targets[:, cut].contiguous()
    inputs = {"input_ids": ids[:, cut].contiguous(), "position_ids": pos[:, cut].contiguous()}
    tokens = batch.tokens // parts + (1 if index < batch.tokens % parts else 0)
    return Batch(inputs, targets, int((targets != IGNORE).sum()), tokens, int(inputs["input_ids"].numel()))


def _fill_empty(row: Row, pad_id: int) -> Row:
    """An empty filler row becomes one pad token without loss (a forward still runs)."""
    if not row.empty:
        return row
    pos = None if row.position_ids is None else np.zeros(1, np.int64)
    return Row(np.full(1, pad_id, np.int64), np.full(1, IGNORE, np.int64), pos)


def pad_id(tokenizer: Any) -> int:
    """The id rows are padded with: the tokenizer's pad token (load_tokenizer sets one), else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def decoder_start(model: Any) -> Callable:
    """An encoder-decoder model's own labels -> decoder inputs shift (through PEFT wrappers)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.prepare_decoder_input_ids_from_labels if hasattr(hf, "prepare_decoder_input_ids_from_labels") \
        else hf._shift_right
