"""Packed rows: sequences side by side in one row, position_ids restarting at 0 and
attention_mask=None, give each sequence the logits it gets alone (eager and sdpa)."""

from __future__ import annotations

import pytest
import torch

from chatsft.config import load_config
from chatsft.model import load_model


@pytest.fixture(autouse=True)
def _cpu_rules(monkeypatch):
    # These tests pin the CPU behaviour (fp32 loads, no flash attention) on any machine;
    # the GPU rules are checked in test_model_gpu.py.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(1)


def seqs(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def packed_row(parts):
    ids = torch.cat(parts)[None]
    pos = torch.cat([torch.arange(len(p)) for p in parts])[None]
    return ids, pos


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked(tiny_llama_dir, attn):
    model = load_model(load_config(None, ["method.name=full", f"model.attn_implementation={attn}"]), "causal").eval()
    assert model.config._attn_implementation == attn
    vocab = model.get_input_embeddings().num_embeddings
    # Two rows: [9, 6, 1] and [5, 11] tokens (a 1-token sequence is its own segment too).
    rows = [seqs(vocab, [9, 6, 1], seed=1), seqs(vocab, [5, 11], seed=2)]
    with torch.no_grad():
        alone = [[model(input_ids=p[None]).logits[0] for p in row] for row in rows]
        ids, pos = zip(*(packed_row(row) for row in rows))
        packed = model(input_ids=torch.cat(ids), position_ids=torch.cat(pos), attention_mask=None).logits
        plain = model(input_ids=torch.cat(ids)).logits  # one causal sequence per row
    for r, row in enumerate(rows):
        start = 0
        for i, part in enumerate(row):
            end = start + len(part)
            torch.testing.assert_close(packed[r, start:end], alone[r][i], rtol=1e-4, atol=1e-5)
            start = end
    # The check has teeth: without the borders a later sequence sees the earlier ones.
    assert (plain[0, 9:15] - alone[0][1]).abs().max() > 1e-3


def test_packed_gradients_equal_unpacked(tiny_llama_dir):
    """The loss gradient of a packed row is the sum of the per-sequence gradients."""
    cfg = load_config(None, ["method.name=full", "model.attn_implementation=sdpa"])
    model = load_model(cfg, "causal").eval()
    vocab = model.get_input_embeddings().num_embeddings
    parts = seqs(vocab, [7, 10], seed=3)

    def token_loss_sum(logits, ids):
        return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")

    total = sum(token_loss_sum(model(input_ids=p[None]).logits[0], p) for p in parts)
    total.backward()
    ref = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    ids, pos = packed_row(parts)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=None).logits[0]
    # The label shift must not cross the border: sum each sequence's own shifted loss.
    loss = token_loss_sum(logits[:7], parts[0]) + token_loss_sum(logits[7:], parts[1])
    loss.backward()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_right_padded_rows_need_no_mask(tiny_llama_dir, attn):
    """collate pads on the right and passes no attention mask: every real token's logits and
    the loss gradient are those of each row alone."""
    import numpy as np

    from chatsft.data.schema import IGNORE, Row
    from chatsft.model.batch import collate
    from chatsft.model.loss import full_loss

    model = load_model(load_config(None, ["method.name=full", f"model.attn_implementation={attn}"]), "causal")
    vocab = model.get_input_embeddings().num_embeddings
    parts = seqs(vocab, [12, 5, 9], seed=4)
    rows = [Row(p.numpy(), np.where(np.arange(len(p)) < 3, IGNORE, p.numpy())) for p in parts]
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch.inputs and batch.inputs["input_ids"].shape == (3, 12)

    def loss_and_grad(fn):
        model.zero_grad(set_to_none=True)
        total, count = fn()
        total.backward()
        return total.detach(), int(count), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    got = loss_and_grad(lambda: full_loss(lambda x: model(**x), batch.inputs, batch.targets))
    alone = [loss_and_grad(lambda b=collate([r], pad_id=0): full_loss(lambda x: model(**x),
                                                                                      b.inputs, b.targets))
             for r in rows]
    assert got[1] == sum(a[1] for a in alone) == (12 - 3) + (5 - 3) + (9 - 3)  # n - 3 targets a row
    torch.testing.assert_close(got[0], sum(a[0] for a in alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], sum(a[2] for a in alone), rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the check has teeth: with left padding and no mask, a row would see its pads
        left = torch.zeros(1, 12, dtype=torch.long)
        left[0, 7:] = parts[1]
        assert (model(input_ids=left).logits[0, -1] - model(input_ids=parts[1][None]).logits[0, -1]).abs().max() > 1e-3
