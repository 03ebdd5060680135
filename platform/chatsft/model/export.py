"""The trained model as a Hugging Face folder, and loading such a folder back (full or adapter)."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from typing import Any, Sequence

from chatsft.builtin import resolve
from chatsft.errors import UserError
from chatsft.model.kind import kind_of_config
from chatsft.model.peft import RESIZED_ATTR, active_peft_config, is_peft


def export_model(model, tokenizer, out_dir: str, *, merged: bool, stop_tokens: Sequence[str] = (),
                 inplace: bool = False) -> str:
    """Write a Hugging Face folder that `load_exported` (and `from_pretrained`) loads and generates from.

    - a full model: safetensors weights, config, tokenizer and a generation_config whose
      eos_token_id lists the tokenizer's EOS plus `stop_tokens` (pass the chat template's
      end-of-turn marker, e.g. `<|im_end|>`, so generation stops after one answer) and
      whose pad_token_id is the tokenizer's.
    - a PEFT model, merged: the adapter folded into the weights, saved as a full model.
      LoRA merges on a deep copy unless `inplace=True` (the caller is done with the
      model: saves a second copy of the weights in memory); a 4-bit QLoRA base is
      reloaded unquantized in its compute dtype and the adapter merged into that.
      Prompt tuning cannot be merged: its adapter is written instead (a note on stderr).
    - a PEFT model, not merged: adapter_config.json (naming the base model as the config
      did) + adapter weights (+ the embedding matrices when they were grown for new
      tokens), the tokenizer, the generation config, and a README naming the base.

    The model's parameters must be complete (under ZeRO-3 the caller gathers first).
    Returns `out_dir`.
    """
    os.makedirs(out_dir, exist_ok=True)
    if not is_peft(model):
        _save_full(model, tokenizer, out_dir, stop_tokens)
        return out_dir
    conf = active_peft_config(model)
    if merged and conf.is_prompt_learning:
        print(f"export: {conf.peft_type.value} cannot be merged into the weights; "
              f"writing the adapter to {out_dir}", file=sys.stderr)
        merged = False
    if merged:
        if _is_quantized(model):
            full = _merge_into_fresh_base(model)
        else:
            full = (model if inplace else copy.deepcopy(model)).merge_and_unload()
        _save_full(full, tokenizer, out_dir, stop_tokens)
        return out_dir
    model.save_pretrained(out_dir, save_embedding_layers=bool(getattr(model, RESIZED_ATTR, False)))
    tokenizer.save_pretrained(out_dir)
    _generation_config(model.get_base_model(), tokenizer, stop_tokens).save_pretrained(out_dir)
    # PEFT writes a model card; add the line a reader needs to use the folder.
    with open(os.path.join(out_dir, "README.md"), "a", encoding="utf-8") as f:
        f.write(f"\n## chatsft\n\n{conf.peft_type.value} adapter. Base model: `{conf.base_model_name_or_path}`"
                f"{' (revision ' + conf.revision + ')' if conf.revision else ''}. "
                "Load with `chatsft.model.load_exported(path)` or "
                "`peft.AutoPeftModelForCausalLM.from_pretrained(path)`.\n")
    return out_dir


def _is_quantized(model) -> bool:
    base = model.get_base_model() if is_peft(model) else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "hf_quantizer", None) is not None)


def _merge_into_fresh_base(model):
    """Merge the adapter into an unquantized copy of the base, reloaded from its source.

    Merging into 4-bit weights would round the merged result back to 4 bits; the
    adapter was trained against dequantized weights, so merge into those instead.
    """
    import torch
    from peft import PeftModel

    conf = active_peft_config(model)
    dtype = getattr(getattr(model.get_base_model(), "config", None), "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16
    with tempfile.TemporaryDirectory(prefix="chatsft-adapter-") as tmp:
        model.save_pretrained(tmp, save_embedding_layers=bool(getattr(model, RESIZED_ATTR, False)))
        base = _load_base(conf, dtype=dtype, vocab=_embedding_rows(model))
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def _embedding_rows(model) -> int:
    """Rows of the input embedding matrix, through PEFT wrappers and ZeRO-3 partitioning."""
    weight = model.get_input_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def _generation_config(model, tokenizer, stop_tokens: Sequence[str]):
    from transformers import GenerationConfig

    gen = copy.deepcopy(model.generation_config) if getattr(model, "generation_config", None) \
        else GenerationConfig.from_model_config(model.config)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or tid == tokenizer.unk_token_id:
            raise UserError(f"export: stop token {t!r} is not a single token of the tokenizer")
        eos.append(tid)
    eos = list(dict.fromkeys(eos))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def _save_full(model, tokenizer, out_dir: str, stop_tokens: Sequence[str]) -> None:
    model.generation_config = _generation_config(model, tokenizer, stop_tokens)
    cache = getattr(model.config, "use_cache", None)
    if cache is not None:
        model.config.use_cache = True  # training turned the KV cache off; generation wants it
    try:
        model.save_pretrained(out_dir)
    finally:
        if cache is not None:
            model.config.use_cache = cache
    tokenizer.save_pretrained(out_dir)


# -------------------------------------------------------------------------- reload


def load_exported(path: str, *, dtype: Any = "auto", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from an `export_model` folder: full or adapter.

    An adapter folder loads its base from adapter_config's base_model_name_or_path
    (`builtin:` names resolve), grown to the saved vocabulary if needed. `dtype`:
    "auto" keeps the dtype the weights were saved in; a torch dtype casts them
    (e.g. torch.float32 for CPU evaluation of a bf16 export).
    """
    from transformers import AutoTokenizer, GenerationConfig

    remote = {"trust_remote_code": True} if trust_remote_code else {}
    adapter_file = os.path.join(path, "adapter_config.json")
    tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    if not os.path.exists(adapter_file):
        model = _auto_class(path, **remote).from_pretrained(path, dtype=dtype, **remote)
        return model.eval(), tokenizer
    from peft import PeftConfig, PeftModel

    conf = PeftConfig.from_pretrained(path)
    base = _load_base(conf, dtype=dtype, vocab=len(tokenizer), **remote)
    model = PeftModel.from_pretrained(base, path)
    if os.path.exists(os.path.join(path, "generation_config.json")):
        model.get_base_model().generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), tokenizer


def _auto_class(path: str, **kwargs):
    from transformers import AutoConfig

    return kind_of_config(AutoConfig.from_pretrained(path, **kwargs)).auto()


def _load_base(peft_conf, *, dtype: Any, vocab: int, **remote: Any):
    """The base model an adapter was trained on, its embeddings grown to `vocab` rows if smaller."""
    base_path = resolve(peft_conf.base_model_name_or_path)
    kwargs: dict[str, Any] = dict(remote)
    if peft_conf.revision:
        kwargs["revision"] = peft_conf.revision
    model = _auto_class(base_path, **kwargs).from_pretrained(base_path, dtype=dtype, **kwargs)
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab)
    return model
