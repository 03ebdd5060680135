"""Tokenizer and model loading, PEFT wrapping, optimizer parameter groups, export and reload.

Rules this module decides (the trainer relies on them):

- `load_model` returns the model in train mode on the CPU (QLoRA: on the current CUDA
  device), with the method applied. DeepSpeed (or the trainer) moves and casts it.
- dtype `auto`: QLoRA loads non-quantized weights in `method.quant.compute_dtype`.
  Otherwise half precision (bf16/fp16 from `train.precision`) only where a CUDA GPU is
  present and something keeps fp32 master weights or fp32 trainables: DeepSpeed
  (its bf16/fp16 optimizers hold fp32 masters) or a PEFT method (PEFT keeps adapter
  weights in fp32; the frozen base can be half). Everywhere else fp32: on CPU bf16
  matmuls are slow and DeepSpeed's CPU path keeps fp32 masters anyway, and full
  fine-tuning without DeepSpeed has no master copy, so it trains fp32 weights under
  autocast. Checkpoints of Qwen2.5/Llama-3 are stored in bf16, so loading them in
  bf16 loses nothing.
- attention `auto`: flash_attention_2 where CUDA, the flash-attn package, a half load
  dtype and the architecture all allow it; else the transformers default (sdpa where
  the architecture has it, eager otherwise).
- Packed rows: pass `position_ids` restarting at 0 per sequence and
  `attention_mask=None`; transformers then detects the sequence borders
  (masking_utils.find_packed_sequence_indices: a new sequence wherever a position is
  not the previous one plus 1) and builds a block-diagonal causal mask (eager, sdpa)
  or varlen flash attention. Passing an all-ones attention_mask turns the detection off.
- Prompt tuning on a causal LM prepends `num_virtual_tokens(model)` positions to the
  logits; a loss computed outside the model must drop them first.
- ZeRO-3: `load_model` works on fully loaded weights that `deepspeed.initialize` then
  partitions (checked on CPU, gloo, with resizing and LoRA). A caller that wants the
  weights partitioned while loading keeps a `transformers.integrations.HfDeepSpeedConfig`
  alive before calling it (transformers uses zero.Init where it can); `param_groups`
  reads `ds_shape` for parameters that are already partitioned.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Optional, Sequence

from chatsft.builtin import resolve
from chatsft.errors import UserError

if TYPE_CHECKING:  # torch is imported lazily: the CLI loads this module for tokenizers alone
    import torch

    from chatsft.config import Config, TrainConfig

# Attribute set on a model whose embedding matrix was grown for new tokens: an adapter
# export must then carry the embedding layers, or the adapter cannot be loaded back.
RESIZED_ATTR = "chatsft_resized_vocab"

# Per model_type, the projections LoRA adapts by default: every attention and MLP
# matrix (LoRA on all linear layers matches full fine-tuning far better than q,v alone;
# QLoRA paper, Dettmers et al. 2023). Names absent from a model are dropped, so one
# entry can cover variants (T5 v1.0 `wi` vs gated v1.1/Flan `wi_0`, `wi_1`).
_DECODER_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: _DECODER_PROJ for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3",
                                  "gemma", "gemma2", "olmo", "olmo2", "granite")},
    **{t: ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo") for t in ("t5", "mt5", "umt5")},
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "chatglm": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


# ----------------------------------------------------------------------- tokenizer


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


# --------------------------------------------------------------------------- model


def load_dtype(cfg: "Config", cuda: Optional[bool] = None) -> "torch.dtype":
    """The dtype weights are loaded in (see the module docstring for the `auto` rule)."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.model.dtype != "auto":
        return names[cfg.model.dtype]
    if cfg.method.name == "qlora":
        return names[cfg.method.quant.compute_dtype]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    masters = cfg.train.deepspeed.enabled or cfg.method.name != "full"
    return half if (half is not None and cuda and masters) else torch.float32


def attn_implementation(cfg: "Config", dtype: "torch.dtype", cuda: Optional[bool] = None) -> Optional[str]:
    """The attention kernel to ask for; None lets transformers choose (sdpa, else eager)."""
    import torch

    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and dtype in (torch.bfloat16, torch.float16):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return None


def load_model(cfg: "Config", *, tokenizer: Any = None) -> "torch.nn.Module":
    """The model of `cfg.model` with `cfg.method` applied, in train mode, ready for DeepSpeed.

    `tokenizer` (optional) saves a second load; it sizes the embeddings (grown when
    the tokenizer has more tokens than the matrix) and seeds prompt tuning's init_text.
    """
    import torch

    method = cfg.method.name
    if method == "qlora":
        _check_qlora()
    if method == "prompt_tuning" and cfg.data.packing:
        raise UserError("method.name=prompt_tuning: does not work with data.packing=true "
                        "(the virtual tokens are prepended once per row, not per packed sequence)")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    kind = model_kind(cfg.model)
    dtype = load_dtype(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    if method == "qlora":
        kwargs["quantization_config"] = _bnb_config(cfg)
        zero3 = cfg.train.deepspeed.enabled and cfg.train.deepspeed.stage == 3
        if not zero3:  # ZeRO-3 places (and partitions) the weights itself
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = _from_pretrained(cfg, kind, kwargs, attn_implementation(cfg, dtype))

    base_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > base_vocab:
        # New special tokens (a chat template's markers): grow the matrix; the new rows
        # start at the mean of the old ones, so they barely move the initial outputs.
        model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache only costs memory in training

    if method == "full":
        if cfg.train.gradient_checkpointing:
            _enable_checkpointing(model)
    elif method in ("lora", "qlora"):
        model = _wrap_lora(cfg, model, kind, new_tokens=list(range(base_vocab, len(tokenizer))))
    elif method == "prompt_tuning":
        model = _wrap_prompt_tuning(cfg, model, kind, tokenizer)
    else:  # the config's Literal forbids this; a new method must be wired here
        raise AssertionError(f"method {method!r} not handled")
    if len(tokenizer) > base_vocab:
        setattr(model, RESIZED_ATTR, True)
    model.train()
    return model


def _from_pretrained(cfg: "Config", kind: str, kwargs: dict, attn: Optional[str]):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    path = resolve(cfg.model.name_or_path)
    try:
        if attn is not None:
            try:
                return auto.from_pretrained(path, attn_implementation=attn, **kwargs)
            except (ValueError, ImportError) as e:
                if cfg.model.attn_implementation != "auto":
                    raise UserError(f"model.attn_implementation={attn}: not usable here: "
                                    f"{_first_line(e)}") from None
                # auto picked flash attention but this architecture has none: default kernel
        return auto.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"model.name_or_path={cfg.model.name_or_path}: cannot load: {_first_line(e)}") from None


def _check_qlora() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("method.name=qlora needs a CUDA GPU (4-bit bitsandbytes weights) and none is "
                        "visible here; use method.name=lora on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("method.name=qlora needs bitsandbytes, which is not installed: "
                        "pip install chatsft[qlora]") from None


def _bnb_config(cfg: "Config"):
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.method.quant
    compute = getattr(torch, q.compute_dtype)
    extra = {}
    if cfg.train.deepspeed.enabled and cfg.train.deepspeed.stage == 3:
        # ZeRO-3 shards parameters by dtype: packing the 4-bit blocks into the compute
        # dtype lets it shard them like every other weight (QLoRA under ZeRO-3).
        extra["bnb_4bit_quant_storage"] = compute
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute, **extra)


def _enable_checkpointing(model) -> None:
    # Non-reentrant checkpointing works with frozen inputs and with ZeRO-3; newer
    # transformers renamed the method (the old name warns).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # A frozen embedding feeds checkpointed blocks inputs without grad; PEFT needs
        # them to have one (the new method above does this itself).
        model.enable_input_require_grads()


def default_target_modules(model) -> list[str]:
    """LoRA targets for `model`: the architecture's projections, else every Linear but the head."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    known = [t for t in LORA_TARGETS.get(getattr(model.config, "model_type", ""), ()) if t in names]
    if known:
        return known
    try:
        from transformers.pytorch_utils import Conv1D
        linear: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    except ImportError:
        linear = (torch.nn.Linear,)
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, linear) and m is not head]


def _new_token_rows(model, new_tokens: Sequence[int], saved: Sequence[str]) -> Optional[dict]:
    """Tokens added to the vocabulary get trainable embedding rows (and head rows when untied).

    A frozen base would otherwise keep their mean-initialized rows forever. Only
    those rows train (PEFT trainable tokens), not the whole matrix, unless the user
    already trains the module fully through modules_to_save.
    """
    if not new_tokens:
        return None
    rows = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        name = next(n for n, m in model.named_modules() if m is module).rsplit(".", 1)[-1]
        tied = module is model.get_output_embeddings() and \
            module.weight is model.get_input_embeddings().weight
        if name not in saved and not tied:  # a tied head follows the embedding's rows
            rows[name] = list(new_tokens)
    return rows or None


def _task_type(kind: str):
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM


def _record_base(peft_model, cfg: "Config") -> None:
    # The adapter names the base as the config does (a hub id or `builtin:...`), not
    # the local cache folder it was loaded from, so it loads back on any machine.
    conf = peft_model.peft_config["default"]
    conf.base_model_name_or_path = cfg.model.name_or_path
    conf.revision = cfg.model.revision


def _wrap_lora(cfg: "Config", model, kind: str, new_tokens: Sequence[int] = ()):
    from peft import LoraConfig, get_peft_model

    lc = cfg.method.lora
    if cfg.method.name == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms and the head to fp32 and freezes the base; checkpointing here too.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.train.gradient_checkpointing:
        _enable_checkpointing(model)
    targets = default_target_modules(model) if lc.target_modules == "auto" else list(lc.target_modules)
    conf = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                      modules_to_save=list(lc.modules_to_save) or None, bias="none",
                      task_type=_task_type(kind),
                      trainable_token_indices=_new_token_rows(model, new_tokens, lc.modules_to_save))
    try:
        peft_model = get_peft_model(model, conf)
    except ValueError as e:  # a target name that matches nothing
        raise UserError(f"method.lora.target_modules={targets}: {_first_line(e)}") from None
    _record_base(peft_model, cfg)
    return peft_model


def _wrap_prompt_tuning(cfg: "Config", model, kind: str, tokenizer):
    from peft import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    pc = cfg.method.prompt_tuning
    if cfg.train.gradient_checkpointing:
        _enable_checkpointing(model)
    if pc.variant == "p_tuning":
        conf = PromptEncoderConfig(task_type=_task_type(kind), num_virtual_tokens=pc.num_virtual_tokens,
                                   encoder_hidden_size=pc.encoder_hidden_size)
    else:
        conf = PromptTuningConfig(task_type=_task_type(kind), num_virtual_tokens=pc.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    peft_model = get_peft_model(model, conf)
    if pc.variant == "prompt_tuning" and pc.init_text:
        _init_prompt_from_text(peft_model, tokenizer, pc.init_text, pc.num_virtual_tokens)
    _record_base(peft_model, cfg)
    return peft_model


def _init_prompt_from_text(peft_model, tokenizer, text: str, n: int) -> None:
    """PromptTuningInit.TEXT done with our tokenizer: the text's token embeddings, cycled to n.

    PEFT's own TEXT init reloads the tokenizer by name and drops trust_remote_code;
    doing it here works for every tokenizer load_tokenizer can open.
    """
    import torch
    from peft.utils.integrations import gather_params_ctx

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("method.prompt_tuning.init_text: tokenizes to nothing")
    ids = (ids * (n // len(ids) + 1))[:n]
    words = peft_model.word_embeddings
    with gather_params_ctx(words.parameters()), torch.no_grad():
        init = words(torch.tensor(ids, device=words.weight.device)).detach().clone()
    table = peft_model.prompt_encoder["default"].embedding
    with torch.no_grad():
        table.weight.copy_(init.to(table.weight.dtype))
    conf = peft_model.peft_config["default"]
    conf.prompt_tuning_init_text = text  # recorded in adapter_config.json for provenance


def num_virtual_tokens(model) -> int:
    """Positions prompt tuning prepends to a causal LM's logits (0 for other models)."""
    conf = _active_peft_config(model)
    if conf is None or not conf.is_prompt_learning or conf.task_type == "SEQ_2_SEQ_LM":
        return 0
    return conf.num_virtual_tokens


def _active_peft_config(model):
    confs = getattr(model, "peft_config", None)
    if not isinstance(confs, dict) or not confs:
        return None
    return confs[getattr(model, "active_adapter", "default")]


def _is_peft(model) -> bool:
    return _active_peft_config(model) is not None


# ------------------------------------------------------------------ param groups


def param_groups(model, train_cfg: "TrainConfig") -> list[dict]:
    """Trainable parameters grouped by role and decay, for AdamW.

    Roles: `embeddings` (the input embedding module, including LoRA/modules_to_save
    pieces inside it), `head` (the output embeddings when they are not the same tensor
    as the input ones), `matrices` (everything else, prompt tuning's virtual tokens
    too). Learning rate: `train.lr_groups.<role>` or `train.lr`. Weight decay applies
    to tensors of 2 or more dimensions only (never norms, biases or other vectors).
    Each group: {"name": "<role>/decay|no_decay", "params", "lr", "weight_decay"};
    empty groups are left out, every trainable parameter is in exactly one group.
    """
    embed_ids = _module_param_ids(model.get_input_embeddings())
    head_ids = _module_param_ids(model.get_output_embeddings()) - embed_ids
    buckets: dict[tuple[str, bool], list] = {}
    for _, p in model.named_parameters():  # shared (tied) tensors come once
        if not p.requires_grad:
            continue
        role = "embeddings" if id(p) in embed_ids else "head" if id(p) in head_ids else "matrices"
        # ZeRO-3 partitioned parameters are flat; ds_shape keeps the real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        buckets.setdefault((role, ndim >= 2), []).append(p)
    groups = []
    for role in ("embeddings", "head", "matrices"):
        lr = getattr(train_cfg.lr_groups, role)
        for decay in (True, False):
            params = buckets.get((role, decay))
            if params:
                groups.append({
                    "name": f"{role}/{'decay' if decay else 'no_decay'}",
                    "params": params,
                    "lr": train_cfg.lr if lr is None else lr,
                    "weight_decay": train_cfg.weight_decay if decay else 0.0,
                })
    return groups


def _module_param_ids(module) -> set[int]:
    return set() if module is None else {id(p) for p in module.parameters()}


# -------------------------------------------------------------------------- export


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
    if not _is_peft(model):
        _save_full(model, tokenizer, out_dir, stop_tokens)
        return out_dir
    conf = _active_peft_config(model)
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
    base = model.get_base_model() if _is_peft(model) else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "hf_quantizer", None) is not None)


def _merge_into_fresh_base(model):
    """Merge the adapter into an unquantized copy of the base, reloaded from its source.

    Merging into 4-bit weights would round the merged result back to 4 bits; the
    adapter was trained against dequantized weights, so merge into those instead.
    """
    import torch
    from peft import PeftModel

    conf = _active_peft_config(model)
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    conf = AutoConfig.from_pretrained(path, **kwargs)
    return AutoModelForSeq2SeqLM if getattr(conf, "is_encoder_decoder", False) else AutoModelForCausalLM


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
