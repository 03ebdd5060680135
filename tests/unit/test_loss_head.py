"""The learned loss head (train.loss_head=learned): the same sum, count and gradients as the full
logits, to fp32 rounding, on the tiny Llama and a Qwen2.5-0.5B-shaped model (the full 151,936
vocabulary), packed and unpacked, with LoRA and prompt tuning, and a micro-batch with no learned token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatsft.config import load_config
from chatsft.data.render import render_conversation
from chatsft.data.schema import IGNORE, Row
from chatsft.model import load_model
from chatsft.model.batch import collate
from chatsft.model.loss import LearnedHead, full_loss, learned_cross_entropy, loss_function
from chatsft.sources import read_local

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def sample_rows(tokenizer, n=4):
    rows = []
    for conv in read_local("chatsft://samples/train.jsonl", limit=n):
        rows += [Row(s.input_ids.astype(np.int64), s.labels.astype(np.int64))
                 for s in render_conversation(conv, tokenizer, "chatml").samples]
    return rows


def packed(rows):
    return [Row(np.concatenate([r.input_ids for r in rows]), np.concatenate([r.labels for r in rows]),
                np.concatenate([np.arange(len(r.input_ids)) for r in rows]))]


def run(model, loss, batch):
    """(sum, count, {name: grad}) of one forward + backward of `loss` on `batch`; backward of the sum
    over the count, as the loop does (sum x world / N), so gradients have the scale training sees."""
    model.zero_grad(set_to_none=True)
    total, count = loss(lambda inputs: model(**inputs, use_cache=False), batch.inputs, batch.targets)
    (total / max(int(count), 1)).backward()
    # zero_grad(set_to_none) of the next run replaces these tensors rather than zeroing them
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), int(count), grads


def assert_same(model, batch, chunk=0):
    learned, how = loss_function(model, "learned", chunk)
    assert how.startswith("learned"), how
    assert isinstance(model.get_output_embeddings(), LearnedHead)
    ref_sum, ref_count, ref_grads = run(model, full_loss, batch)
    got_sum, got_count, got_grads = run(model, learned, batch)
    assert got_count == ref_count == batch.num_targets
    torch.testing.assert_close(got_sum, ref_sum, rtol=RTOL, atol=ATOL)
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for name, ref in ref_grads.items():
        # fp32 rounding of sums in another order: absolute error grows with the tensor's scale
        atol = ATOL * max(1.0, float(ref.abs().max()))
        # assert_close's own test of the 136M-entry embedding gradient of the Qwen-shaped
        # model takes seconds; the same bound in two tensor ops does not. It still reports.
        if float(((got_grads[name] - ref).abs() - (atol + RTOL * ref.abs())).max()) > 0:
            torch.testing.assert_close(got_grads[name], ref, rtol=RTOL, atol=atol,
                                       msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # evaluation takes the no-grad path of the same head
        ev, ev_count = learned(lambda inputs: model(**inputs, use_cache=False), batch.inputs, batch.targets)
    assert ev_count == ref_count
    torch.testing.assert_close(ev, ref_sum, rtol=RTOL, atol=ATOL)
    return ref_grads


# --------------------------------------------------------------------- the function


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_cross_entropy_equals_torch(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (10,), generator=g)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.37, (h, w, b))
    got = learned_cross_entropy(h, w, b, t, chunk)
    grads = torch.autograd.grad(got * 0.37, (h, w, b))  # the incoming gradient scales them
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)


def test_under_autocast_every_matmul_of_the_head_runs_in_its_dtype():
    """fp32 weights under bf16 autocast (the torch engine's bf16 with master weights): the head's
    matmuls run in bf16 as the full path's do, the weight gradient's included (an in-place
    addmm_ is never autocast: in fp32 it was the slowest matmul of a GPU step); the loss and
    gradients are the full path's to bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.dtypes |= {a.dtype for a in args[-2:]}
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (12,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        ref_grads = torch.autograd.grad(ref, (h, w))
        with Matmuls() as seen:
            got = learned_cross_entropy(h, w, None, t, 5)
            grads = torch.autograd.grad(got, (h, w))
    assert seen.dtypes == {torch.bfloat16}
    assert got.dtype == torch.float32 and all(x.dtype == torch.float32 for x in grads)
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ the tiny Llama


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg = load_config(None, ["train.precision=fp32"])
    from chatsft.model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    return cfg, tok


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_tiny_llama_same_loss_and_gradients(tiny, pack, chunk):
    cfg, tok = tiny
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=tok)
    rows = sample_rows(tok)
    batch = collate(packed(rows) if pack else rows, pad_id=tok.pad_token_id)
    assert ("position_ids" in batch.inputs) == pack
    grads = assert_same(model, batch, chunk)
    assert any(float(g.abs().max()) > 0 for g in grads.values())


def lora_model(tok):
    cfg = load_config(None, ["train.precision=fp32", "method.name=lora", "method.lora.r=4",
                             "method.lora.dropout=0.0"])
    torch.manual_seed(0)
    return load_model(cfg, "causal", tokenizer=tok)


def test_lora_same_loss_and_gradients(tiny):
    _, tok = tiny
    model = lora_model(tok)
    with torch.no_grad():  # B starts at zero: give the adapter a say so its A gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    grads = assert_same(model, collate(packed(sample_rows(tok)), pad_id=tok.pad_token_id))
    assert grads and all("lora_" in n for n in grads)  # the head is frozen: no weight gradient wanted


def test_lora_with_a_trained_head(tiny):
    _, tok = tiny
    model = lora_model(tok)
    model.get_output_embeddings().weight.requires_grad_(True)  # tied: the embedding trains too
    grads = assert_same(model, collate(sample_rows(tok), pad_id=tok.pad_token_id))
    assert any("embed_tokens" in n for n in grads)


def test_prompt_tuning_same_loss_and_gradients(tiny):
    _, tok = tiny
    cfg = load_config(None, ["train.precision=fp32", "method.name=prompt_tuning",
                             "method.prompt_tuning.num_virtual_tokens=5"])
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=tok)
    grads = assert_same(model, collate(sample_rows(tok), pad_id=tok.pad_token_id))
    assert grads


def test_seq2seq_same_loss_and_gradients(tiny_t5_dir):
    from chatsft.model import load_tokenizer

    cfg = load_config(None, ["train.precision=fp32", "model.name_or_path=builtin:tiny-t5",
                             "data.organization=split_turn"])
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg, "seq2seq", tokenizer=tok).eval()  # T5's dropout would differ between runs
    from chatsft.model.batch import collate_pairs, decoder_start

    g = torch.Generator().manual_seed(0)
    rows = [Row(torch.randint(5, 300, (n,), generator=g).numpy(), torch.randint(5, 300, (m,), generator=g).numpy())
            for n, m in ((9, 4), (12, 7), (5, 3))]
    batch = collate_pairs(rows, pad_id=tok.pad_token_id, decoder_start=decoder_start(model))
    assert_same(model, batch)


def test_no_learned_token_gives_zero_without_nan(tiny):
    cfg, tok = tiny
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=tok)
    learned, _ = loss_function(model, "learned")
    rows = [Row(r.input_ids, np.full_like(r.labels, IGNORE)) for r in sample_rows(tok, 2)]
    for pack in (False, True):
        batch = collate(packed(rows) if pack else rows, pad_id=tok.pad_token_id)
        total, count, grads = run(model, learned, batch)
        assert int(count) == 0 and float(total) == 0.0 and not math.isnan(float(total))
        # every parameter takes part in backward (DDP and ZeRO need it) with a zero gradient
        assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
        assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_the_head_stays_a_linear_outside_the_loss(tiny):
    cfg, tok = tiny
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=tok).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        loss_function(model, "learned")
        after = model(input_ids=ids).logits  # generation and export see logits, as before
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert "lm_head.weight" in model.state_dict() or "model.embed_tokens.weight" in model.state_dict()


def test_full_and_transformed_logits_keep_the_full_path(tiny):
    cfg, tok = tiny
    model = load_model(cfg, "causal", tokenizer=tok)
    fn, how = loss_function(model, "full")
    assert fn is full_loss and "train.loss_head=full" in how
    model.config.final_logit_softcapping = 30.0  # Gemma 2: the head's output is capped after the Linear
    fn, how = loss_function(model, "learned")
    assert fn is full_loss and "final_logit_softcapping" in how


# ------------------------------------------------------- a Qwen2.5-0.5B-shaped model


@pytest.fixture(scope="module")
def qwen_shaped():
    """Qwen2.5-0.5B's widths and its full vocabulary (151,936, tied embeddings), 2 layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, use_cache=False)
    model = Qwen2ForCausalLM(config).float().train()
    return model


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_qwen_shaped_same_loss_and_gradients(qwen_shaped, pack):
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (40, 23, 31):
        ids = torch.randint(0, 151936, (n,), generator=g).numpy()
        labels = ids.copy()
        labels[: n // 2] = IGNORE  # a prompt, then the learned answer
        rows.append(Row(ids, labels))
    batch = collate(packed(rows) if pack else rows, pad_id=0)
    assert_same(qwen_shaped, batch, chunk=16)
