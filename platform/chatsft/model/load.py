"""Model loading: the model of `model.*` with `method.*` applied, ready for the trainer.

Rules this module decides (the trainer relies on them):

- `load_model` returns the model in train mode on the CPU (QLoRA: on the current CUDA
  device), with the method applied. DeepSpeed (or the trainer) moves and casts it.
- dtype `auto`: QLoRA loads non-quantized weights in `method.quant.compute_dtype`.
  Otherwise half precision (bf16/fp16 from `train.precision`) only where a CUDA GPU is
  present and something keeps fp32 master weights or fp32 trainables: DeepSpeed
  (its bf16/fp16 optimizers hold fp32 masters) or a PEFT method (PEFT keeps adapter
  weights in fp32; the frozen base can be half). Everywhere else fp32: on CPU bf16
  matmuls are slow and DeepSpeed's CPU path keeps fp32 masters anyway, and full
  fine-tuning on ddp has no master copy, so it trains fp32 weights under autocast,
  and FSDP2 steps the dtype it was given (its masters), computing in bf16. Checkpoints of Qwen2.5/Llama-3 are stored in bf16, so loading them in
  bf16 loses nothing. `train.bf16_master_weights: false` (bf16, train.engine=ddp) asks
  for bf16 weights anywhere: AdamW then steps the bf16 tensors themselves.
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
- ZeRO-3: `load_model` works on fully loaded weights that the DeepSpeed engine then
  partitions (checked on CPU, gloo, with resizing and LoRA). A caller that wants the
  weights partitioned while loading keeps a `transformers.integrations.HfDeepSpeedConfig`
  alive before calling it (transformers uses zero.Init where it can); `param_groups`
  reads `ds_shape` for parameters that are already partitioned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from chatsft.builtin import resolve
from chatsft.errors import UserError, one_line
from chatsft.model.common import enable_checkpointing
from chatsft.model.kind import ModelKind, as_kind
from chatsft.model.peft import RESIZED_ATTR, wrap_lora, wrap_prompt_tuning
from chatsft.model.tokenizer import load_tokenizer

if TYPE_CHECKING:  # torch is imported lazily: the CLI loads this package for tokenizers alone
    import torch

    from chatsft.config import Config


def load_dtype(cfg: "Config", cuda: Optional[bool] = None) -> "torch.dtype":
    """The dtype weights are loaded in (see the module docstring for the `auto` rule)."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.model.dtype != "auto":
        return names[cfg.model.dtype]
    if cfg.method.name == "qlora":
        return names[cfg.method.quant.compute_dtype]
    if not cfg.train.bf16_master_weights:  # the config allows it with bf16 and no DeepSpeed only
        return torch.bfloat16
    cuda = torch.cuda.is_available() if cuda is None else cuda
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    masters = cfg.train.engine == "deepspeed" or cfg.method.name != "full"
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


def load_model(cfg: "Config", kind: Union[ModelKind, str], *, tokenizer: Any = None) -> "torch.nn.Module":
    """The model of `cfg.model` with `cfg.method` applied, in train mode, ready for DeepSpeed.

    `tokenizer` (optional) saves a second load; it sizes the embeddings (grown when
    the tokenizer has more tokens than the matrix) and seeds prompt tuning's init_text.
    """
    import torch

    method = cfg.method.name
    if method == "qlora":
        _check_qlora()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    dtype = load_dtype(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    if method == "qlora":
        kwargs["quantization_config"] = _bnb_config(cfg)
        if not cfg.train.zero3:  # ZeRO-3 places (and partitions) the weights itself
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
            enable_checkpointing(model)
    elif method in ("lora", "qlora"):
        model = wrap_lora(model, kind, cfg.method, cfg.model, checkpointing=cfg.train.gradient_checkpointing,
                          new_tokens=list(range(base_vocab, len(tokenizer))))
    elif method == "prompt_tuning":
        model = wrap_prompt_tuning(model, kind, cfg.method, cfg.model, tokenizer,
                                   checkpointing=cfg.train.gradient_checkpointing)
    else:  # the config's Literal forbids this; a new method must be wired here
        raise AssertionError(f"method {method!r} not handled")
    if len(tokenizer) > base_vocab:
        setattr(model, RESIZED_ATTR, True)
    model.train()
    return model


def _from_pretrained(cfg: "Config", kind: Union[ModelKind, str], kwargs: dict, attn: Optional[str]):
    auto = as_kind(kind).auto()
    path = resolve(cfg.model.name_or_path)
    try:
        if attn is not None:
            try:
                return auto.from_pretrained(path, attn_implementation=attn, **kwargs)
            except (ValueError, ImportError) as e:
                if cfg.model.attn_implementation != "auto":
                    raise UserError(f"model.attn_implementation={attn}: not usable here: "
                                    f"{one_line(e)}") from None
                # auto picked flash attention but this architecture has none: default kernel
        return auto.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"model.name_or_path={cfg.model.name_or_path}: cannot load: {one_line(e)}") from None


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
    if cfg.train.zero3:
        # ZeRO-3 shards parameters by dtype: packing the 4-bit blocks into the compute
        # dtype lets it shard them like every other weight (QLoRA under ZeRO-3).
        extra["bnb_4bit_quant_storage"] = compute
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute, **extra)


def compile_model(model: "torch.nn.Module", how: str) -> str:
    """torch.compile in place (`train.compile`): every decoder layer, or the decoder body; the
    parameters and state-dict keys stay the module's own. Returns what was compiled ('' for off)."""
    if how == "off":
        return ""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None:
        raise UserError(f"train.compile={how}: {type(base).__name__} has no decoder body to compile; "
                        "use train.compile=off")
    if how == "decoder":
        decoder.compile()
        return f"the decoder ({type(decoder).__name__})"
    layers = decoder_layers(decoder)
    for layer in layers:
        layer.compile()  # one code object: the layers share a graph (guards on shapes, not weights)
    return f"{len(layers)} decoder layers ({type(layers[0]).__name__})"


def decoder_layers(decoder: "torch.nn.Module") -> list:
    """The repeated blocks of a decoder body: its longest ModuleList of one class."""
    import torch

    lists = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and len({type(c) for c in m}) == 1]
    if not lists:
        raise UserError(f"train.compile=layers: no list of layers found in {type(decoder).__name__}; "
                        "use train.compile=decoder or off")
    return list(max(lists, key=len))
