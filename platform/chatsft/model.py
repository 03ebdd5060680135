"""Tokenizer and model loading (and the model kind) from the `model` config section."""

from __future__ import annotations

import json
import os
from typing import Any

from chatsft.builtin import resolve


def model_path(model_cfg: Any) -> str:
    return resolve(model_cfg.name_or_path)


def load_tokenizer(model_cfg: Any):
    """The tokenizer of `model.tokenizer` or the model; a pad token distinct from EOS where possible."""
    from transformers import AutoTokenizer

    path = resolve(model_cfg.tokenizer or model_cfg.name_or_path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                        revision=model_cfg.revision)
    if tok.pad_token is None:
        # Padding must never hide the end token the model has to learn: prefer an
        # existing non-EOS special token; fall back to EOS only when there is none
        # (padding positions carry label -100 either way).
        spare = [t for t in ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", tok.unk_token)
                 if t and t in tok.get_vocab() and t != tok.eos_token]
        tok.pad_token = spare[0] if spare else tok.eos_token
    return tok


def model_kind(model_cfg: Any) -> str:
    """'causal' or 'seq2seq': from the config, else from the model's config.json."""
    if model_cfg.kind != "auto":
        return model_cfg.kind
    path = resolve(model_cfg.name_or_path)
    local = os.path.join(path, "config.json")
    if os.path.exists(local):
        with open(local, encoding="utf-8") as f:
            return "seq2seq" if json.load(f).get("is_encoder_decoder") else "causal"
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                      revision=model_cfg.revision)
    return "seq2seq" if getattr(conf, "is_encoder_decoder", False) else "causal"
