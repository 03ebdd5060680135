"""Small helpers the model modules share."""

from __future__ import annotations


def enable_checkpointing(model) -> None:
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
