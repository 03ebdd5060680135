"""PEFT methods: LoRA / QLoRA adapters and prompt tuning around a loaded base model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

from chatsft.errors import UserError, one_line
from chatsft.model.common import enable_checkpointing
from chatsft.model.kind import ModelKind, as_kind

if TYPE_CHECKING:
    from chatsft.config import MethodConfig, ModelConfig

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


def _record_base(peft_model, base: "ModelConfig") -> None:
    # The adapter names the base as the config does (a hub id or `builtin:...`), not
    # the local cache folder it was loaded from, so it loads back on any machine.
    conf = peft_model.peft_config["default"]
    conf.base_model_name_or_path = base.name_or_path
    conf.revision = base.revision


def wrap_lora(model, kind: Union[ModelKind, str], method: "MethodConfig", base: "ModelConfig", *,
              checkpointing: bool, new_tokens: Sequence[int] = ()):
    """LoRA (or QLoRA) adapters of `method` around `model`, the base named as `base` names it;
    `checkpointing`: train.gradient_checkpointing."""
    from peft import LoraConfig, get_peft_model

    lc = method.lora
    if method.name == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms and the head to fp32 and freezes the base; checkpointing here too.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        enable_checkpointing(model)
    targets = default_target_modules(model) if lc.target_modules == "auto" else list(lc.target_modules)
    conf = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                      modules_to_save=list(lc.modules_to_save) or None, bias="none",
                      task_type=as_kind(kind).task_type(),
                      trainable_token_indices=_new_token_rows(model, new_tokens, lc.modules_to_save))
    try:
        peft_model = get_peft_model(model, conf)
    except ValueError as e:  # a target name that matches nothing
        raise UserError(f"method.lora.target_modules={targets}: {one_line(e)}") from None
    _record_base(peft_model, base)
    return peft_model


def wrap_prompt_tuning(model, kind: Union[ModelKind, str], method: "MethodConfig", base: "ModelConfig",
                       tokenizer, *, checkpointing: bool):
    """Prompt tuning (or p-tuning) of `method` around `model`."""
    from peft import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    pc = method.prompt_tuning
    if checkpointing:
        enable_checkpointing(model)
    if pc.variant == "p_tuning":
        conf = PromptEncoderConfig(task_type=as_kind(kind).task_type(), num_virtual_tokens=pc.num_virtual_tokens,
                                   encoder_hidden_size=pc.encoder_hidden_size)
    else:
        conf = PromptTuningConfig(task_type=as_kind(kind).task_type(), num_virtual_tokens=pc.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    peft_model = get_peft_model(model, conf)
    if pc.variant == "prompt_tuning" and pc.init_text:
        _init_prompt_from_text(peft_model, tokenizer, pc.init_text, pc.num_virtual_tokens)
    _record_base(peft_model, base)
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
    conf = active_peft_config(model)
    if conf is None or not conf.is_prompt_learning or conf.task_type == "SEQ_2_SEQ_LM":
        return 0
    return conf.num_virtual_tokens


def active_peft_config(model):
    confs = getattr(model, "peft_config", None)
    if not isinstance(confs, dict) or not confs:
        return None
    return confs[getattr(model, "active_adapter", "default")]


def is_peft(model) -> bool:
    return active_peft_config(model) is not None
