"""param_groups: every trainable parameter in exactly one group, with its role's lr and the right decay."""

from __future__ import annotations

import pytest
import torch

from chatsft.config import load_config
from chatsft.model import load_model
from chatsft.train.optim import param_groups

LR_GROUPS = ("train.lr=1e-3", "train.weight_decay=0.1", "train.lr_groups.embeddings=0.5",
             "train.lr_groups.head=0.25", "train.lr_groups.matrices=0.125")


@pytest.fixture(autouse=True)
def _cpu_rules(monkeypatch):
    # These tests pin the CPU behaviour (fp32 loads, no flash attention) on any machine;
    # the GPU rules are checked in test_model_gpu.py.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def untied_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a separate output head (as Llama-3-8B and Qwen2.5-7B have)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("untied")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, tie_word_embeddings=False)
    with torch.no_grad():  # make the head really differ from the embeddings
        model.lm_head.weight.copy_(model.lm_head.weight.clone() + 0.01)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return str(out)


def check_partition(model, groups):
    """Each trainable parameter once, nothing frozen, every group well formed."""
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == trainable
    for g in groups:
        assert set(g) >= {"name", "params", "lr", "weight_decay"} and g["params"]
        for p in g["params"]:
            assert (g["weight_decay"] > 0) == (p.dim() >= 2), g["name"]
    # The optimizer accepts them as they are.
    torch.optim.AdamW(groups, lr=1.0)


def by_name(groups):
    return {g["name"]: g for g in groups}


def test_tied_full_model_has_no_head_group(tiny_llama_dir):
    cfg = load_config(None, ["method.name=full", *LR_GROUPS])
    model = load_model(cfg, "causal")
    groups = param_groups(model, cfg.train)
    check_partition(model, groups)
    g = by_name(groups)
    assert set(g) == {"embeddings/decay", "matrices/decay", "matrices/no_decay"}
    assert g["embeddings/decay"]["params"] == [model.get_input_embeddings().weight]
    assert g["embeddings/decay"]["lr"] == 0.5 and g["matrices/decay"]["lr"] == 0.125
    assert g["matrices/decay"]["weight_decay"] == 0.1 and g["matrices/no_decay"]["weight_decay"] == 0.0
    norms = {id(m.weight) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    assert norms == {id(p) for p in g["matrices/no_decay"]["params"]}


def test_untied_head_gets_its_own_lr(untied_llama_dir):
    cfg = load_config(None, [f"model.name_or_path={untied_llama_dir}", "method.name=full", *LR_GROUPS])
    model = load_model(cfg, "causal")
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    groups = param_groups(model, cfg.train)
    check_partition(model, groups)
    g = by_name(groups)
    assert g["head/decay"]["params"] == [model.lm_head.weight] and g["head/decay"]["lr"] == 0.25
    assert g["embeddings/decay"]["params"] == [model.get_input_embeddings().weight]


def test_unset_groups_fall_back_to_train_lr(untied_llama_dir):
    cfg = load_config(None, [f"model.name_or_path={untied_llama_dir}", "method.name=full", "train.lr=3e-4",
                             "train.lr_groups.head=1e-5"])
    groups = by_name(param_groups(load_model(cfg, "causal"), cfg.train))
    assert groups["head/decay"]["lr"] == 1e-5
    assert groups["embeddings/decay"]["lr"] == groups["matrices/decay"]["lr"] == 3e-4
    assert groups["matrices/decay"]["weight_decay"] == 0.0  # train.weight_decay defaults to 0


def test_lora_with_saved_embeddings_and_head(untied_llama_dir):
    cfg = load_config(None, [f"model.name_or_path={untied_llama_dir}", "method.name=lora",
                             "method.lora.modules_to_save=[embed_tokens, lm_head]", *LR_GROUPS])
    model = load_model(cfg, "causal")
    groups = param_groups(model, cfg.train)
    check_partition(model, groups)
    g = by_name(groups)
    assert set(g) == {"embeddings/decay", "head/decay", "matrices/decay"}
    assert all("lora_" in n for n, p in model.named_parameters()
               if p.requires_grad and any(p is q for q in g["matrices/decay"]["params"]))
    (emb,) = g["embeddings/decay"]["params"]
    (head,) = g["head/decay"]["params"]
    assert emb.shape == head.shape and emb is not head


def test_lora_only_matrices_and_frozen_base_left_out(tiny_llama_dir):
    cfg = load_config(None, ["method.name=lora", *LR_GROUPS])
    model = load_model(cfg, "causal")
    groups = param_groups(model, cfg.train)
    check_partition(model, groups)
    assert [g["name"] for g in groups] == ["matrices/decay"]


def test_t5_shared_embeddings_counted_once(tiny_t5_dir):
    cfg = load_config(None, ["model.name_or_path=builtin:tiny-t5", "method.name=full", *LR_GROUPS])
    model = load_model(cfg, "seq2seq")
    groups = param_groups(model, cfg.train)
    check_partition(model, groups)
    g = by_name(groups)
    # encoder, decoder (and, in transformers 5, the head) all share `shared.weight`
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert g["embeddings/decay"]["params"] == [model.shared.weight]
    if model.lm_head.weight is model.shared.weight:
        assert "head/decay" not in g
    else:
        assert g["head/decay"]["params"] == [model.lm_head.weight]


def test_zero3_partitioned_shapes_are_read_from_ds_shape(tiny_llama_dir):
    # ZeRO-3 replaces a parameter's data with an empty flat shard and keeps its shape
    # in ds_shape; a 2-D weight must still be decayed.
    cfg = load_config(None, ["method.name=full", "train.weight_decay=0.1"])
    model = load_model(cfg, "causal")
    w = model.model.layers[0].self_attn.q_proj.weight
    shape = tuple(w.shape)
    w.data = torch.empty(0)
    w.ds_shape = torch.Size(shape)
    decayed = {id(p) for g in param_groups(model, cfg.train) if g["weight_decay"] > 0 for p in g["params"]}
    assert id(w) in decayed


def test_new_token_rows_of_a_lora_model_are_embeddings(untied_llama_dir):
    from chatsft.model import load_tokenizer

    cfg = load_config(None, [f"model.name_or_path={untied_llama_dir}", "method.name=lora", *LR_GROUPS])
    tok = load_tokenizer(cfg.model)
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    model = load_model(cfg, "causal", tokenizer=tok)
    groups = param_groups(model, cfg.train)
    check_partition(model, groups)
    g = by_name(groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in g["embeddings/decay"]["params"]] == \
        ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    assert [names[id(p)] for p in g["head/decay"]["params"]] == \
        ["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"]
    assert g["embeddings/decay"]["lr"] == 0.5 and g["head/decay"]["lr"] == 0.25
