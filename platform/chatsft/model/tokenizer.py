"""The tokenizer of a model.

This is the part of chatsft.model that shapes prepared rows: the prepare
fingerprint hashes this file (and the tokenizer itself), not the rest of the
model code, so editing LoRA or export code never marks prepared data stale.
"""

from __future__ import annotations

from typing import Any

from chatsft.builtin import resolve


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


def same_vocabulary(a: Any, b: Any) -> bool:
    """Do two tokenizers map text to the same ids (so rows tokenized by one fit the other)?"""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens
