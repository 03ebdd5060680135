"""The tokenizer of a model, and what kind of model it is (decoder-only or encoder-decoder).

This is the part of chatsft.model that shapes prepared rows: the prepare
fingerprint hashes this file (and the tokenizer itself), not the rest of the
model code, so editing LoRA or export code never marks prepared data stale.
"""

from __future__ import annotations

import json
import os
from typing import Any

from chatsft.builtin import resolve
from chatsft.errors import UserError, one_line


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
    """'causal' or 'seq2seq': from model.kind, else from the model's config.json."""
    if model_cfg.kind != "auto":
        return model_cfg.kind
    path = resolve(model_cfg.name_or_path)
    local = os.path.join(path, "config.json")
    if os.path.isdir(path):
        if not os.path.exists(local):
            raise UserError(f"model.name_or_path={model_cfg.name_or_path}: the folder has no config.json "
                            "(a tokenizer alone?), so the kind of model is unknown; point it at a model "
                            "folder, or set model.kind to causal or seq2seq")
        try:
            with open(local, encoding="utf-8") as f:
                conf = json.load(f)
        except ValueError as e:
            raise UserError(f"model.name_or_path={model_cfg.name_or_path}: {local} is not valid JSON "
                            f"({one_line(e)})") from None
        if "model_type" not in conf:
            from chatsft.model.check import missing_model_type

            raise UserError(missing_model_type(model_cfg.name_or_path, path))
        return "seq2seq" if conf.get("is_encoder_decoder") else "causal"
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                          revision=model_cfg.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path={model_cfg.name_or_path}: cannot read its config to tell the "
                        f"kind of model ({one_line(e)}); set model.kind to causal or seq2seq, or fix the "
                        "path") from None
    return "seq2seq" if getattr(conf, "is_encoder_decoder", False) else "causal"


def same_vocabulary(a: Any, b: Any) -> bool:
    """Do two tokenizers map text to the same ids (so rows tokenized by one fit the other)?"""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens
