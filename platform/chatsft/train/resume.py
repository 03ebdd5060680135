"""The resume contract: a run that finds checkpoints in its folder resumes only the run it is.

Every checkpoint carries a manifest (`chatsft_run.json`) of what the run was:
what shaped its rows (the prepare identity: data keys, tokenizer, the content
hash of every source file, code, seed), the model, the method, the rows per optimizer step, and the
optimization settings. Before anything is prepared or trained, the driver
compares the latest checkpoint's manifest with the run about to start:

- rows, model, method or rows per step differ: refused, in one line naming the
  keys and the ways out (the number of workers alone may change: see below) (another `run.output_dir`, or `train.resume=never`,
  which moves the old checkpoints, model and result.json aside under
  `archive/<time>/` and starts fresh; nothing is deleted);
- optimization settings differ (lr, betas, schedule, warmup, clipping, epochs,
  max_steps, ...): applied from the resumed step on. The optimizer's state
  (moments) comes from the checkpoint, its hyperparameters always from the
  config; the change is said in the log, in result.json and in MLflow;
- the number of workers differs, micro-batch size and accumulation as they were:
  resumed elastically. The rows per step (the global batch) are the checkpoint's,
  so accumulation becomes rows per step / (micro-batch x workers) (refused, naming
  the keys, if that is not a whole number); the data order does not depend on
  the worker count (chatsft.data.order), so the run goes on at the exact row,
  and the engine loads its state at the new world size (train/engines/); a checkpoint
  of another train.engine is refused, in one line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from chatsft import storage
from chatsft.config import replaced
from chatsft.errors import UserError
from chatsft.plan import RunPlan
from chatsft.train import checkpoint as ckpt
from chatsft.train.progress import say

MANIFEST = "chatsft_run.json"
VERSION = 2  # 2: the data order of chatsft.data.order by lanes (a version-1 position means other rows)
# Training keys whose change a resumed run applies (the rest of `train` shapes what a step is).
OPTIMIZATION = ("lr", "lr_groups", "betas", "eps", "weight_decay", "schedule", "warmup_steps", "warmup_ratio",
                "init_lr_frac", "min_lr_frac", "clip_grad", "epochs", "max_steps")


@dataclass
class Resume:
    """What the driver found: a fresh run, or the checkpoint it resumes and what changed."""

    manifest: dict  # this run's, written into every checkpoint it saves
    checkpoint: Optional[str] = None  # None: fresh
    step: int = 0
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (checkpoint's, now)
    archived: Optional[str] = None  # where train.resume=never moved the old run
    workers: Optional[tuple[int, int]] = None  # (checkpoint's, now) when the worker count changed
    accum: Optional[tuple[int, int]] = None  # train.grad_accum (checkpoint's, now) that keeps rows per step
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder, problem): newer, not whole

    def describe(self) -> str:
        if self.checkpoint is None:
            moved = f" (the previous run was moved to {self.archived})" if self.archived else ""
            return f"fresh run: no checkpoint to resume{moved}"
        text = f"resuming from {self.checkpoint} at step {self.step}"
        if self.workers and self.workers[0] != self.workers[1]:
            text += (f" on {self.workers[1]} workers (was {self.workers[0]}); accumulation "
                     f"{self.accum[0]} -> {self.accum[1]}, {self.manifest['rows_per_step']} rows per step as before")
        elif self.workers:
            text += (f" with accumulation {self.accum[1]}, keeping the checkpoint's "
                     f"{self.manifest['rows_per_step']} rows per step")
        if self.changed:
            text += "; changed since, applied from this step: " + ", ".join(
                f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in self.changed.items())
        return text

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "step": self.step, "archived": self.archived,
                "skipped": [{"checkpoint": path, "problem": problem} for path, problem in self.skipped],
                "changed": {k: {"was": a, "now": b} for k, (a, b) in self.changed.items()},
                "workers": list(self.workers) if self.workers else None,
                "grad_accum": list(self.accum) if self.accum else None}

    def apply(self, plan: RunPlan) -> RunPlan:
        """The plan that resumes: with the checkpoint's rows per step when the worker count changed."""
        if not self.accum:
            return plan
        train = replaced(plan.config.train, "train", grad_accum=self.accum[1])
        return dataclasses.replace(plan, config=replaced(plan.config, train=train),
                                   global_batch=self.manifest["rows_per_step"])


def manifest(plan: RunPlan, rows: Optional[dict]) -> dict:
    """This run's manifest; `rows` is the prepare identity (None for rows written by a caller)."""
    cfg = plan.config.to_dict()
    return {
        "version": VERSION,
        "rows": rows,
        "model": {k: cfg["model"][k] for k in ("name_or_path", "tokenizer", "revision", "kind", "dtype",
                                               "trust_remote_code")} | {"resolved_kind": plan.kind.name},
        "method": {k: v for k, v in cfg["method"].items() if k != "export"},
        "rows_per_step": plan.global_batch,
        # as configured: with another worker count the rows per step stay the checkpoint's (_elastic)
        # workers: the data-parallel ones (a sequence group of scaling.sequence_parallel reads as one)
        "batch": {"micro_batch_size": cfg["train"]["micro_batch_size"], "grad_accum": cfg["train"]["grad_accum"],
                  "workers": plan.data_parallel, "sequence_parallel": plan.sequence_parallel},
        "optimization": {k: cfg["train"][k] for k in OPTIMIZATION},
    }


def check_resume(plan: RunPlan, rows: Optional[dict]) -> Resume:
    """Compare with the latest checkpoint of the run's folder; refuse, archive, or resume."""
    mine = manifest(plan, rows)
    if plan.config.train.resume == "never":
        anything = storage.exists(plan.checkpoint_dir) or storage.exists(plan.model_dir) or storage.exists(
            plan.result_path)
        return Resume(mine, archived=archive(plan) if anything else None)
    latest, broken = ckpt.usable(plan.checkpoint_dir)
    skipped = [(f.path, f.problem) for f in broken]
    for path, problem in skipped:  # said at once: also when the comparison below refuses the run
        say(f"skipping {path}: {problem}")
    if latest is None:
        return Resume(mine, skipped=skipped)
    text = storage.read_text(storage.join(latest, MANIFEST))
    if text is None:
        raise UserError(f"run.output_dir={plan.config.run.output_dir}: {latest} was written without a run "
                        "manifest (an older chatsft), so what it trained is unknown; " + _ways_out())
    theirs = json.loads(text)
    workers, accum = _elastic(theirs, mine, lambda: ckpt.read_state_at(latest)[0].world_size)
    if workers:  # the run's global batch stays the checkpoint's
        mine = mine | {"rows_per_step": theirs["rows_per_step"]}
    differ = _differences(theirs, mine)
    if differ:
        shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise UserError(f"run.output_dir={plan.config.run.output_dir}: its checkpoint {storage.basename(latest)} "
                        f"is of another run ({shown}); " + _ways_out())
    changed = {f"train.{k}": (theirs["optimization"].get(k), v) for k, v in mine["optimization"].items()
               if theirs["optimization"].get(k) != v}
    state, _ = ckpt.read_state_at(latest)
    check_engine(latest, state, plan.config.train.engine)
    return Resume(mine, checkpoint=latest, step=state.step, changed=changed, workers=workers, accum=accum,
                  skipped=skipped)


def _elastic(theirs: dict, mine: dict,
             saved_world: Callable[[], int]) -> tuple[Optional[tuple[int, int]], Optional[tuple[int, int]]]:
    """(workers, accumulation) as (checkpoint's, now) when the configured micro-batch and accumulation
    are the checkpoint's and only the number of workers (the checkpoint's: `saved_world()`, now)
    makes the rows per step differ."""
    a, b = theirs.get("batch"), mine["batch"]
    # a manifest of a chatsft before sequence parallelism: N=1
    a, b = ({"sequence_parallel": 1} | a if a else a), {"sequence_parallel": 1} | b
    if not a or a != b | {"workers": a["workers"]} or theirs["rows_per_step"] == mine["rows_per_step"]:
        return None, None
    was = saved_world() // a["sequence_parallel"]  # data-parallel workers of the checkpoint's run
    G, micro, W = theirs["rows_per_step"], b["micro_batch_size"], b["workers"]
    if G % (micro * W):
        raise UserError(f"scaling.num_workers={W}: the checkpoint's run takes {G} rows per optimizer step "
                        f"({was} workers x train.micro_batch_size {micro} x accumulation {G // (micro * was)}), "
                        f"which {W} workers cannot share in micro-batches of train.micro_batch_size={micro}; "
                        f"choose scaling.num_workers (and micro_batch_size) whose product divides {G}, or "
                        + _ways_out())
    return (was, W), (G // (micro * was), G // (micro * W))


def saved_engine(folder: str, state: ckpt.TrainState) -> str:
    """The train.engine that wrote a checkpoint: recorded in rank 0's state, or (a chatsft before
    that) told by the files it left."""
    if state.engine:
        return state.engine
    from chatsft.train.engines import ddp, deepspeed, fsdp2

    for kind, name in (("deepspeed", deepspeed.STATE_DIR), ("fsdp2", fsdp2.STATE_DIR), ("ddp", ddp.STATE_FILE)):
        if storage.exists(storage.join(folder, name)):
            return kind
    return ""


def check_engine(folder: str, state: ckpt.TrainState, engine: str) -> None:
    """Refuse a checkpoint of another engine: its weights and optimizer state are in that engine's form."""
    theirs = saved_engine(folder, state)
    if theirs and theirs != engine:
        raise UserError(f"train.engine={engine}: the checkpoint {folder} was written by train.engine={theirs}, "
                        f"whose state this engine cannot load; resume with train.engine={theirs}, or export "
                        "it (chatsft export) and start a new run from the exported model")


def archive(plan: RunPlan) -> str:
    """Move the run's checkpoints, model and result.json under <output_dir>/archive/<time>/."""
    where = storage.join(plan.output_dir, "archive", time.strftime("%Y%m%d-%H%M%S"))
    for src in (plan.checkpoint_dir, plan.model_dir, plan.result_path):
        if storage.exists(src):
            storage.move(src, storage.join(where, storage.basename(src)))
    return where


def _ways_out() -> str:
    return ("resume it with the same settings, use another run.output_dir, or set train.resume=never to start "
            "fresh there (the old checkpoints are moved to archive/, not deleted)")


def _differences(theirs: dict, mine: dict) -> list[str]:
    out: list[str] = []
    if theirs.get("version") != mine["version"]:
        return [f"manifest version {theirs.get('version')} -> {mine['version']}"]
    if theirs["rows"] is not None and mine["rows"] is not None:
        a, b = theirs["rows"], mine["rows"]
        out += _diff("data", a["data"], b["data"])
        if a["seed"] != b["seed"]:
            out.append(f"run.seed {a['seed']} -> {b['seed']}")
        if a["tokenizer"] != b["tokenizer"] and not any(k.startswith("model.") for k in out):
            out.append("the tokenizer's files changed")
        if a.get("version") != b.get("version"):
            out.append("the rows were fingerprinted by another chatsft (files by name and time, now by content)")
        elif a["files"] != b["files"]:
            out += _changed_files(a, b)
        if a["code"] != b["code"]:
            out.append("chatsft's data code changed (the rows would be prepared anew)")
    out += [d for d in _diff("model", theirs["model"], mine["model"]) if not d.startswith("model.resolved_kind")]
    out += _diff("method", theirs["method"], mine["method"])
    if theirs["rows_per_step"] != mine["rows_per_step"]:  # not a worker count change alone (_elastic)
        out.append(f"rows per optimizer step (train.micro_batch_size x train.grad_accum x scaling.num_workers) "
                   f"{theirs['rows_per_step']} -> {mine['rows_per_step']}")
    return out


def _changed_files(a: dict, b: dict) -> list[str]:
    """Which source files differ in content (a touched file, or the same file spelled another way,
    has the same content hash and is not named)."""
    fa, fb = a["files"], b["files"]
    if len(fa) != len(fb):
        return [f"the data files changed ({len(fa)} files -> {len(fb)}: {', '.join(b.get('names', [])[:3])})"]
    out = []
    for i, (x, y) in enumerate(zip(fa, fb)):
        if x != y:
            name = b["names"][i] if i < len(b.get("names", [])) else f"file {i + 1}"
            what = "its content" if x[-1] != y[-1] else "its split, weight or format"
            out.append(f"data.{y[0]} {name}: {what} changed since the checkpoint's rows were prepared")
    return out


def _diff(prefix: str, a: dict, b: dict) -> list[str]:
    """`key old -> new` for every dotted key whose value differs (nested sections flattened)."""
    fa, fb = _flat(prefix, a), _flat(prefix, b)
    return [f"{k} {_show(fa.get(k))} -> {_show(fb.get(k))}" for k in sorted(fa.keys() | fb.keys())
            if fa.get(k) != fb.get(k)]


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(f"{prefix}.{k}", v))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
