"""export_model / load_exported: full folders, LoRA merged and adapter-only, prompt tuning, T5."""

from __future__ import annotations

import json
import os

import pytest
import torch

from chatsft.config import load_config
from chatsft.model import export_model, load_exported, load_model, load_tokenizer
from chatsft.model.export import _merge_into_fresh_base


@pytest.fixture(autouse=True)
def _cpu_rules(monkeypatch):
    # These tests pin the CPU behaviour (fp32 loads, no flash attention) on any machine;
    # the GPU rules are checked in test_model_gpu.py.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(1)


def randomize_lora(model, seed=0):
    """LoRA B starts at zero (adapter = identity); give A and B real values so merging matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def sample_ids(tok, texts=("<|im_start|>user\nhello there<|im_end|>\n", "how are you today?")):
    return tok(list(texts), padding=True, return_tensors="pt")


def lora(cfg_extra=(), tokenizer=None):
    cfg = load_config(None, ["method.name=lora", "method.lora.r=4", *cfg_extra])
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    model = load_model(cfg, "causal", tokenizer=tok)
    randomize_lora(model)
    return model.eval(), tok


def test_lora_merged_export_matches_base_plus_adapter(tiny_llama_dir, tmp_path):
    model, tok = lora()
    batch = sample_ids(tok)
    want = logits(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    with model.disable_adapter():
        base = logits(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    assert (want - base).abs().max() > 1e-2  # the adapter really changes the function

    out = export_model(model, tok, str(tmp_path / "merged"), merged=True)
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(out))
    merged, tok2 = load_exported(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got = logits(merged, batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The default merge works on a copy: the trained PEFT model is untouched.
    assert any("lora_A" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, batch["input_ids"], attention_mask=batch["attention_mask"]), want)


def test_lora_adapter_export_loads_back_to_the_same_logits(tiny_llama_dir, tmp_path):
    model, tok = lora()
    batch = sample_ids(tok)
    want = logits(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    out = export_model(model, tok, str(tmp_path / "adapter"), merged=False, stop_tokens=["<|im_end|>"])
    with open(os.path.join(out, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["base_model_name_or_path"] == "builtin:tiny-llama" and conf["peft_type"] == "LORA"
    assert any(f.startswith("adapter_model") for f in os.listdir(out))
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(out))
    assert "builtin:tiny-llama" in open(os.path.join(out, "README.md")).read()
    loaded, tok2 = load_exported(out)
    assert type(loaded).__name__ == "PeftModelForCausalLM" and not loaded.training
    torch.testing.assert_close(logits(loaded, batch["input_ids"], attention_mask=batch["attention_mask"]),
                               want, rtol=1e-5, atol=1e-5)
    eos = loaded.get_base_model().generation_config.eos_token_id
    assert tok2.convert_tokens_to_ids("<|im_end|>") in eos


def test_adapter_with_grown_vocabulary_round_trips(tiny_llama_dir, tmp_path):
    cfg = load_config(None, ["method.name=lora"])
    tok = load_tokenizer(cfg.model)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model, tok = lora(tokenizer=tok)
    new_id = tok.convert_tokens_to_ids("<|tool|>")
    # The new token's embedding row trains (PEFT trainable tokens); give it a value.
    delta = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert [tuple(p.shape) for p in delta] == [(1, model.config.hidden_size)]
    with torch.no_grad():
        delta[0].normal_()
    ids = torch.tensor([[5, new_id, 9, new_id, 11]])
    want = logits(model, ids)
    for merged in (False, True):
        out = export_model(model, tok, str(tmp_path / f"m{merged}"), merged=merged)
        loaded, tok2 = load_exported(out)
        assert tok2.convert_tokens_to_ids("<|tool|>") == new_id
        torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-4, atol=1e-4)


def test_merge_into_a_reloaded_base_matches(tiny_llama_dir, tmp_path):
    """The QLoRA export path (reload the base unquantized, merge there), run on a plain LoRA."""
    model, tok = lora()
    ids = sample_ids(tok)["input_ids"][:1]
    merged = _merge_into_fresh_base(model)
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_full_export_loads_and_generates(tiny_llama_dir, tmp_path):
    cfg = load_config(None, ["method.name=full"])
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, "causal", tokenizer=tok).eval()
    assert model.config.use_cache is False
    out = export_model(model, tok, str(tmp_path / "full"), merged=True, stop_tokens=["<|im_end|>"])
    assert model.config.use_cache is False  # the caller's model is left as it was
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["use_cache"] is True
    with open(os.path.join(out, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert gen["pad_token_id"] == tok.pad_token_id

    loaded, tok2 = load_exported(out)
    assert tok2.get_vocab() == tok.get_vocab() and tok2.pad_token == tok.pad_token
    prompt = tok2(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    torch.testing.assert_close(logits(loaded, prompt["input_ids"]), logits(model, prompt["input_ids"]))
    gen_ids = loaded.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert gen_ids.shape[0] == 1 and prompt["input_ids"].shape[1] < gen_ids.shape[1] <= prompt["input_ids"].shape[1] + 6
    # Greedy generation is the argmax of the model's own next-token logits.
    first = logits(model, prompt["input_ids"])[0, -1].argmax()
    assert gen_ids[0, prompt["input_ids"].shape[1]] == first


def test_stop_token_must_be_one_token(tiny_llama_dir, tmp_path):
    from chatsft.errors import UserError

    cfg = load_config(None, ["method.name=full"])
    tok = load_tokenizer(cfg.model)
    with pytest.raises(UserError, match="stop token"):
        export_model(load_model(cfg, "causal", tokenizer=tok), tok, str(tmp_path / "x"), merged=True,
                     stop_tokens=["not a token"])


def test_prompt_tuning_export_writes_the_adapter_even_when_merged_is_asked(tiny_llama_dir, tmp_path, capfd):
    cfg = load_config(None, ["method.name=prompt_tuning", "method.prompt_tuning.num_virtual_tokens=4"])
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, "causal", tokenizer=tok).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
    ids = sample_ids(tok)["input_ids"][:1]
    want = logits(model, ids)
    out = export_model(model, tok, str(tmp_path / "pt"), merged=True)
    assert "cannot be merged" in capfd.readouterr().err
    loaded, _ = load_exported(out)
    torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-5, atol=1e-5)


def test_t5_full_and_adapter_exports_generate(tiny_t5_dir, tmp_path):
    for method in ("full", "lora"):
        cfg = load_config(None, ["model.name_or_path=builtin:tiny-t5", f"method.name={method}"])
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg, "seq2seq", tokenizer=tok).eval()
        if method == "lora":
            randomize_lora(model)
        enc = tok(["what is two plus two?"], return_tensors="pt")
        dec = torch.tensor([[model.config.decoder_start_token_id, 7, 8]])
        want = logits(model, enc["input_ids"], decoder_input_ids=dec)
        out = export_model(model, tok, str(tmp_path / method), merged=False)
        loaded, tok2 = load_exported(out)
        assert loaded.config.is_encoder_decoder
        torch.testing.assert_close(logits(loaded, enc["input_ids"], decoder_input_ids=dec), want,
                                   rtol=1e-5, atol=1e-5)
        gen = loaded.generate(**enc, max_new_tokens=4, do_sample=False)
        assert 1 < gen.shape[1] <= 5
