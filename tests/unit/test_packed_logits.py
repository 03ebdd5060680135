"""Packed rows: attention stays inside each packed sequence, so logits and loss equal the unpacked ones."""

import numpy as np
import pytest
import torch

from chatsft.data.render import render_conversation
from chatsft.sources import read_local
from chatsft.data.schema import Row
from chatsft.model.batch import collate
from chatsft.model.loss import token_loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_llama_dir, tokenizer, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    samples = []
    for conv in read_local("chatsft://samples/train.jsonl", limit=3):
        samples += render_conversation(conv, tokenizer, "chatml").samples
    singles = [Row(s.input_ids.astype(np.int64), s.labels.astype(np.int64)) for s in samples]
    packed = Row(np.concatenate([r.input_ids for r in singles]), np.concatenate([r.labels for r in singles]),
                 np.concatenate([np.arange(len(r.input_ids)) for r in singles]))
    with torch.no_grad():
        pb = collate([packed], pad_id=tokenizer.pad_token_id)
        p_logits = model(**pb.inputs, use_cache=False).logits[0]
        ub = collate(singles, pad_id=tokenizer.pad_token_id)  # padded batch with a mask
        u_logits = model(**ub.inputs, use_cache=False).logits
    at = 0
    for i, r in enumerate(singles):
        n = len(r.input_ids)
        torch.testing.assert_close(p_logits[at:at + n], u_logits[i, :n], rtol=1e-4, atol=1e-4)
        at += n
    # and the loss: same sum, same count
    ps, pc = token_loss(p_logits[None], pb.targets)
    us, uc = token_loss(u_logits, ub.targets)
    assert int(pc) == int(uc) > 0
    torch.testing.assert_close(ps, us, rtol=1e-5, atol=1e-4)


def test_packing_without_position_ids_would_differ(tiny_llama_dir, tokenizer):
    """The check above can fail: attention across the border changes the second sequence's logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    a = torch.tensor([[5, 6, 7, 8]])
    b = torch.tensor([[9, 10, 11]])
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits[0]
        crossed = model(input_ids=torch.cat([a, b], 1), use_cache=False).logits[0, 4:]
        masked = model(input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]]),
                       use_cache=False).logits[0, 4:]
    assert not torch.allclose(alone, crossed, atol=1e-3)
    torch.testing.assert_close(alone, masked, rtol=1e-4, atol=1e-4)
