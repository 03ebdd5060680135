"""What the run plan checks of a model before anything is prepared or loaded: the model's
config (never its weights) against the run's settings.

- the config must name a `model_type`: transformers builds no model without one, whatever
  `model.kind` says;
- `data.max_length` must fit the model's positions (`max_position_embeddings` or its
  architecture's name for it);
- `scaling.sequence_parallel` must divide the attention and key-value heads;
- every `method.lora.target_modules` entry must name a layer LoRA can adapt. The module
  names come from the model built on the meta device (shapes only: no memory, no weights
  read), the same names PEFT matches the targets against.
"""

from __future__ import annotations

from typing import Any, Optional

from chatsft.builtin import resolve
from chatsft.config import ConfigError
from chatsft.errors import UserError, one_line

# What architectures call the number of positions they were built for.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")


def check_model(cfg: Any, kind: Any) -> None:
    """Refuse, naming the key, what the model's config says cannot work (see the module doc)."""
    conf = model_config(cfg.model)
    positions = max_positions(conf)
    if positions and cfg.data.max_length > positions:
        key = next(k for k in POSITION_KEYS if getattr(conf, k, None) == positions)
        raise ConfigError(f"data.max_length={cfg.data.max_length}: the model {cfg.model.name_or_path} has "
                          f"{positions} positions ({key} in its config.json); set data.max_length <= {positions}")
    _check_heads(cfg, conf)
    lora = cfg.method.lora
    if cfg.method.name in ("lora", "qlora") and lora.target_modules != "auto":
        _check_targets(cfg, conf, kind, list(lora.target_modules))


def _check_heads(cfg: Any, conf: Any) -> None:
    """Sequence parallelism hands each of its N ranks H/N attention heads and Hkv/N key-value heads."""
    n = cfg.scaling.sequence_parallel
    if n == 1:
        return
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    heads = getattr(text, "num_attention_heads", None)
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads",
                                                         getattr(text, "num_key_value_heads", None) or heads)):
        if not value or value % n:
            raise ConfigError(f"scaling.sequence_parallel={n}: the model {cfg.model.name_or_path} has {key}="
                              f"{value} (config.json), not divisible by {n}; use a divisor of it")


def model_config(model_cfg: Any) -> Any:
    """The model's transformers config (config.json alone), or one line naming what is wrong."""
    from transformers import AutoConfig

    path = resolve(model_cfg.name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                          revision=model_cfg.revision)
    except (OSError, ValueError, KeyError) as e:
        if "model_type" in str(e):
            raise UserError(missing_model_type(model_cfg.name_or_path, path)) from None
        raise UserError(f"model.name_or_path={model_cfg.name_or_path}: cannot read its config: "
                        f"{one_line(e)}") from None


def missing_model_type(name: str, path: str) -> str:
    """The one line for a config.json without `model_type`, with the value to add when its
    `architectures` tell it."""
    import json
    import os

    hint = ""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

        names = {**MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
        found = [t for arch in archs[:1] for t, a in names.items() if a == arch]
        # several types share an architecture class (exaone, llama, ... -> LlamaForCausalLM): its own first
        found.sort(key=lambda t: not archs[0].lower().startswith(t.replace("_", "")))
        if found:
            hint = f' ("model_type": "{found[0]}" for its architecture {archs[0]})'
    except (OSError, ValueError, AttributeError):
        pass
    return (f"model.name_or_path={name}: its config.json names no model_type, which transformers needs to "
            f"build the model (model.kind does not replace it); add it to {path}/config.json{hint}")


def max_positions(conf: Any) -> Optional[int]:
    """The positions the model was built for, or None when it has no such limit (T5)."""
    for key in POSITION_KEYS:
        value = getattr(conf, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_targets(cfg: Any, conf: Any, kind: Any, targets: list[str]) -> None:
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
        adaptable: tuple[type, ...] = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    except ImportError:
        adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    auto = kind.auto()
    with torch.device("meta"):
        model = auto.from_config(conf, trust_remote_code=cfg.model.trust_remote_code)
    modules = list(model.named_modules())
    layers = sorted({n.rsplit(".", 1)[-1] for n, m in modules if n and isinstance(m, adaptable)})
    for target in targets:
        # PEFT's rule for a list of names: a module's full name, or its name after a dot
        matched = [m for n, m in modules if n == target or n.endswith("." + target)]
        if not matched:
            raise ConfigError(f"method.lora.target_modules: {target!r} is no module of {cfg.model.name_or_path}; "
                              f"its layers LoRA can adapt are named {', '.join(layers)}")
        if not any(isinstance(m, adaptable) for m in matched):
            raise ConfigError(f"method.lora.target_modules: {target!r} is a {type(matched[0]).__name__}, not a "
                              f"layer LoRA can adapt; name its layers instead ({', '.join(layers)})")
