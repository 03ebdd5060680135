"""The trained model as a Hugging Face folder: at the end of training, and `chatsft export`.

The model-side work (PEFT merge or adapter alone, tokenizer files) is
chatsft.model.export_model's; this module only gets it a complete, unwrapped
model: from the live engine (sharded weights gathered first: Engine.full_state_dict) or from
a checkpoint folder of any engine (chatsft.train.engines.checkpoint_weights).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from chatsft import storage
from chatsft.errors import UserError
from chatsft.plan import EXPORT_MARKER, RunPlan
from chatsft.train.progress import say


def export_from_engine(engine: Any, tokenizer: Any, plan: RunPlan, *, rank: int,
                       out_dir: Optional[str] = None) -> Optional[str]:
    """Called on every rank (gathering sharded weights is collective); rank 0 writes `out_dir`
    (default: the run's model folder)."""
    from chatsft.model import export_model, load_model
    from chatsft.train.engines import load_weights

    cfg = plan.config
    if engine.shards:
        state = engine.full_state_dict(rank)  # collective; the full weights on rank 0 only
        if rank != 0:
            return None
        model = load_model(cfg, plan.kind, tokenizer=tokenizer)
        load_weights(model, state, f"the gathered {engine.kind} weights")
    else:
        if rank != 0:
            return None
        model = engine.model  # whole weights on every rank
    return _write(model, tokenizer, out_dir or plan.model_dir, plan, merged=cfg.method.export == "merged",
                  export_model=export_model, stop_tokens=stop_tokens(plan, tokenizer), inplace=True)


def stop_tokens(plan: RunPlan, tokenizer: Any) -> tuple[str, ...]:
    """The format's end-of-turn marker: generation from the exported model stops there (and at EOS)."""
    eot = plan.kind.format(plan.config.data.template, tokenizer, plan.config.data.think).end_of_turn
    return () if eot is None else (eot,)


def _write(model: Any, tokenizer: Any, out_dir: str, plan: RunPlan, *, merged: bool, export_model,
           checkpoint: Optional[str] = None, **options: Any) -> str:
    """Write the folder locally, then publish it whole at `out_dir` (a local path or a URI), with
    the marker that tells a later export (and a later run) what it is and whose."""
    import json

    model.eval()
    with storage.staged_dir(out_dir) as tmp:
        export_model(model, tokenizer, tmp, merged=merged, **options)
        form = "adapter" if os.path.exists(os.path.join(tmp, "adapter_config.json")) else "model"
        with open(os.path.join(tmp, EXPORT_MARKER), "w", encoding="utf-8") as f:
            # "kind" is the marker's key since the first exports: later chatsft versions read it
            json.dump({"kind": form, "run": plan.config.run.name, "output_dir": plan.output_dir,
                       "checkpoint": checkpoint}, f, indent=1)
    say(f"exported model to {out_dir}")
    return out_dir


def export_form(plan: RunPlan, adapter_only: bool) -> str:
    """What `chatsft export` writes: "adapter" (a PEFT adapter alone) or "model" (full weights)."""
    method = plan.config.method
    if method.name == "full":
        if adapter_only:
            raise UserError("--adapter-only: method.name=full trains every weight, there is no adapter to "
                            "export; leave --adapter-only out (the full model is exported)")
        return "model"
    return "adapter" if adapter_only or method.export == "adapter" or method.name == "prompt_tuning" else "model"


def check_out(plan: RunPlan, out: Optional[str], form: str, force: bool) -> str:
    """Where `chatsft export` may write: the folder is replaced whole, so it must be the run's own
    model folder, a new or empty one, or a previous export of the same kind; any other folder
    only with --force; never the run's folder, one above it or the working folder, or inside the
    checkpoints or rows (not even with --force)."""
    import json

    if out is None:
        return plan.model_dir
    target = storage.absolute(out).rstrip("/") or "/"
    if target == plan.model_dir:
        return target
    never = [(plan.output_dir, "the run's output folder (run.output_dir)"),
             (plan.checkpoint_dir, "the run's checkpoint folder"), (plan.data_dir, "the run's prepared rows")]
    if storage.is_local(target):
        never += [(os.getcwd(), "the working folder"), (os.path.expanduser("~"), "the home folder")]
    for folder, what in never:
        if _within(folder, target):
            where = "is" if _same(folder, target) else "holds"
            raise UserError(f"--out {out}: it {where} {what} ({folder}); an export replaces the folder it is "
                            "written to, so it goes into a folder of its own (e.g. a new one)")
    for folder, what in never[1:3]:
        if _within(target, folder):
            raise UserError(f"--out {out}: it is inside {what} ({folder}); export into a folder of its own")
    if storage.is_file(target):
        raise UserError(f"--out {out}: is a file; give a folder (a new one, or a previous export)")
    held = storage.list_files(target, recursive=True) if storage.is_dir(target) else []
    if not held or force:
        return target
    text = storage.read_text(storage.join(target, EXPORT_MARKER))
    try:
        marker = json.loads(text) if text else None
    except ValueError:
        marker = None
    if isinstance(marker, dict) and marker.get("kind") == form:
        return target
    if isinstance(marker, dict):
        raise UserError(f"--out {out}: holds a previous export of another kind ({marker.get('kind')}, this one "
                        f"is {form}); export into another folder, or add --force to replace it")
    names = sorted(os.path.relpath(f.path, target) if storage.is_local(target) else f.path[len(target) + 1:]
                   for f in held)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise UserError(f"--out {out}: the folder is not empty and is not a chatsft export ({shown}); an export "
                    "replaces the whole folder, so give a new or empty one, or add --force to replace it")


def _same(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _within(inner: str, outer: str) -> bool:
    """`inner` is `outer` or a path below it (local paths or URIs, both absolute)."""
    inner, outer = inner.rstrip("/"), outer.rstrip("/")
    return inner == outer or inner.startswith(outer + "/") or (outer == "" and inner.startswith("/"))


def export_cli(plan: RunPlan, checkpoint: Optional[str] = None, out: Optional[str] = None,
               adapter_only: bool = False, force: bool = False) -> str:
    """`chatsft export`: the newest whole (or the given) checkpoint of the run -> a Hugging Face
    folder, written only where `check_out` allows."""
    from chatsft.model import export_model, load_model, load_tokenizer
    from chatsft.train.checkpoint import problem_of, usable
    from chatsft.train.engines import checkpoint_weights, load_weights

    cfg = plan.config
    target = check_out(plan, out, export_form(plan, adapter_only), force)
    if checkpoint is None:
        folder, skipped = usable(plan.checkpoint_dir)
        for f in skipped:
            say(f"skipping {f.path}: {f.problem}")
    else:
        folder = storage.absolute(checkpoint)
    if folder is None:
        raise UserError(f"run.output_dir={cfg.run.output_dir}: no checkpoint of run {cfg.run.name!r} found "
                        "(train first, or pass --checkpoint)")
    if not storage.is_dir(folder):
        raise UserError(f"--checkpoint {checkpoint}: no such folder")
    problem = problem_of(folder) if checkpoint is not None else None
    if problem:
        raise UserError(f"--checkpoint {checkpoint}: {problem}")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, plan.kind, tokenizer=tokenizer)
    with storage.scratch("chatsft-checkpoint-") as local:
        if storage.is_uri(folder):
            storage.copy_tree(folder, local)
        load_weights(model, checkpoint_weights(local if storage.is_uri(folder) else folder),
                      f"the weights in {folder}")
    merged = cfg.method.export == "merged" and not adapter_only
    return _write(model, tokenizer, target, plan, merged=merged, export_model=export_model,
                  checkpoint=folder,
                  stop_tokens=stop_tokens(plan, tokenizer), inplace=True)
