"""load_model: dtype/attention rules, methods (full, LoRA, QLoRA refusal, prompt tuning), T5, resizing."""

from __future__ import annotations

import sys

import pytest
import torch

from chatsft.config import ConfigError, load_config
from chatsft.errors import UserError
from chatsft.model import (
    attn_implementation,
    default_target_modules,
    load_dtype,
    load_model,
    load_tokenizer,
    num_virtual_tokens,
    resolve_kind,
)
from chatsft.model.kind import CAUSAL, SEQ2SEQ


@pytest.fixture(autouse=True)
def _cpu_rules(monkeypatch):
    # These tests pin the CPU behaviour (fp32 loads, no flash attention) on any machine;
    # the GPU rules are checked in test_model_gpu.py.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(1)


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


def ids_for(model, n=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(3, vocab, (n, length), generator=g)


# ------------------------------------------------------------------ rules


@pytest.mark.parametrize("overrides, cuda, expected", [
    ((), False, torch.float32),                                   # CPU: always fp32
    ((), True, torch.bfloat16),                                   # GPU, bf16, DeepSpeed keeps masters
    (("train.engine=ddp",), True, torch.float32),    # full FT without masters
    (("train.engine=ddp", "method.name=lora"), True, torch.bfloat16),  # frozen base
    (("train.precision=fp32",), True, torch.float32),
    (("train.precision=fp16",), True, torch.float16),
    (("method.name=qlora", "method.quant.compute_dtype=float16"), False, torch.float16),
    (("model.dtype=bfloat16",), False, torch.bfloat16),          # explicit wins
])
def test_load_dtype_rule(overrides, cuda, expected):
    assert load_dtype(cfg_with(*overrides), cuda=cuda) == expected


def test_attention_auto_is_transformers_default_without_cuda_and_explicit_passes_through():
    assert attn_implementation(cfg_with(), torch.bfloat16, cuda=False) is None
    assert attn_implementation(cfg_with(), torch.float32, cuda=True) is None  # flash needs half
    assert attn_implementation(cfg_with("model.attn_implementation=eager"), torch.float32) == "eager"


# ------------------------------------------------------------------ full


def test_full_model_loads_trainable_in_train_mode(tiny_llama_dir):
    model = load_model(cfg_with("method.name=full"), "causal")
    assert model.training and model.dtype == load_dtype(load_config(None, ["method.name=full"]))
    assert all(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False
    ids = ids_for(model)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir):
    ids = None
    grads = []
    for ckpt in ("false", "true"):
        model = load_model(cfg_with("method.name=full", f"train.gradient_checkpointing={ckpt}",
                                    "model.attn_implementation=eager"), "causal")
        model.eval()  # no dropout, so both runs compute the same function
        ids = ids_for(model) if ids is None else ids
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.get_input_embeddings().weight.grad.clone())
        on = getattr(type(model), "is_activation_checkpointing", None)  # the newer name
        on = model.is_activation_checkpointing if on is not None else model.is_gradient_checkpointing
        assert on == (ckpt == "true")
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_tokenizer_larger_than_embeddings_grows_the_matrix(tiny_llama_dir):
    cfg = cfg_with("method.name=lora")
    tok = load_tokenizer(cfg.model)
    before = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|new_a|>", "<|new_b|>"]})
    model = load_model(cfg, "causal", tokenizer=tok)
    assert len(tok) == before + 2
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert getattr(model, "chatsft_resized_vocab", False)
    # Only the new rows train besides the adapters (the head is tied to the embeddings).
    (delta,) = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert delta.shape == (2, model.config.hidden_size) and delta.requires_grad
    ids = torch.tensor([[5, before, 9, before + 1]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert delta.grad[0].abs().sum() > 0 and delta.grad[1].abs().sum() > 0


# ------------------------------------------------------------------ LoRA


def test_lora_wraps_with_all_projections_and_only_adapters_train(tiny_llama_dir):
    model = load_model(cfg_with("method.name=lora", "method.lora.r=4", "method.lora.alpha=8"), "causal")
    conf = model.peft_config["default"]
    assert set(conf.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                        "down_proj"}
    assert conf.task_type == "CAUSAL_LM" and conf.r == 4 and conf.lora_alpha == 8
    assert conf.base_model_name_or_path == "builtin:tiny-llama"  # portable, not the cache path
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 4 * 7 * 2  # 4 layers x 7 projections x (A, B)


def test_lora_with_checkpointing_gets_gradients(tiny_llama_dir):
    model = load_model(cfg_with("method.name=lora", "train.gradient_checkpointing=true"), "causal")
    for n, p in model.named_parameters():
        if "lora_A" in n:
            torch.nn.init.normal_(p, std=0.1)
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = ids_for(model)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_explicit_target_modules_and_a_bad_name(tiny_llama_dir):
    model = load_model(cfg_with("method.name=lora", "method.lora.target_modules=[q_proj, v_proj]"), "causal")
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="method.lora.target_modules"):
        load_model(cfg_with("method.name=lora", "method.lora.target_modules=[no_such_layer]"), "causal")


def test_default_targets_t5_gpt2_and_fallback(tiny_t5_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, \
        GPTNeoXForCausalLM

    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)  # gated-gelu: wi_0 / wi_1
    assert set(default_target_modules(t5)) == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    assert set(default_target_modules(gpt2)) == {"c_attn", "c_proj", "c_fc"}
    # An architecture without an entry: every Linear but the output head, by full name.
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=64))
    targets = default_target_modules(neox)
    head = next(n for n, m in neox.named_modules() if m is neox.get_output_embeddings())
    linears = [n for n, m in neox.named_modules() if isinstance(m, torch.nn.Linear)]
    assert head in linears and head not in targets
    assert sorted(targets) == sorted(n for n in linears if n != head) and len(targets) == 4


# ------------------------------------------------------------------ QLoRA


def test_qlora_without_cuda_is_refused_in_one_line(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        load_model(cfg_with("method.name=qlora"), "causal")
    msg = str(e.value)
    assert "\n" not in msg and "method.name=qlora" in msg and "CUDA GPU" in msg


def test_qlora_without_bitsandbytes_says_what_to_install(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(UserError, match=r"pip install chatsft\[qlora\]"):
        load_model(cfg_with("method.name=qlora"), "causal")


# ------------------------------------------------------------------ prompt tuning


def test_prompt_tuning_prepends_virtual_tokens_and_changes_the_output(tiny_llama_dir):
    base = load_model(cfg_with("method.name=full"), "causal").eval()
    model = load_model(cfg_with("method.name=prompt_tuning", "method.prompt_tuning.num_virtual_tokens=5"), "causal")
    model.eval()
    assert num_virtual_tokens(model) == 5
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [(5, base.config.hidden_size)]
    ids = ids_for(model, length=8)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        ref = base(input_ids=ids).logits
    assert out.shape == (2, 5 + 8, ref.shape[-1])
    assert (out[:, 5:] - ref).abs().max() > 1e-3  # the prompt is attended to
    # Labels get -100 for the virtual positions, so the model's own loss is finite.
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and trainable[0].grad.abs().sum() > 0


def test_prompt_tuning_init_text_copies_the_text_embeddings(tiny_llama_dir):
    cfg = cfg_with("method.name=prompt_tuning", "method.prompt_tuning.num_virtual_tokens=7",
                   "method.prompt_tuning.init_text='Answer kindly'")
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, "causal", tokenizer=tok)
    text_ids = tok("Answer kindly", add_special_tokens=False)["input_ids"]
    want = [(text_ids * 7)[i] for i in range(7)]
    table = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(table, model.word_embeddings.weight[want])


def test_p_tuning_and_seq2seq_prompt_tuning(tiny_t5_dir):
    pt = load_model(cfg_with("method.name=prompt_tuning", "method.prompt_tuning.variant=p_tuning",
                             "method.prompt_tuning.num_virtual_tokens=4"), "causal")
    assert type(pt.prompt_encoder["default"]).__name__ == "PromptEncoder"
    t5 = load_model(cfg_with("model.name_or_path=builtin:tiny-t5", "method.name=prompt_tuning",
                             "method.prompt_tuning.num_virtual_tokens=4"), "seq2seq")
    assert num_virtual_tokens(t5) == 0  # the prompt goes to the encoder; decoder logits unchanged
    ids = ids_for(t5, length=6)
    out = t5(input_ids=ids, labels=ids[:, :3].clone())
    assert out.logits.shape[1] == 3 and torch.isfinite(out.loss)


def test_prompt_tuning_refuses_packed_rows_when_the_config_loads():
    with pytest.raises(ConfigError, match="method.name=prompt_tuning.*data.packing"):
        cfg_with("method.name=prompt_tuning", "data.packing=true")


def test_a_tokenizer_only_folder_names_model_kind(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match="model.kind"):
        resolve_kind(cfg_with(f"model.name_or_path={tmp_path / 'tok'}").model)
    assert resolve_kind(cfg_with(f"model.name_or_path={tmp_path / 'tok'}", "model.kind=causal").model) is CAUSAL


# ------------------------------------------------------------------ T5


def test_tiny_t5_loads_as_seq2seq_and_gives_a_finite_loss(tiny_t5_dir):
    cfg = cfg_with("model.name_or_path=builtin:tiny-t5", "method.name=full")
    kind = resolve_kind(cfg.model)
    assert kind is SEQ2SEQ and (kind.auto_class, kind.peft_task, kind.mlflow_task) == (
        "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", "text2text-generation")
    model = load_model(cfg, "seq2seq")
    assert model.config.is_encoder_decoder and model.training
    tok = load_tokenizer(cfg.model)
    enc = tok(["what is two plus two?", "name a colour"], padding=True, return_tensors="pt")
    labels = tok(["four", "blue, or green"], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_t5_lora_targets_gated_projections(tiny_t5_dir):
    model = load_model(cfg_with("model.name_or_path=builtin:tiny-t5", "method.name=lora"), "seq2seq")
    assert model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".wi_0.lora_A" in n for n in names) and any(".EncDecAttention.q.lora_A" in n for n in names)


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model.name_or_path"):
        load_model(cfg_with(f"model.name_or_path={tmp_path}/nowhere", "model.kind=causal",
                            "model.tokenizer=builtin:tiny-llama"), "causal")
