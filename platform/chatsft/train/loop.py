"""The per-worker training function: Ray Train's TorchTrainer runs it on every worker,
and `--local` runs the very same function in this process (runtime.py says how they differ).

One optimizer step: this worker's micro-batches of the step's global batch
(chatsft.data.order; the worker reads only its own rows, train/data.py), the
number N of supervised tokens of the whole step counted on every worker and
all-reduced, then per micro-batch backward of
loss_sum * world / N. Data-parallel engines average gradients over the world,
so the step's gradient is the sum of token-loss gradients over all supervised
tokens of all micro-batches and workers divided by N, whatever the split.

Read top to bottom: `run` sets up, evaluates before training, steps, and
finishes; `setup`, `one_step`, `evaluate` and `save` are the parts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from chatsft.config import replaced
from chatsft.console import prints_to_log
from chatsft.data.order import micro_batches
from chatsft.errors import UserError, one_line
from chatsft.plan import RunPlan
from chatsft.train import checkpoint as ckpt
from chatsft.train.checkpoint import TrainState
from chatsft.train.data import ChunkReader, RowIndex, prefetched, shard_rows, worker_steps
from chatsft.train.progress import Meter, Progress, Steady, brief, say
from chatsft.train.resume import MANIFEST, check_engine
from chatsft.train.runtime import LocalRuntime, RayRuntime, WorkerRuntime
from chatsft.train.sequence_parallel import SequenceGroup
from chatsft.train.schedule import lr_multiplier, total_steps

# Metrics go to Ray Train with every eval and checkpoint, at the end, and otherwise at
# most this often (on a logging step); progress lines and callbacks see every logging step.
REPORT_EVERY_S = 30.0

StepHook = Callable[[int, WorkerRuntime], None]


@dataclass
class WorkerArgs:
    """What the driver hands every worker (it travels to Ray workers pickled, inside a dict)."""

    plan: RunPlan
    train: RowIndex  # the row groups of the prepared splits (the driver read the footers)
    eval: Optional[RowIndex]
    export: bool = True
    callbacks: list[Callable[[int, dict], None]] = field(default_factory=list)  # rank 0, per logged step
    tasks: list[str] = field(default_factory=list)  # eval.tasks to score: before, every eval_metrics_every, end
    # Called on every rank after every optimizer step with (step, runtime): where tests inject faults.
    hooks: list[StepHook] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)  # what the run is (train/resume.py); in every checkpoint
    stall_dir: Optional[str] = None  # where stalled attempts leave their stacks (train/watchdog.py)
    goodput_dir: Optional[str] = None  # where each attempt's rank 0 keeps its time ledger (train/goodput.py)


def train_loop_per_worker(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Ray Train's entry: `config` is {"args": WorkerArgs}."""
    return run(config["args"], RayRuntime.start())


def run_local(args: WorkerArgs) -> dict[str, Any]:
    """The same loop in this process (world size 1)."""
    plan = args.plan
    return run(args, LocalRuntime.start(use_gpu=plan.config.scaling.use_gpu))


# ------------------------------------------------------------------------ the run


@dataclass
class Worker:
    """Everything one worker holds while it trains."""

    args: WorkerArgs
    rt: WorkerRuntime
    tokenizer: Any
    engine: Any
    collate: Callable  # rows -> a micro-batch's tensors (the model kind's batcher)
    loss: Callable  # chatsft.model.loss.loss_function: training and validation alike
    total: int
    accum: int  # micro-batches per step on this worker: global batch / (micro x world)
    state: TrainState
    last_saved: int
    progress: Progress
    sp: SequenceGroup  # scaling.sequence_parallel: which rows this rank reads, which part of each it runs
    reader: Optional[ChunkReader] = None  # the training rows' reader (bytes counted)
    eval_reader: Optional[ChunkReader] = None
    meter: Meter = field(default_factory=Meter)
    metrics: dict[str, Any] = field(default_factory=dict)
    ledger: Any = None  # train/goodput.py Ledger: this attempt's time by cause
    uploader: Any = None  # train/upload.py Uploader (None: checkpoints copied in place, synchronously)
    preempt: Any = None  # train/preemption.py Preemption: the drain notice, agreed at a step
    stragglers: Any = None  # train/stragglers.py Stragglers
    clock: Any = None  # train/stragglers.py Clock: this step's wait in its collective

    @property
    def cfg(self):
        return self.args.plan.config


def run(args: WorkerArgs, rt: WorkerRuntime) -> dict[str, Any]:
    from chatsft.train.goodput import Ledger

    ledger = Ledger(args.goodput_dir, rt.rank)
    with ledger.timed("setup"):
        w = setup(args, rt)
    start_goodput(w, ledger)
    with ledger.timed("eval"):
        before_training(w)
    w.engine.train()
    steady = Steady()
    G = args.plan.global_batch
    watchdog = start_watchdog(w)
    t0 = time.perf_counter()  # a step's time runs from the previous step's end to its own
    while w.state.step < w.total:
        steps = prefetched(worker_steps(args.train, w.reader, seed=w.cfg.run.seed, epoch=w.state.epoch,
                                        global_batch=G, rank=w.sp.dp_rank, world=w.sp.dp_world,
                                        start_step=w.state.position // G))
        try:
            for mine in steps:
                watchdog.feed(w.state.step, started=True)
                aside = _aside(ledger)
                one_step(w, mine)
                steady.tick()
                after_step(w)
                t1 = time.perf_counter()
                account_step(w, t1 - t0, _aside(ledger) - aside)  # may hold a collective: part of the step
                t0 = t1
                watchdog.feed(w.state.step, started=False)
                # after the step's last collective, so a hook that stalls one rank leaves the others
                # ahead, waiting in the next step (its time counts there, from t0)
                for hook in args.hooks:
                    hook(w.state.step, rt)
                if w.preempt.due:
                    stop_for_preemption(w)
                if w.state.step >= w.total:
                    break
            else:
                w.state.epoch += 1
                w.state.position = 0
        finally:
            steps.close()  # stops the read-ahead thread
    watchdog.stop()
    w.preempt.stop()
    finish(w, steady)
    ledger.flush(wait=True)
    return w.metrics


def start_goodput(w: Worker, ledger) -> None:
    """The ledger, the drain watch and the straggler meter of this attempt (train/goodput.py,
    preemption.py, stragglers.py)."""
    from chatsft.train.preemption import Preemption
    from chatsft.train.stragglers import Clock, Stragglers

    w.ledger, w.clock = ledger, Clock()
    w.preempt = Preemption.start(w.rt, w.cfg.train.preemption_grace_s)
    w.stragglers = Stragglers(w.rt, w.cfg.train.straggler_ratio)
    from chatsft.train import upload

    if upload.wanted(w.cfg, w.args.plan.checkpoint_dir):
        uploads = ledger.extra.setdefault("uploads", [])
        w.uploader = upload.Uploader(w.rt.rank, w.rt.world, on_whole=lambda up: uploads.append(
            {"step": up.step, "start": up.started, "end": up.ended, "seconds": round(up.seconds, 3),
             "bytes": up.bytes}))
    ledger.flush()


def wait_for_upload(w: Worker) -> None:
    """Until this worker's checkpoint upload is done (rank 0: the checkpoint is whole); every rank,
    ending at a barrier."""
    if w.uploader is None:
        w.rt.barrier()
    else:
        with w.ledger.timed("checkpoint"):
            w.uploader.wait()
        uploads = w.ledger.extra.get("uploads")
        if uploads:
            w.metrics["checkpoint_upload_s"] = uploads[-1]["seconds"]
        w.rt.barrier()


def _last_upload_s(w: Worker) -> float:
    uploads = w.ledger.extra.get("uploads") if w.uploader is not None else None
    return float(uploads[-1]["seconds"]) if uploads else 0.0


def _aside(ledger) -> float:
    return ledger.causes["eval"] + ledger.causes["checkpoint"]


def account_step(w: Worker, seconds: float, aside: float) -> None:
    """A step's time (evaluations and checkpoints it triggered set aside) into the ledger and the
    straggler meter; the meter's interval closes at each logging step."""
    step = w.state.step
    w.ledger.step(step, seconds - aside)
    w.stragglers.step(seconds - aside, w.clock.waited)
    w.clock.waited = 0.0
    if step % max(w.cfg.train.log_every, 1) == 0 or step >= w.total:
        with w.clock:  # a collective: a rank early here waits for the late one (the next step's wait)
            per_rank = w.stragglers.interval(step)
        if per_rank:
            w.progress.emit(step, per_rank)
            if w.stragglers.named:
                w.metrics["stragglers"] = list(w.stragglers.named)
    if aside:
        w.ledger.flush()


def stop_for_preemption(w: Worker) -> None:
    """Every rank, at the step the drain notice was agreed on: save this step (unless it just was),
    wait until the checkpoint is whole, record it, and stop: Ray Train restarts the group from
    that checkpoint on the nodes left."""
    from chatsft.train.preemption import Preempted

    rt, step = w.rt, w.state.step
    if w.last_saved != step:
        with w.ledger.timed("checkpoint"):
            save(w)
    wait_for_upload(w)  # ends at a barrier: rank 0 wrote its state, the checkpoint is whole
    notice = w.preempt.notice()
    deadline = w.preempt.agreed_deadline
    spare = f"{deadline - time.time():.1f}s before the deadline" if deadline else "the drain has no deadline"
    if notice is not None:
        notice.step, notice.saved_at = step, time.time()
        w.ledger.extra["preempted"] = notice.to_json()
        w.ledger.flush(wait=True)
        say(f"preempted: checkpoint of step {step} whole, {spare} (node {notice.host}, {notice.reason}); "
            "stopping so that Ray Train restarts on the nodes left")
    # no rank stops before rank 0 has recorded it: Ray Train may tear the group down at the first
    # rank that raises
    rt.barrier()
    w.preempt.stop()
    raise Preempted(f"preempted at step {step}: a node of the group is drained; checkpoint of step {step} saved, "
                    f"{spare}")


def accumulation(global_batch: int, micro: int, world: int) -> int:
    """Micro-batches per step on each of `world` workers so a step keeps its `global_batch` rows."""
    if global_batch % (micro * world):
        raise UserError(f"scaling.num_workers={world}: {global_batch} rows per optimizer step cannot be shared "
                        f"by {world} workers in micro-batches of train.micro_batch_size={micro}; use a worker "
                        f"count (and micro-batch size) whose product divides {global_batch}")
    return global_batch // (micro * world)


def start_watchdog(w: Worker):
    """train.stall_timeout_s > 0: this rank's hang watchdog (train/watchdog.py), else one that
    never fires. The ranks agree on a name for this attempt's stall reports."""
    from chatsft import storage
    from chatsft.train.watchdog import Watchdog

    timeout = w.cfg.train.stall_timeout_s
    if timeout <= 0 or not w.args.stall_dir:
        return _NoWatchdog()
    import socket

    attempt = w.rt.gather(time.strftime("attempt-%Y%m%dT%H%M%S-") + os.urandom(3).hex())[0]
    return Watchdog(timeout, rank=w.rt.rank, world=w.rt.world, node=f"{socket.gethostname()} ({w.rt.node_id[:8]})",
                    folder=storage.join(w.args.stall_dir, attempt)).start()


class _NoWatchdog:
    def feed(self, step: int, started: bool) -> None:
        pass

    def stop(self) -> None:
        pass


def setup(args: WorkerArgs, rt: WorkerRuntime) -> Worker:
    """Seeds, tokenizer, model and engine, resumed from the latest checkpoint if there is one."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    plan = args.plan
    cfg = plan.config
    # The plan decides (train.threads): the whole machine for --local, the worker's CPU
    # resources on Ray, so workers sharing a node do not oversubscribe it.
    torch.set_num_threads(plan.threads)
    import pyarrow

    pyarrow.set_cpu_count(plan.threads)
    if rt.rank == 0:
        why = ("train.threads" if cfg.train.threads else
               "every core of this machine; train.threads sets another number" if plan.local else
               "scaling.resources_per_worker.CPU; train.threads sets another number")
        say(f"{plan.threads} CPU thread{'s' if plan.threads > 1 else ''} per worker ({why})")
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (PEFT adapters, new heads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)

    from chatsft.model import load_model, load_tokenizer
    from chatsft.model.batch import pad_id
    from chatsft.model.load import compile_model
    from chatsft.model.loss import loss_function
    from chatsft.train import sequence_parallel
    from chatsft.train.engines import build_engine
    from chatsft.train.optim import param_groups

    n = cfg.scaling.sequence_parallel
    sp = sequence_parallel.start(rt.rank, rt.world, n, rt.gather(rt.node_id) if n > 1 else None)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, plan.kind, tokenizer=tokenizer)
    core = sequence_parallel.enable(model, sp)
    if rt.rank == 0:
        if rt.world != plan.workers:  # the driver said the configured one
            say(plan.layout_at(rt.world))
        if core:
            say(f"sequence parallelism: Ulysses all-to-all around {core} attention, groups of {n} ranks")
    loss, how = loss_function(model, cfg.train.loss_head, cfg.train.loss_chunk, device=rt.device)
    compiled = compile_model(model, cfg.train.compile)
    if rt.rank == 0:
        say(f"loss head: {how}" + (f"; torch.compile: {compiled}" if compiled else ""))
    accum = accumulation(plan.global_batch, cfg.train.micro_batch_size, sp.dp_world)
    train = replaced(cfg.train, "train", grad_accum=accum)
    with prints_to_log():  # DeepSpeed prints its op builds
        engine = build_engine(model, param_groups(model, train), train, world_size=rt.world, device=rt.device)
    total = total_steps(args.train.rows, plan.global_batch, cfg.train.epochs, cfg.train.max_steps)
    state, last_saved = _resume(engine, rt, plan, sp.dp_world)
    return Worker(args, rt, tokenizer, engine,
                  collate=plan.kind.batcher(pad_id(tokenizer), model, multiple=sp.size), loss=loss,
                  total=total, accum=accum, state=state, last_saved=last_saved,
                  reader=ChunkReader(args.train), eval_reader=ChunkReader(args.eval) if args.eval else None,
                  progress=Progress(rt.rank == 0, total, state.step, args.callbacks), sp=sp,
                  metrics=dict(state.metrics))


def before_training(w: Worker) -> None:
    """Eval loss and task scores of the untrained model (once: a resumed run has them)."""
    if w.state.step != 0:
        return
    if "eval_loss_first" not in w.metrics and w.args.eval is not None:
        loss = validation_loss(w)
        w.metrics["eval_loss_first"] = loss
        w.progress.line(f"eval loss at start {loss:.4f}")
        w.progress.emit(0, {"eval_loss": loss})
    if w.args.tasks and not any(k.startswith("before/") for k in w.metrics):
        before = task_scores(w)
        w.metrics.update({f"before/{k}": v for k, v in before.items()})
        w.progress.line("before training: " + brief(before))
        w.progress.emit(0, before)


def after_step(w: Worker) -> None:
    """Logging, evaluations, checkpoints and reports that fall due at this step."""
    tr, state = w.cfg.train, w.state
    last = state.step >= w.total
    report_now = False
    if state.step % max(tr.log_every, 1) == 0 or last:
        due = w.rt.rank == 0 and time.perf_counter() - w.meter.last_report >= REPORT_EVERY_S
        flushed = w.meter.flush(w.rt, w.engine, state, due)
        report_now = flushed.pop("report_now")
        w.metrics.update(flushed)
        w.progress.step(state.step, w.metrics, fresh=flushed)
    due_eval = tr.eval_every > 0 and state.step % tr.eval_every == 0 and not last
    if due_eval and w.args.eval is not None:
        with w.ledger.timed("eval"):
            w.metrics["eval_loss"] = validation_loss(w)
        w.progress.line(f"step {state.step}/{w.total}  eval loss {w.metrics['eval_loss']:.4f}")
        w.metrics["eval_step"] = w.metrics["step"] = state.step  # what a sweep scheduler compares
        w.progress.emit(state.step, {"eval_loss": w.metrics["eval_loss"]})
    if w.args.tasks and tr.eval_metrics_every > 0 and state.step % tr.eval_metrics_every == 0 and not last:
        with w.ledger.timed("eval"):
            scores = task_scores(w)
        w.metrics.update(scores)
        w.progress.line(f"step {state.step}/{w.total}  " + brief(scores))
        w.progress.emit(state.step, scores)
    if tr.save_every > 0 and state.step % tr.save_every == 0 and not last:
        with w.ledger.timed("checkpoint") as took:
            save(w)
        # the time a save before a drain deadline needs: the local save and, uploaded, its copy
        w.preempt.check_grace(w.rt, took.seconds + _last_upload_s(w))
    elif not last and (report_now or due_eval):
        w.rt.report(_reportable(w.metrics))


def finish(w: Worker, steady: Steady) -> None:
    """Final evaluations, the last checkpoint and report, the exported model."""
    rt, state = w.rt, w.state
    if w.args.eval is not None:
        with w.ledger.timed("eval"):
            w.metrics["eval_loss"] = validation_loss(w)
        first = w.metrics.get("eval_loss_first")
        w.progress.line(f"final eval loss {w.metrics['eval_loss']:.4f}"
                        + (f" (start {first:.4f})" if first is not None else ""))
        w.progress.emit(state.step, {"eval_loss": w.metrics["eval_loss"]})
        w.metrics["eval_step"] = state.step
    if w.args.tasks:
        with w.ledger.timed("eval"):
            after = task_scores(w)
        w.metrics.update(after)
        w.progress.emit(state.step, after)
        if rt.rank == 0:
            from chatsft.eval.evaluate import format_metrics

            before = {k[len("before/"):]: v for k, v in w.metrics.items() if k.startswith("before/")}
            say("task evaluation\n" + format_metrics(after, before or None))
    w.metrics["skipped_steps"] = w.engine.skipped_steps
    w.metrics["step"] = state.step
    if steady.mean() is not None:
        w.metrics["mean_step_time"] = steady.mean()
    w.metrics["node_id"] = rt.node_id
    w.metrics["node_ids"] = rt.gather(rt.node_id)
    # What each worker read of the training split, against the whole split's bytes.
    w.metrics["data_bytes_read"] = [int(b) for b in rt.gather(str(w.reader.bytes_read))]
    w.metrics["data_bytes_total"] = w.args.train.total_bytes
    if w.last_saved != state.step:
        with w.ledger.timed("checkpoint"):
            save(w)
    else:
        rt.report(_reportable(w.metrics))
    wait_for_upload(w)  # the run's last checkpoint is whole before the run ends
    if w.args.export:
        from chatsft.train.export import export_from_engine
        from chatsft.train.sequence_parallel import plain

        with plain(w.engine.model):  # the model's own attention in the exported config
            export_from_engine(w.engine, w.tokenizer, w.args.plan, rank=rt.rank)
    w.progress.close()
    rt.barrier()


# ----------------------------------------------------------------------- one step


def one_step(w: Worker, mine: list) -> None:
    """One optimizer step: `mine` is this worker's share of the step's global batch."""
    import torch

    from chatsft.model.batch import shard_sequence

    tr, engine, rt, meter, sp = w.cfg.train, w.engine, w.rt, w.meter, w.sp
    # sequence parallelism: the group's N ranks collate the same rows, each keeps its part
    micro = [shard_sequence(w.collate(mb), sp.index, sp.size) for mb in micro_batches(mine, tr.micro_batch_size)]
    meter.lr = engine.set_lr(lr_multiplier(w.state.step, w.total, tr))
    w.state.step += 1
    w.state.position += w.args.plan.global_batch
    # the step's one collective before any forward: the count, and a drain notice riding on it
    with w.clock:
        n, drained = rt.all_reduce([float(sum(b.num_targets for b in micro)), w.preempt.flag()])
    n = int(n)
    w.preempt.agree(drained)
    meter.supervised += n
    meter.tokens_local += sum(b.tokens for b in micro)
    meter.slots_local += sum(b.slots for b in micro)
    meter.steps += 1
    if n == 0:
        # nothing supervised anywhere in this step: no forward, no update, no NaN
        engine.skip()
        meter.empty_steps += 1
        return
    loss_sum = 0.0
    for b in micro:
        inputs = {k: v.to(engine.device) for k, v in b.inputs.items()}
        try:
            with offloaded(tr.activation_offload, engine.device):
                total, _ = w.loss(engine.forward, inputs, b.targets.to(engine.device))
            engine.backward(total * (rt.world / n))
        except torch.cuda.OutOfMemoryError as e:
            shape = tuple(b.inputs["input_ids"].shape)
            raise RuntimeError(
                f"out of GPU memory in a training step with train.micro_batch_size={tr.micro_batch_size} "
                f"and sequence length {shape[1]} (micro-batch {shape[0]}x{shape[1]}): lower "
                "train.micro_batch_size (raise train.grad_accum to keep the batch), data.max_length, "
                "or turn on train.gradient_checkpointing / ZeRO-3 / offload") from e
        loss_sum += float(total.detach())
    applied, norm = engine.step(tr.clip_grad)
    meter.loss_sum_local += loss_sum
    meter.grad_norm = norm
    meter.applied += int(applied)


def offloaded(on: bool, device: Any):
    """train.activation_offload: what the forward saves for backward (with gradient checkpointing:
    each checkpointed layer's input) waits in CPU memory, pinned for the copy back to a GPU."""
    if not on:
        return contextlib.nullcontext()
    import torch

    return torch.autograd.graph.save_on_cpu(pin_memory=torch.device(device).type == "cuda")


# ---------------------------------------------------------------------- evaluating


def validation_loss(w: Worker) -> float:
    """The eval split's token-weighted loss (chatsft.eval.loss), this worker's share all-reduced."""
    from chatsft.eval.loss import loss_sums

    w.engine.eval()
    micro, rows, world, sp = w.cfg.train.micro_batch_size, w.args.eval.rows, w.sp.dp_world, w.sp
    total, count = loss_sums(w.engine.forward, shard_rows(w.args.eval, w.eval_reader, sp.dp_rank, world),
                             loss=w.loss, micro_batch=micro, collate=w.collate,
                             device=w.engine.device, forwards=math.ceil(math.ceil(rows / world) / micro),
                             sequence=(sp.index, sp.size))
    w.engine.train()
    total, count = w.rt.all_reduce([total, float(count)])
    return total / count if count else float("nan")


def task_scores(w: Worker) -> dict[str, float]:
    """Generative / multiple-choice tasks on rank 0 (the others wait). A sharding engine gathers
    the full parameters on every rank for the duration: a collective, so all ranks enter."""
    from chatsft.eval.evaluate import evaluate_model

    from chatsft.train.sequence_parallel import plain

    engine = w.engine
    scores: dict[str, float] = {}
    with engine.gathered(), plain(engine.model):  # rank 0 generates alone: the model's own attention
        if w.rt.rank == 0:
            scores = evaluate_model(engine.model, w.tokenizer, w.cfg, w.args.tasks)
    w.rt.barrier()
    engine.train()
    return scores


# --------------------------------------------------------------------- checkpoints


def _resume(engine, rt: WorkerRuntime, plan: RunPlan, dp_world: int) -> tuple[TrainState, int]:
    """Restore weights, optimizer, loop position and RNG from the newest whole checkpoint of the
    run's folder, if any: rank 0 finds it (train/checkpoint.py, the very function the driver named
    it with) and every rank loads that one. Saved by any number of workers: the data position and
    the engine's state do not depend on it."""
    seed, micro, global_batch = plan.config.run.seed, plan.config.train.micro_batch_size, plan.global_batch
    chosen = rt.gather(ckpt.latest(plan.checkpoint_dir) or "" if rt.rank == 0 else "")[0]
    if not chosen:
        _seed_rank(seed, rt.rank)
        return TrainState(world_size=rt.world, engine=engine.kind), -1
    with ckpt.local_copy(chosen) as folder:
        state, rng = ckpt.read_state(folder, rt.rank)
        check_engine(chosen, state, engine.kind)
        try:
            engine.load(folder, saved_world=state.world_size)
        except Exception as e:  # what the whole-checkpoint checks cannot see (a flipped byte)
            raise UserError(f"{chosen}: this checkpoint cannot be loaded ({one_line(e)}); move it out of "
                            f"{plan.checkpoint_dir} to resume from the one before it, or set "
                            "train.resume=never to start fresh (the old run is archived, not deleted)") from e
    if rng is not None and state.world_size == rt.world:
        ckpt.set_rng_state(rng)
    else:
        _seed_rank(seed + state.step, rt.rank)
    n = rt.world // dp_world  # data-parallel workers of the checkpoint's run: its world over the same N
    accum, accum_was = global_batch // (micro * dp_world), global_batch // (micro * max(state.world_size // n, 1))
    if rt.rank == 0:
        say(f"resumed from {chosen} at step {state.step} (epoch {state.epoch}, row {state.position})")
        if state.world_size != rt.world:
            say(f"resumed at step {state.step} on {rt.world} workers (was {state.world_size}); accumulation "
                f"{accum_was} -> {accum}, {global_batch} rows per step as before")
    state.world_size = rt.world
    state.engine = engine.kind
    state.metrics["resumed_from"] = chosen
    return state, state.step


def _seed_rank(seed: int, rank: int) -> None:
    import torch

    # per-rank streams for dropout and the like; data order never uses them
    random.seed(seed * 1000 + rank)
    np.random.seed(seed * 1000 + rank)
    torch.manual_seed(seed * 1000 + rank)


def save(w: Worker) -> None:
    """A checkpoint of this step in the run's checkpoint folder (collective). Every rank writes its
    shards and state into a local folder and copies it there; once all have (the gather), rank 0
    writes its own state last, listing every file: only then is the checkpoint whole (a save cut
    off before leaves a folder no resume takes). Then retention (train.keep_checkpoints)."""
    import shutil

    from chatsft import storage

    state, rt, plan = w.state, w.rt, w.args.plan
    # the metrics of the steps this checkpoint holds reach the tracker first: a restart from it
    # logs only later steps, so what the logger still held would be lost with a killed worker
    w.progress.flush()
    state.metrics = {k: v for k, v in w.metrics.items() if isinstance(v, (int, float))}
    name = ckpt.checkpoint_name(state.step)
    target = storage.join(plan.checkpoint_dir, name)
    tmp = tempfile.mkdtemp(prefix=f"chatsft-{name}-")
    try:
        w.engine.save(tmp, rt.rank)
        if rt.rank == 0 and w.args.manifest:
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(w.args.manifest, f, indent=1, default=str)
        if rt.rank != 0:
            ckpt.write_state(tmp, rt.rank, state)
        if rt.rank == 0:
            storage.remove(target)  # a folder of this name that never completed (a save cut off)
        rt.barrier()
        if w.uploader is not None:  # train/upload.py: copied on a thread, listed once whole
            w.uploader.submit(tmp, target, state.step, ckpt.state_record(state) if rt.rank == 0 else None,
                              prune=lambda: ckpt.prune(plan.checkpoint_dir, w.cfg.train.keep_checkpoints))
            tmp = ""  # the upload owns the folder now
        else:
            if os.listdir(tmp):
                storage.copy_tree(tmp, target)
            files = [json.loads(x) for x in rt.gather(json.dumps(ckpt.listing(tmp)))]
            if rt.rank == 0:
                ckpt.write_state(target, 0, state, files={k: v for f in files for k, v in f.items()})
                ckpt.prune(plan.checkpoint_dir, w.cfg.train.keep_checkpoints)
        rt.report(_reportable(w.metrics))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    w.last_saved = state.step


def _reportable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list))}
