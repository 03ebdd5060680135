"""The trained model as a Hugging Face folder: at the end of training, and `chatsft export`.

The model-side work (PEFT merge or adapter alone, tokenizer files) is
chatsft.model.export_model's; this module only gets it a complete, unwrapped
model: from the live engine (ZeRO-3 weights gathered first) or from a
checkpoint folder.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

from chatsft import storage
from chatsft.errors import UserError
from chatsft.plan import RunPlan
from chatsft.train.progress import say


def export_from_engine(engine: Any, tokenizer: Any, plan: RunPlan, *, rank: int,
                       out_dir: Optional[str] = None) -> Optional[str]:
    """Called on every rank (ZeRO-3 gathering is collective); rank 0 writes `out_dir`
    (default: the run's model folder)."""
    from chatsft.model import export_model, load_model

    cfg = plan.config
    if engine.ds is not None and engine.ds.zero_optimization_stage() == 3:
        state = engine.ds._zero3_consolidated_16bit_state_dict()  # full weights on rank 0 only
        if rank != 0:
            return None
        model = load_model(cfg, plan.kind, tokenizer=tokenizer)
        _load_weights(model, state, "the gathered ZeRO-3 weights")
    else:
        if rank != 0:
            return None
        model = engine.model  # ZeRO 0-2 and the torch path keep whole weights on every rank
    return _write(model, tokenizer, out_dir or plan.model_dir, merged=cfg.method.export == "merged",
                  export_model=export_model, stop_tokens=stop_tokens(plan, tokenizer), inplace=True)


def stop_tokens(plan: RunPlan, tokenizer: Any) -> tuple[str, ...]:
    """The format's end-of-turn marker: generation from the exported model stops there (and at EOS)."""
    from chatsft.data.formats import get_format

    eot = get_format(plan.kind, plan.config.data.template, tokenizer, plan.config.data.think).end_of_turn
    return () if eot is None else (eot,)


def _write(model: Any, tokenizer: Any, out_dir: str, *, merged: bool, export_model, **options: Any) -> str:
    """Write the folder locally, then publish it whole at `out_dir` (a local path or a URI)."""
    model.eval()
    with storage.staged_dir(out_dir) as tmp:
        export_model(model, tokenizer, tmp, merged=merged, **options)
    say(f"exported model to {out_dir}")
    return out_dir


def _load_weights(model: Any, state: dict, what: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise UserError(f"{what} do not match the model of model.name_or_path / method: "
                        f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")


def checkpoint_weights(folder: str) -> dict:
    """The model weights stored in a checkpoint folder written by the training loop."""
    import torch

    torch_state = os.path.join(folder, "torch_state.pt")
    if os.path.exists(torch_state):
        return torch.load(torch_state, map_location="cpu", weights_only=False)["model"]
    tag_dir = os.path.join(folder, "state")
    if not os.path.isdir(tag_dir):
        raise UserError(f"{folder}: not a chatsft checkpoint (no DeepSpeed 'state' folder, no torch_state.pt)")
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    model_states = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
    zero3 = False
    if model_states:
        meta = torch.load(model_states[0], map_location="cpu", weights_only=False)
        zero3 = meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 3
        if not zero3 and meta.get("module"):
            return meta["module"]  # ZeRO 0-2: the full module is in rank 0's model states
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(folder, tag="state")


def export_cli(plan: RunPlan, checkpoint: Optional[str] = None, out: Optional[str] = None,
               adapter_only: bool = False) -> str:
    """`chatsft export`: the latest (or given) checkpoint of the run -> a Hugging Face folder."""
    from chatsft.model import export_model, load_model, load_tokenizer
    from chatsft.train.checkpoint import latest

    cfg = plan.config
    folder = checkpoint or latest(plan.checkpoint_dir)
    if folder is None:
        raise UserError(f"run.output_dir={cfg.run.output_dir}: no checkpoint of run {cfg.run.name!r} found "
                        "(train first, or pass --checkpoint)")
    if not storage.is_dir(folder):
        raise UserError(f"--checkpoint {folder}: no such folder")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, plan.kind, tokenizer=tokenizer)
    with storage.scratch("chatsft-checkpoint-") as local:
        if storage.is_uri(folder):
            storage.copy_tree(folder, local)
            folder = local
        _load_weights(model, checkpoint_weights(folder), f"the weights in {folder}")
    merged = cfg.method.export == "merged" and not adapter_only
    return _write(model, tokenizer, out or plan.model_dir, merged=merged, export_model=export_model,
                  stop_tokens=stop_tokens(plan, tokenizer), inplace=True)
