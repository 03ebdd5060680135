"""`chatsft train`: prepare the rows if needed, then run the per-worker loop on Ray Train
(TorchTrainer) or, with `--local`, in this process."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from chatsft import storage
from chatsft.config import Config
from chatsft.errors import UserError, one_line, user_errors_unwrapped
from chatsft.plan import RunPlan
from chatsft.train.checkpoint import latest
from chatsft.train.data import RowIndex, count_rows, parquet_files
from chatsft.train.loop import StepHook, WorkerArgs, run_local, train_loop_per_worker
from chatsft.train.progress import say
from chatsft.train.resume import Resume
from chatsft.train.resume import check_resume


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last metrics rank 0 reported
    checkpoint: Optional[str]  # the latest checkpoint folder
    model_dir: Optional[str]  # the exported Hugging Face folder
    run_id: Optional[str] = None  # the MLflow run, when tracked
    resume: Optional[Resume] = None  # fresh, or resumed from where with what changed
    stalls: list[str] = field(default_factory=list)  # why each stalled attempt was stopped (restarted)
    goodput: Optional[dict] = None  # train/goodput.py Breakdown.to_json(), with its summary "line"


@dataclass
class Rows:
    train_dir: str
    eval_dir: Optional[str]
    train_rows: int
    eval_rows: int


@dataclass
class Extras:
    """What callers other than `chatsft train` add to a run: callbacks, Ray Train callbacks,
    task list (default: the config's eval.tasks) and per-step hooks (tests)."""

    callbacks: list[Callable[[int, dict], None]] = field(default_factory=list)
    ray_callbacks: list = field(default_factory=list)
    tasks: Optional[list[str]] = None
    hooks: list[StepHook] = field(default_factory=list)
    export: bool = True
    resume: Optional[Resume] = None  # checked by the caller; None: checked here (rows unknown)
    stall_dir: Optional[str] = None  # where stalled attempts report (None: a new folder of the run)
    submitted: Optional[float] = None  # when the run was asked for (goodput's wall time starts there)
    prepare_s: float = 0.0  # seconds prepare took before training


def train(cfg: Config, local: bool = False, *, callbacks: Optional[list[Callable[[int, dict], None]]] = None,
          hooks: Optional[list[StepHook]] = None) -> TrainResult:
    """Check tracking, prepare the rows (if missing or stale), train, export, record it in MLflow.

    `callbacks(step, metrics)` run on rank 0, `hooks(step, runtime)` on every rank after every
    step. The tracking server is checked before any compute is spent; once training runs,
    tracking problems never stop it."""
    import time

    from chatsft.tracking import should_track

    submitted = time.time()

    from chatsft.pipeline.run import check_prepare

    plan = RunPlan.resolve(cfg, local=local)
    if plan.local_batch_note:
        say(plan.local_batch_note)
    tracked = should_track(cfg.tracking, plan.tracking_uri)
    checked = check_prepare(plan)  # the data and format, in seconds, before Ray starts
    if not local:
        check_storage(plan)
    # Before prepare: a refused run leaves every file of the old one as it was.
    resume = check_resume(plan, checked.identity)
    say(resume.describe())
    t0 = time.time()
    rows = prepared_rows(plan, checked)
    extras = Extras(callbacks=list(callbacks or []), hooks=list(hooks or []), resume=resume,
                    submitted=submitted, prepare_s=time.time() - t0)
    return train_tracked(plan, rows, tracked=tracked, extras=extras)


def train_tracked(plan: RunPlan, rows: "Rows", *, tracked: bool, extras: Optional[Extras] = None,
                  parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                  log_data: bool = True) -> TrainResult:
    """Train on prepared rows inside an MLflow run (a sweep trial is a child of `parent_run_id`)."""
    from chatsft.tracking import RunRecord

    extras = extras or Extras()
    extras.stall_dir = extras.stall_dir or stall_dir(plan)
    record = RunRecord.start(plan.config, plan.tracking_uri, parent_run_id=parent_run_id,
                             run_name=run_name) if tracked else None
    if record is not None:
        record.tracker.log_params({"layout": plan.layout})
        if log_data:
            record.log_data(rows.train_dir, rows.eval_dir)
        if extras.resume is not None and extras.resume.checkpoint:
            record.log_resume(extras.resume.to_json())
        extras.callbacks = [*extras.callbacks, record.step_logger()]
    try:
        result = train_on_rows(plan, rows, extras)
    except BaseException as e:
        if record is not None:
            if extras.stall_dir:
                record.log_stalls(extras.stall_dir, stall_reasons(extras.stall_dir))
            record.fail(e)
        raise
    if record is not None:
        if result.stalls:
            record.log_stalls(extras.stall_dir, result.stalls)
        if result.goodput:
            record.log_goodput(result.goodput)
        record.complete(result.metrics, result.model_dir, result.checkpoint,
                        mlflow_task=plan.kind.mlflow_task, auto_class=plan.kind.auto_class)
        result.run_id = record.run_id
    return result


def train_on_rows(plan: RunPlan, rows: "Rows", extras: Optional[Extras] = None) -> TrainResult:
    """Train on rows already prepared (tests and benchmarks write their own)."""
    import time

    from chatsft.eval.evaluate import training_tasks

    extras = extras or Extras()
    submitted = extras.submitted or time.time()
    if rows.train_rows == 0:
        raise UserError(f"data.train: no training rows after prepare ({rows.train_dir})")
    resume = extras.resume
    if resume is None:
        resume = check_resume(plan, None)
        say(resume.describe())
    plan = resume.apply(plan)  # another worker count: the checkpoint's rows per step
    say(plan.layout)
    stalls = extras.stall_dir or stall_dir(plan)
    args = WorkerArgs(plan=plan, train=RowIndex.build(rows.train_dir),
                      eval=RowIndex.build(rows.eval_dir) if rows.eval_dir and rows.eval_rows else None,
                      export=extras.export,
                      callbacks=list(extras.callbacks), hooks=list(extras.hooks), manifest=resume.manifest,
                      tasks=training_tasks(plan.config) if extras.tasks is None else list(extras.tasks),
                      stall_dir=stalls, goodput_dir=goodput_dir(plan))
    model_dir = plan.model_dir if extras.export else None
    try:
        if plan.local:
            metrics = run_local(args)
        else:
            metrics = _train_on_ray(plan, args, list(extras.ray_callbacks))
        # the run's newest whole checkpoint: the one a next run resumes, whoever wrote it
        out = TrainResult(metrics or {}, latest(plan.checkpoint_dir), model_dir)
    except Exception as e:
        reasons = stall_reasons(stalls) if stalls else []
        if reasons:  # the attempts ran out (scaling.max_failures): say why the last one was stopped
            raise RuntimeError(f"training stalled: {reasons[-1]}") from e
        raise
    out.stalls = stall_reasons(stalls) if stalls else []
    for reason in out.stalls:
        say(f"an attempt was stopped and restarted: {reason}")
    out.resume = resume
    out.goodput = _goodput(args.goodput_dir, submitted, extras.prepare_s)
    if out.goodput is not None:
        out.goodput["stragglers"] = list(out.metrics.get("stragglers", []))
    _summary(out, plan)
    return out


def stall_dir(plan: RunPlan) -> Optional[str]:
    """A new folder of this run for the hang watchdog's reports (train.stall_timeout_s > 0)."""
    if plan.config.train.stall_timeout_s <= 0:
        return None
    import os
    import time

    return storage.join(plan.checkpoint_dir, "stalls", time.strftime("run-%Y%m%dT%H%M%S-") + os.urandom(3).hex())


def goodput_dir(plan: RunPlan) -> str:
    """A new folder of this run for the attempts' time ledgers (train/goodput.py)."""
    import os
    import time

    return storage.join(plan.checkpoint_dir, "goodput", time.strftime("run-%Y%m%dT%H%M%S-") + os.urandom(3).hex())


def _goodput(folder: Optional[str], submitted: float, prepare_s: float) -> Optional[dict]:
    """The run's goodput and where the rest went, from its attempts' ledgers; never fails a run."""
    import time

    from chatsft.train.goodput import breakdown

    if not folder:
        return None
    try:
        b = breakdown(folder, submitted=submitted, end=time.time(), prepare_s=prepare_s)
    except Exception as e:
        say(f"goodput not measured: {type(e).__name__}: {e}")
        return None
    return {**b.to_json(), "line": b.line()}


def stall_reasons(folder: str) -> list[str]:
    """The one-line reason of each attempt the watchdog stopped, oldest first."""
    from chatsft.train.watchdog import REASON

    return [(storage.read_text(f.path) or "").strip()
            for f in storage.list_files(folder, recursive=True) if storage.basename(f.path) == REASON]


# ------------------------------------------------------------------------- ray


def _train_on_ray(plan: RunPlan, args: WorkerArgs, ray_callbacks: list) -> dict[str, Any]:
    """Run the loop on a TorchTrainer; rank 0's final metrics. The workers write their
    checkpoints into the run's folder themselves (train/loop.py `save`): Ray Train gets none, so
    its registry cannot name another checkpoint than the folder holds, nor delete one."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from chatsft.raysetup import ensure_ray

    ensure_ray()
    cfg = plan.config
    sc = cfg.scaling
    _check_sequence_groups(plan)
    _set_aside_ray_registry(plan)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        # A hung collective raises after this: twice the hang watchdog's limit, so the watchdog
        # (train/watchdog.py) reports first, and never before Ray's default 30 minutes, which a
        # rank-0-only export or evaluation may keep the other ranks waiting at a barrier.
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo",
                                 timeout_s=max(1800, int(2 * cfg.train.stall_timeout_s))),
        scaling_config=ScalingConfig(
            # elastic between scaling.min_workers and num_workers: a restarted group of another size
            # resumes at the exact row with the same rows per step (train/loop.py `accumulation`)
            num_workers=(sc.min_workers, plan.workers) if 0 < sc.min_workers < plan.workers else plan.workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=dict(sc.resources_per_worker) or None,
            accelerator_type=sc.accelerator_type, placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=plan.output_dir,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            callbacks=ray_callbacks,
            logging_config=LoggingConfig(log_level="WARNING")),
        # No Ray Dataset: each worker reads its own rows from the files (train/data.py says why).
    )
    # A worker's user error (a model that cannot load, ...) comes back wrapped.
    with user_errors_unwrapped():
        result = trainer.fit()
    return dict(result.return_value or {})  # rank 0's final metrics (the loop returns them)


def _check_sequence_groups(plan: RunPlan) -> None:
    """A sequence group's N workers share one node (Ray Train v2 gives a node's workers consecutive
    ranks): refused before any compute when no node of the cluster holds N workers. (A node that
    holds some but not a multiple of N is caught by the workers: train/sequence_parallel.start.)"""
    import ray

    n = plan.sequence_parallel
    if n == 1:
        return
    need = plan.worker_resources
    fits = []
    for node in (x for x in ray.nodes() if x.get("Alive")):
        have = node.get("Resources", {})
        fits.append(min(int(have.get(k, 0) // v) for k, v in need.items() if v > 0))
    if fits and max(fits) < n:
        what = ", ".join(f"{v:g} {k}" for k, v in need.items())
        raise UserError(f"scaling.sequence_parallel={n}: no node of this cluster holds {n} workers of {what} "
                        f"(at most {max(fits)} on one node); a sequence group must sit on one node: lower "
                        "scaling.sequence_parallel or scaling.resources_per_worker")


# Ray Train's record of the checkpoints reported to it, in its run folder (ray.train.v2 constants).
# Runs of an older chatsft reported theirs; Ray refuses to start a run whose record names a checkpoint
# that is gone, and retention here deletes checkpoints it does not tell Ray about.
RAY_REGISTRY = "checkpoint_manager_snapshot.json"


def _set_aside_ray_registry(plan: RunPlan) -> None:
    """Move an older chatsft's Ray checkpoint record aside (renamed, not deleted): the folder, not
    Ray's record, says which checkpoints there are."""
    found = storage.join(plan.checkpoint_dir, RAY_REGISTRY)
    if storage.exists(found):
        storage.move(found, f"{found}.set-aside")
        say(f"moved Ray Train's checkpoint record of an older chatsft aside: {found}.set-aside")


def _summary(result: TrainResult, plan: RunPlan) -> None:
    """The last line a user reads, and `result.json` beside the run for scripts and jobs."""
    storage.write_text(plan.result_path, json.dumps(
        {"run": plan.config.run.name, "metrics": result.metrics, "checkpoint": result.checkpoint,
         "model_dir": result.model_dir, "goodput": result.goodput,
         "resumed": result.resume.to_json() if result.resume and result.resume.checkpoint else None},
        indent=2, default=str))
    m = result.metrics
    loss = f"eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else f"train loss {m.get('train_loss', float('nan')):.4f}"
    print(f"[chatsft] done: step {m.get('step')}, {loss}; checkpoint {result.checkpoint}; model {result.model_dir}",
          flush=True)
    if result.goodput:
        print(f"[chatsft] {result.goodput['line']}", flush=True)
        for p in result.goodput["preemptions"]:
            print(f"[chatsft] preempted at step {p['step']} ({p['reason']}, node {p['host']}): checkpoint whole "
                  f"{p['spare_s']}s before the deadline", flush=True)
    for name in m.get("stragglers", []):
        print(f"[chatsft] straggler: {name}", flush=True)
    for key in sorted(k for k in m if k.startswith("before/")):
        after = key[len("before/"):]
        if after in m and not after.endswith(("/examples", "/skipped")):
            print(f"[chatsft] {after}: {m[key]:.4f} before training, {m[after]:.4f} after", flush=True)


def check_storage(plan: RunPlan) -> None:
    """Preflight of a multi-node run, before any compute: a local output folder must be shared
    storage (run.shared_storage), and every node must write and read run.output_dir (and see
    what the others wrote there) and load the model's config and tokenizer. One Ray task per
    node, pinned to it; the error names the node that cannot. A cluster of one node that cannot
    hold the workers counts as multi-node: an autoscaler will add nodes for them. Nodes an
    autoscaler adds later are not checked."""
    from chatsft.raysetup import ensure_ray

    cfg = plan.config
    ensure_ray()
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 and all(_holds(n, plan) for n in nodes):
        return  # one machine runs it all
    if storage.is_local(plan.output_dir) and not cfg.run.shared_storage:
        where = (f"a {len(nodes)}-node cluster" if len(nodes) > 1 else
                 "a cluster whose one node cannot hold the run's workers (an autoscaler adds nodes for them)")
        raise UserError(f"run.output_dir={cfg.run.output_dir}: a local path on {where}; use a URI (s3://, "
                        "gs://) or shared storage and set run.shared_storage: true")
    import os

    probes = storage.join(plan.output_dir, f".preflight-{os.urandom(4).hex()}")
    check = ray.remote(num_cpus=0, max_retries=0)(_check_node)
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(plan, probes) for n in nodes]
    try:
        found = ray.get(refs)
        for name, problem in found:
            if problem:
                raise UserError(f"preflight: node {name}: {problem}")
        seen = {storage.basename(f.path) for f in storage.list_files(probes)}
        for (name, _), n in zip(found, nodes):
            if n["NodeID"] not in seen:  # the node wrote into a folder of its own
                raise UserError(f"preflight: node {name}: run.output_dir={cfg.run.output_dir}: what it wrote there "
                                "is not visible to the driver; the folder is not storage every node shares")
    finally:
        try:
            storage.remove(probes)
        except Exception:
            pass


def _holds(node: dict, plan: RunPlan) -> bool:
    """Whether this node has the resources of all the run's workers (scaling.num_workers)."""
    have = node.get("Resources") or {}
    return all(have.get(k, 0.0) >= v * plan.workers for k, v in plan.worker_resources.items())


def _check_node(plan: RunPlan, probes: str) -> tuple[str, Optional[str]]:
    """On one node: (the node's name, what it cannot do, or None)."""
    import socket

    import ray

    from chatsft.builtin import resolve
    from chatsft.model import load_tokenizer

    cfg = plan.config
    node_id = ray.get_runtime_context().get_node_id()
    name = f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, {node_id[:8]})"
    path = storage.join(probes, node_id)
    try:
        storage.write_text(path, node_id)
        if storage.read_text(path) != node_id:
            return name, f"run.output_dir={cfg.run.output_dir}: a file written there reads back differently"
    except Exception as e:
        return name, f"run.output_dir={cfg.run.output_dir}: cannot write and read it: {one_line(e)}"
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(resolve(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code,
                                   revision=cfg.model.revision)
        load_tokenizer(cfg.model)
    except Exception as e:
        return name, f"model.name_or_path={cfg.model.name_or_path}: cannot load its config or tokenizer: {one_line(e)}"
    return name, None




# --------------------------------------------------------------------- prepare


def prepared_rows(plan: RunPlan, checked: Any = None) -> Rows:
    """The prepared Parquet rows (chatsft.pipeline.prepare skips rows that are still fresh)."""
    from chatsft.pipeline import prepare

    p = prepare(plan, checked=checked)
    eval_dir = p.eval_dir if p.eval_dir and parquet_files(p.eval_dir) else None
    if not parquet_files(p.train_dir):
        raise UserError(f"data.train: prepare wrote no rows to {p.train_dir}")
    return Rows(p.train_dir, eval_dir, count_rows(p.train_dir), count_rows(eval_dir) if eval_dir else 0)
