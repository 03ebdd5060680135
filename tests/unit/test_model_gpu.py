"""On a CUDA GPU: the bf16/sdpa defaults, packed rows in bf16, and QLoRA end to end (needs bitsandbytes).

Run with `pytest -m gpu tests/unit/test_model_gpu.py` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from chatsft.config import load_config
from chatsft.model import export_model, load_exported, load_model, load_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_defaults_bf16_base_fp32_adapter_and_packing(tiny_llama_dir):
    cfg = load_config(None, ["method.name=lora"])
    model = load_model(cfg, "causal").cuda().eval()
    base_w = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    lora_w = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert base_w.dtype == torch.bfloat16 and lora_w.dtype == torch.float32
    assert model.config._attn_implementation in ("sdpa", "flash_attention_2")
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(3, vocab, (n,), generator=g).cuda() for n in (37, 21, 6)]
    ids = torch.cat(parts)[None]
    pos = torch.cat([torch.arange(len(p), device="cuda") for p in parts])[None]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(input_ids=ids, position_ids=pos, attention_mask=None).logits[0].float()
        start = 0
        for p in parts:
            alone = model(input_ids=p[None]).logits[0].float()
            # bf16 kernels tile a packed row differently: equal up to bf16 rounding
            torch.testing.assert_close(packed[start:start + len(p)], alone, rtol=0.02, atol=0.05)
            start += len(p)


def test_qlora_trains_and_exports(tiny_llama_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = load_config(None, ["method.name=qlora", "train.gradient_checkpointing=true", "method.lora.r=8",
                             "train.engine=ddp"])
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, "causal", tokenizer=tok)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert next(model.parameters()).device.type == "cuda"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    batch = tok(["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi there, friend<|im_end|>\n"] * 4,
                return_tensors="pt").to("cuda")
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        trained = model(**batch).logits.float().cpu()
    out = export_model(model, tok, str(tmp_path / "merged"), merged=True)
    merged, _ = load_exported(out)
    with torch.no_grad():
        got = merged(**{k: v.cpu() for k, v in batch.items()}).logits.float()
    # Merged into the unquantized base: the same function up to the 4-bit rounding of
    # the base weights, so the argmax tokens agree almost everywhere.
    agree = (got.argmax(-1) == trained.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    adapter = export_model(model, tok, str(tmp_path / "adapter"), merged=False)
    loaded, _ = load_exported(adapter)
    with torch.no_grad():
        again = loaded(**{k: v.cpu() for k, v in batch.items()}).logits.float()
    # The adapter on the reloaded (fp32) base is the merged bf16 model up to bf16 rounding.
    assert (again.argmax(-1) == got.argmax(-1)).float().mean().item() > 0.95
    assert (again.argmax(-1) == trained.argmax(-1)).float().mean().item() > 0.9
