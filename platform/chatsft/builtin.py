"""The tiny offline models of the embedded default, written as ordinary HF folders.

`builtin:tiny-llama` and `builtin:tiny-t5` need no network: a byte-level BPE
tokenizer is trained on the shipped sample conversations and a small model is
built from a config with seeded weights. Building is deterministic, so every
node of a cluster that builds its own copy gets the same folder; it is cached
under $CHATSFT_CACHE (default ~/.cache/chatsft) keyed by a fingerprint of the
inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from chatsft.data.templates import SPECIAL_TOKENS

BUILDER_VERSION = "1"
SAMPLES = Path(__file__).resolve().parent / "samples"
PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
# One token for each control marker of the built-in templates, so every format
# works with the tiny tokenizer and masks fall on token boundaries.
TEMPLATE_TOKENS = (
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    *SPECIAL_TOKENS,
)
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTINS = ("tiny-llama", "tiny-t5")


def cache_root() -> Path:
    return Path(os.environ.get("CHATSFT_CACHE", Path.home() / ".cache" / "chatsft"))


def resolve(name_or_path: str) -> str:
    """`builtin:NAME` -> a local folder (built on first use); anything else unchanged."""
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    name = name_or_path.split(":", 1)[1]
    if name not in BUILTINS:
        raise ValueError(f"model.name_or_path: unknown builtin {name!r}; expected one of {', '.join(BUILTINS)}")
    target = cache_root() / "builtin" / f"{name}-{_fingerprint(name)}"
    if not (target / "config.json").exists():
        _build_atomically(name, target)
    return str(target)


def _fingerprint(name: str) -> str:
    h = hashlib.sha256(f"{BUILDER_VERSION}:{name}".encode())
    h.update((SAMPLES / "train.jsonl").read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def _build_atomically(name: str, target: Path) -> None:
    # Build beside the target and rename: concurrent builders (Ray workers on one
    # node) never see a half-written folder, and the loser's copy is discarded.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(name, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(name: str, out: Path) -> None:
    out = Path(out)
    tokenizer = build_tokenizer(out, t5_style=(name == "tiny-t5"))
    if name == "tiny-llama":
        _build_llama(tokenizer, out)
    else:
        _build_t5(tokenizer, out)


def sample_texts() -> list[str]:
    texts = []
    for line in (SAMPLES / "train.jsonl").read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            texts.append(m["content"])
    return texts


def build_tokenizer(out: Path, *, t5_style: bool = False, vocab_size: int = 1024, texts=None):
    """A byte-level BPE trained on `texts` (default: the sample data), saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, UNK, *TEMPLATE_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts if texts is not None else sample_texts(), trainer=trainer)
    if t5_style:  # the encoder input and the target both end with EOS
        eos_id = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        bos_token="<|begin_of_text|>", additional_special_tokens=list(TEMPLATE_TOKENS),
        model_max_length=1024,
    )
    hf.chat_template = CHATML_JINJA
    hf.save_pretrained(out)
    return hf


def _build_llama(tokenizer, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)


def _build_t5(tokenizer, out: Path) -> None:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out)
