"""The per-worker training function: Ray Train's TorchTrainer runs it on every worker,
and `--local` runs the very same function in this process (world size 1, no Ray).

One optimizer step: this worker's micro-batches of the step's global batch
(train/data.py), the number N of supervised tokens of the whole step counted on
every worker and all-reduced, then per micro-batch backward of
loss_sum * world / N. Data-parallel engines average gradients over the world,
so the step's gradient is the sum of token-loss gradients over all supervised
tokens of all micro-batches and workers divided by N, whatever the split.
"""

from __future__ import annotations

import contextlib

import math
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from chatsft.config import Config, from_dict
from chatsft.train import checkpoint as ckpt
from chatsft.train.checkpoint import TrainState
from chatsft.train.data import (collate, epoch_rows, global_batches, iter_stored_rows, local_batches,
                                ray_batches, worker_micro_batches)
from chatsft.train.schedule import lr_multiplier, total_steps

# Test seam for the resume test: the worker of rank CHATSFT_FAIL_RANK (default 0)
# dies (os._exit) right after optimizer step CHATSFT_FAIL_ONCE_AT_STEP, once: it
# leaves the marker file CHATSFT_FAIL_MARKER so the restarted run goes on.
FAIL_AT = "CHATSFT_FAIL_ONCE_AT_STEP"
FAIL_MARKER = "CHATSFT_FAIL_MARKER"
FAIL_RANK = "CHATSFT_FAIL_RANK"
# Metrics go to Ray Train with every eval and checkpoint, at the end, and otherwise at
# most this often (on a logging step); progress lines and callbacks see every logging step.
REPORT_EVERY_S = 30.0


@dataclass
class WorkerArgs:
    """What the driver hands every worker (plain data: it travels to Ray workers)."""

    config: dict[str, Any]  # Config.to_dict()
    train_dir: str
    eval_dir: Optional[str]
    train_rows: int
    eval_rows: int
    output_dir: str  # absolute; <output_dir>/model gets the exported model
    local: bool = False
    export: bool = True
    callbacks: list[Callable[[int, dict], None]] = field(default_factory=list)  # rank 0, per logged step
    tasks: list[str] = field(default_factory=list)  # eval.tasks to score: before, every eval_metrics_every, end


@dataclass
class _Ctx:
    rank: int
    world: int
    local_rank: int
    device: Any
    node_id: str


def train_loop_per_worker(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    args = WorkerArgs(**config)
    cfg = from_dict(Config, args.config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    # Intra-op threads = the worker's CPU resources in both modes, so --local and
    # Ray measure the same thing and workers sharing a node do not oversubscribe it.
    torch.set_num_threads(max(1, int(cfg.scaling.resources_per_worker.get("CPU", 1))))
    ctx = _local_context(cfg) if args.local else _ray_context()
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (PEFT adapters, new heads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)

    from chatsft.model import load_model, load_tokenizer, model_kind, param_groups
    from chatsft.train.engine import build_engine

    tokenizer = load_tokenizer(cfg.model)
    seq2seq = model_kind(cfg.model) == "seq2seq"
    model = load_model(cfg, tokenizer=tokenizer)
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=ctx.world,
                          device=ctx.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder_start = _decoder_start(model) if seq2seq else None

    tr = cfg.train
    G = tr.micro_batch_size * tr.grad_accum * ctx.world
    total = total_steps(args.train_rows, G, tr.epochs, tr.max_steps)
    state, last_saved = _resume(engine, args, cfg, ctx)
    train_source, eval_source = _sources(args)
    progress = _Progress(ctx.rank == 0, total, state.step, args.callbacks)
    meter = _Meter()
    metrics: dict[str, Any] = dict(state.metrics)
    eval_loss_first = metrics.get("eval_loss_first")

    if eval_loss_first is None and eval_source is not None and state.step == 0:
        eval_loss_first = _evaluate(engine, eval_source, ctx, tr.micro_batch_size, pad_id, seq2seq, decoder_start)
        metrics["eval_loss_first"] = eval_loss_first
        progress.line(f"eval loss at start {eval_loss_first:.4f}")
        progress.emit(0, {"eval_loss": eval_loss_first})
    if args.tasks and state.step == 0 and not any(k.startswith("before/") for k in metrics):
        before = _task_eval(engine, tokenizer, cfg, args.tasks, ctx)
        metrics.update({f"before/{k}": v for k, v in before.items()})
        progress.line("before training: " + _brief(before))
        progress.emit(0, before)

    engine.train()
    fail_at = int(os.environ.get(FAIL_AT, "-1"))
    steady = _Steady()
    while state.step < total:
        rows = epoch_rows(iter_stored_rows(train_source()), seed=cfg.run.seed, epoch=state.epoch,
                          start=state.position)
        for batch in global_batches(rows, G):
            micro = [collate(mb, pad_id=pad_id, seq2seq=seq2seq, decoder_start=decoder_start)
                     for mb in worker_micro_batches(batch, rank=ctx.rank, world=ctx.world,
                                                    micro=tr.micro_batch_size)]
            lr = engine.set_lr(lr_multiplier(state.step, total, tr))
            _one_step(engine, micro, ctx, tr, meter)
            steady.tick()
            state.step += 1
            state.position += G
            report_now = False
            if state.step % max(tr.log_every, 1) == 0 or state.step == total:
                flushed = meter.flush(ctx, engine, lr, state, cfg)
                report_now = flushed.pop("report_now")
                metrics.update(flushed)
                progress.step(state.step, metrics, fresh=flushed)
            due_eval = tr.eval_every > 0 and state.step % tr.eval_every == 0 and state.step < total
            if due_eval and eval_source is not None:
                metrics["eval_loss"] = _evaluate(engine, eval_source, ctx, tr.micro_batch_size, pad_id,
                                                 seq2seq, decoder_start)
                progress.line(f"step {state.step}/{total}  eval loss {metrics['eval_loss']:.4f}")
                metrics["eval_step"] = metrics["step"] = state.step  # what a sweep scheduler compares
                progress.emit(state.step, {"eval_loss": metrics["eval_loss"]})
                engine.train()
            due_tasks = (args.tasks and tr.eval_metrics_every > 0 and state.step % tr.eval_metrics_every == 0
                         and state.step < total)
            if due_tasks:
                scores = _task_eval(engine, tokenizer, cfg, args.tasks, ctx)
                metrics.update(scores)
                progress.line(f"step {state.step}/{total}  " + _brief(scores))
                progress.emit(state.step, scores)
                engine.train()
            due_save = tr.save_every > 0 and state.step % tr.save_every == 0 and state.step < total
            if due_save:
                _save(engine, state, metrics, args, cfg, ctx)
                last_saved = state.step
            elif state.step < total and (report_now or due_eval) and not args.local:
                _report(metrics, None)
            if state.step == fail_at and ctx.rank == int(os.environ.get(FAIL_RANK, "0")):
                _fail_once()
            if state.step >= total:
                break
        else:
            state.epoch += 1
            state.position = 0

    if eval_source is not None:
        metrics["eval_loss"] = _evaluate(engine, eval_source, ctx, tr.micro_batch_size, pad_id, seq2seq,
                                         decoder_start)
        progress.line(f"final eval loss {metrics['eval_loss']:.4f}"
                      + (f" (start {eval_loss_first:.4f})" if eval_loss_first is not None else ""))
        progress.emit(state.step, {"eval_loss": metrics["eval_loss"]})
        metrics["eval_step"] = state.step
    if args.tasks:
        after = _task_eval(engine, tokenizer, cfg, args.tasks, ctx)
        metrics.update(after)
        progress.emit(state.step, after)
        if ctx.rank == 0:
            from chatsft.evaluate import format_metrics

            before = {k[len("before/"):]: v for k, v in metrics.items() if k.startswith("before/")}
            say("task evaluation\n" + format_metrics(after, before or None))
    metrics["skipped_steps"] = engine.skipped_steps
    metrics["step"] = state.step
    if steady.mean() is not None:
        metrics["mean_step_time"] = steady.mean()
    metrics["node_id"] = ctx.node_id
    metrics["node_ids"] = _gather_strings(ctx.node_id, ctx)
    if last_saved != state.step:
        _save(engine, state, metrics, args, cfg, ctx)
    elif not args.local:
        _report(metrics, None)
    if args.export:
        _export_final(engine, tokenizer, cfg, args, ctx)
    progress.close()
    _barrier(ctx)
    # --local keeps its one-process group: DeepSpeed caches it, and a second run in
    # the same process (tests, benchmarks) reuses it
    return metrics


# ------------------------------------------------------------------- one step


def _one_step(engine, micro, ctx: _Ctx, tr, meter: "_Meter") -> None:
    import torch

    from chatsft.train.loss import token_loss

    local_n = sum(b.num_targets for b in micro)
    n = int(_all_reduce([float(local_n)], ctx)[0])
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
            out = engine.forward(inputs)
            total, _ = token_loss(out.logits, b.targets.to(engine.device))
            engine.backward(total * (ctx.world / n))
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


class _Meter:
    """Per-interval sums; flushed (all-reduced) only on logging steps, the same on every rank."""

    def __init__(self) -> None:
        self.empty_total = 0
        self.last_report = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.loss_sum_local = 0.0
        self.supervised = 0  # already global
        self.tokens_local = 0
        self.slots_local = 0
        self.steps = 0
        self.empty_steps = 0
        self.applied = 0
        self.grad_norm = float("nan")
        self.t0 = time.perf_counter()

    def flush(self, ctx: _Ctx, engine, lr: float, state: TrainState, cfg: Config) -> dict[str, Any]:
        # Rank 0 decides whether this logging step also reports to Ray Train (each report
        # is a barrier through the controller, about a second on a small machine): at
        # most every REPORT_EVERY_S seconds. The decision rides on this all-reduce, so
        # every rank reports the same number of times.
        due = ctx.rank == 0 and time.perf_counter() - self.last_report >= REPORT_EVERY_S
        loss_sum, tokens, slots, report = _all_reduce(
            [self.loss_sum_local, float(self.tokens_local), float(self.slots_local), float(due)], ctx)
        if report:
            self.last_report = time.perf_counter()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.empty_total += self.empty_steps
        m: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch,
            "lr": lr,
            "supervised_tokens": self.supervised,
            "tokens_per_second": tokens / dt,
            "supervised_tokens_per_second": self.supervised / dt,
            "step_time": dt / max(self.steps, 1),
            "pad_fraction": 1.0 - tokens / slots if slots else 0.0,
            "skipped_steps": engine.skipped_steps,
            "empty_steps": self.empty_total,
            "report_now": bool(report),
        }
        if self.supervised:
            m["train_loss"] = loss_sum / self.supervised
        if math.isfinite(self.grad_norm):
            m["grad_norm"] = self.grad_norm
        self.reset()
        return m


class _Steady:
    """Mean time of the optimizer steps after the first (which pays for warm-up and JIT builds).

    Logging, eval and checkpoint steps are included: it is the loop's real pace."""

    def __init__(self) -> None:
        self.t_first: Optional[float] = None
        self.n = 0
        self.t_last = 0.0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        else:
            self.n += 1
            self.t_last = now

    def mean(self) -> Optional[float]:
        return (self.t_last - self.t_first) / self.n if self.n else None


class _Progress:
    """Rank 0's progress lines, and the one place per-step metrics go out (callbacks)."""

    def __init__(self, enabled: bool, total: int, start_step: int, callbacks: list) -> None:
        self.enabled, self.total, self.start_step, self.callbacks = enabled, total, start_step, callbacks
        self.t0 = time.perf_counter()

    def line(self, text: str) -> None:
        if self.enabled:
            say(text)

    def step(self, step: int, m: dict[str, Any], fresh: dict[str, Any]) -> None:
        """A progress line from the running metrics `m`; callbacks get what this interval measured."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start_step, 1) * (self.total - step)
        loss = f"{m['train_loss']:.4f}" if "train_loss" in m else "-"
        norm = f"{m['grad_norm']:.3f}" if "grad_norm" in m else "-"
        self.line(f"step {step}/{self.total}  loss {loss}  lr {m['lr']:.3g}  grad norm {norm}  "
                  f"supervised {m['supervised_tokens']}  {m['tokens_per_second']:.0f} tok/s  "
                  f"ETA {_fmt_time(eta)}")
        self.emit(step, {k: v for k, v in fresh.items() if k != "report_now"})

    def emit(self, step: int, metrics: dict[str, Any]) -> None:
        if self.enabled:
            for cb in self.callbacks:
                cb(step, dict(metrics))

    def close(self) -> None:
        """Callbacks that buffer (the MLflow logger) flush here, before the worker exits."""
        if self.enabled:
            for cb in self.callbacks:
                getattr(cb, "close", lambda: None)()


def say(text: str) -> None:
    """One progress line on stdout. Not print(): Ray Train patches print on its workers to log
    *and* echo, which shows every line twice."""
    import sys

    sys.stdout.write(f"[chatsft] {text}\n")
    sys.stdout.flush()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


# ---------------------------------------------------------------------- eval


def _evaluate(engine, source, ctx: _Ctx, micro: int, pad_id: int, seq2seq: bool, decoder_start) -> float:
    """Token-weighted loss over all eval rows: each worker takes its stride, sums are all-reduced."""
    import torch

    from chatsft.train.loss import token_loss

    engine.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in global_batches(iter_stored_rows(source()), micro * ctx.world):
            (rows,) = worker_micro_batches(batch, rank=ctx.rank, world=ctx.world, micro=micro)
            b = collate(rows, pad_id=pad_id, seq2seq=seq2seq, decoder_start=decoder_start)
            inputs = {k: v.to(engine.device) for k, v in b.inputs.items()}
            out = engine.forward(inputs)
            s, c = token_loss(out.logits, b.targets.to(engine.device))
            loss_sum += float(s)
            count += int(c)
    loss_sum, count = _all_reduce([loss_sum, float(count)], ctx)
    return loss_sum / count if count else float("nan")


# --------------------------------------------------------------- checkpoints


def _resume(engine, args: WorkerArgs, cfg: Config, ctx: _Ctx) -> tuple[TrainState, int]:
    """Restore weights, optimizer, loop position and RNG from the latest checkpoint, if any."""
    import torch

    folder, cleanup = None, None
    if args.local:
        folder = ckpt.latest_local(_local_checkpoints(args))
    else:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is not None:
            cleanup = found.as_directory()
            folder = cleanup.__enter__()
    if folder is None:
        _seed_rank(cfg.run.seed, ctx.rank)
        return TrainState(world_size=ctx.world), -1
    try:
        engine.load(folder)
        state, rng = ckpt.read_state(folder, ctx.rank)
    finally:
        if cleanup is not None:
            cleanup.__exit__(None, None, None)
    if rng is not None and state.world_size == ctx.world:
        ckpt.set_rng_state(rng)
    else:
        _seed_rank(cfg.run.seed + state.step, ctx.rank)
    if ctx.rank == 0:
        say(f"resumed from {folder} at step {state.step} (epoch {state.epoch}, row {state.position})")
    state.world_size = ctx.world
    del torch
    return state, state.step


def _seed_rank(seed: int, rank: int) -> None:
    import torch

    # per-rank streams for dropout and the like; data order never uses them
    random.seed(seed * 1000 + rank)
    np.random.seed(seed * 1000 + rank)
    torch.manual_seed(seed * 1000 + rank)


def _local_checkpoints(args: WorkerArgs) -> str:
    return os.path.join(args.output_dir, "checkpoints")


def _save(engine, state: TrainState, metrics: dict, args: WorkerArgs, cfg: Config, ctx: _Ctx) -> None:
    state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    name = ckpt.checkpoint_name(state.step)
    if args.local:
        root = _local_checkpoints(args)
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
        engine.save(tmp, ctx.rank)
        ckpt.write_state(tmp, ctx.rank, state)
        final = os.path.join(root, name)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        ckpt.prune_local(root, cfg.train.keep_checkpoints)
        return
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix=f"chatsft-{name}-")
    try:
        engine.save(tmp, ctx.rank)
        ckpt.write_state(tmp, ctx.rank, state)
        _report(metrics, Checkpoint.from_directory(tmp), name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report(metrics: dict, checkpoint, name: Optional[str] = None) -> None:
    import ray.train

    plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list))}
    ray.train.report(plain, checkpoint=checkpoint, checkpoint_dir_name=name)


def _fail_once() -> None:
    marker = os.environ.get(FAIL_MARKER)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("failed once\n")
        say("test seam: worker exits on purpose")
        os._exit(1)


def _task_eval(engine, tokenizer, cfg: Config, tasks: list[str], ctx: _Ctx) -> dict[str, float]:
    """Generative / multiple-choice tasks on rank 0 (the others wait). Under ZeRO-3 every rank
    gathers the full parameters for the duration: a collective, so all ranks enter."""
    from chatsft.evaluate import evaluate_model

    sharded = engine.kind == "deepspeed" and engine.ds.zero_optimization_stage() == 3
    gather = contextlib.nullcontext()
    if sharded:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(engine.model.parameters()), modifier_rank=None)
    scores: dict[str, float] = {}
    with gather:
        if ctx.rank == 0:
            scores = evaluate_model(engine.model, tokenizer, cfg, tasks, eval_loss=False)
    _barrier(ctx)
    return scores


def _brief(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if not k.endswith(("/examples", "/skipped")))


# --------------------------------------------------------------------- export


def _export_final(engine, tokenizer, cfg: Config, args: WorkerArgs, ctx: _Ctx) -> None:
    """Rank 0 writes <output_dir>/model; under ZeRO-3 the full weights are gathered first (collective)."""
    from chatsft.train.export import export_from_engine

    export_from_engine(engine, tokenizer, cfg, os.path.join(args.output_dir, "model"), rank=ctx.rank)


# ------------------------------------------------------------ distributed bits


def _ray_context() -> _Ctx:
    import ray
    import ray.train
    import ray.train.torch

    c = ray.train.get_context()
    return _Ctx(c.get_world_rank(), c.get_world_size(), c.get_local_rank(), ray.train.torch.get_device(),
                ray.get_runtime_context().get_node_id())


def _local_context(cfg: Config) -> _Ctx:
    import torch
    import torch.distributed as dist

    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # a one-process group, so the loop's collectives and DeepSpeed run unchanged
        port = _free_port()
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
    return _Ctx(0, 1, 0, device, "local")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce(values: list[float], ctx: _Ctx) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    if ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _gather_strings(value: str, ctx: _Ctx) -> list[str]:
    if ctx.world == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out


def _barrier(ctx: _Ctx) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _sources(args: WorkerArgs):
    if args.local:
        train = local_batches(args.train_dir)
        ev = local_batches(args.eval_dir) if args.eval_dir and args.eval_rows else None
        return train, ev
    import ray.train

    train = ray_batches(ray.train.get_dataset_shard("train"))
    ev = None
    if args.eval_dir and args.eval_rows:
        ev = ray_batches(ray.train.get_dataset_shard("eval"))
    return train, ev


def _decoder_start(model) -> Callable:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.prepare_decoder_input_ids_from_labels if hasattr(hf, "prepare_decoder_input_ids_from_labels") \
        else hf._shift_right
