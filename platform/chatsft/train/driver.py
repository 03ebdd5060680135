"""`chatsft train`: prepare the rows if needed, then run the per-worker loop on Ray Train
(TorchTrainer) or, with `--local`, in this process."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from chatsft.config import Config
from chatsft.errors import UserError
from chatsft.train.data import COLUMNS, count_rows, parquet_files
from chatsft.train.loop import WorkerArgs, train_loop_per_worker


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last metrics rank 0 reported
    checkpoint: Optional[str]  # the latest checkpoint folder
    model_dir: Optional[str]  # the exported Hugging Face folder
    run_id: Optional[str] = None  # the MLflow run, when tracked


@dataclass
class Rows:
    train_dir: str
    eval_dir: Optional[str]
    train_rows: int
    eval_rows: int


def train(cfg: Config, local: bool = False, *,
          callbacks: Optional[list[Callable[[int, dict], None]]] = None) -> TrainResult:
    """Check tracking, prepare the rows (if missing or stale), train, export, record it in MLflow.

    `callbacks(step, metrics)` run on rank 0. The tracking server is checked before any
    compute is spent; once training runs, tracking problems never stop it."""
    from chatsft.tracking import preflight

    tracked = preflight(cfg)
    return train_tracked(cfg, prepared_rows(cfg), tracked=tracked, local=local, callbacks=callbacks)


def train_tracked(cfg: Config, rows: "Rows", *, tracked: bool, local: bool = False,
                  callbacks: Optional[list[Callable[[int, dict], None]]] = None,
                  ray_callbacks: Optional[list] = None, parent_run_id: Optional[str] = None,
                  run_name: Optional[str] = None, log_data: bool = True) -> TrainResult:
    """Train on prepared rows inside an MLflow run (a sweep trial is a child of `parent_run_id`)."""
    from chatsft.model import model_kind
    from chatsft.tracking import RunRecord

    record = RunRecord.start(cfg, parent_run_id=parent_run_id, run_name=run_name) if tracked else None
    if record is not None:
        if log_data:
            record.log_data(rows.train_dir, rows.eval_dir)
        callbacks = [*(callbacks or []), record.step_logger()]
    try:
        result = train_on_rows(cfg, rows, local=local, callbacks=callbacks, ray_callbacks=ray_callbacks)
    except BaseException as e:
        if record is not None:
            record.fail(e)
        raise
    if record is not None:
        record.complete(result.metrics, result.model_dir, result.checkpoint,
                        seq2seq=model_kind(cfg.model) == "seq2seq")
        result.run_id = record.run_id
    return result


def train_on_rows(cfg: Config, rows: "Rows", *, local: bool = False,
                  callbacks: Optional[list[Callable[[int, dict], None]]] = None,
                  export: bool = True, ray_callbacks: Optional[list] = None,
                  tasks: Optional[list[str]] = None) -> TrainResult:
    """Train on rows already prepared (tests and benchmarks write their own). `tasks`: the
    eval.tasks to score during training (default: the config's, checked here)."""
    if rows.train_rows == 0:
        raise UserError(f"data.train: no training rows after prepare ({rows.train_dir})")
    output_dir = storage_path(cfg.run.output_dir)
    from chatsft.evaluate import training_tasks

    args = WorkerArgs(config=cfg.to_dict(), train_dir=rows.train_dir, eval_dir=rows.eval_dir,
                      train_rows=rows.train_rows, eval_rows=rows.eval_rows, output_dir=output_dir,
                      local=local, export=export, callbacks=list(callbacks or []),
                      tasks=training_tasks(cfg) if tasks is None else list(tasks))
    model_dir = os.path.join(output_dir, "model") if export else None
    if local:
        from chatsft.train.checkpoint import latest_local

        metrics = train_loop_per_worker(asdict(args))
        out = TrainResult(metrics or {}, latest_local(os.path.join(output_dir, "checkpoints")), model_dir)
        _summary(out, output_dir)
        return out
    return _train_on_ray(cfg, args, model_dir, list(ray_callbacks or []))


def storage_path(path: str) -> str:
    """Ray Train v2 wants an absolute path or a URI."""
    return path if "://" in path else os.path.abspath(path)


# ------------------------------------------------------------------------- ray


def _train_on_ray(cfg: Config, args: WorkerArgs, model_dir: str, ray_callbacks: list) -> TrainResult:
    from ray.train import (CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig,
                           ScalingConfig)
    from ray.train.torch import TorchConfig, TorchTrainer

    from chatsft.raysetup import ensure_ray

    ensure_ray()
    _check_storage(cfg, args.output_dir)
    sc = cfg.scaling
    datasets = {"train": _dataset(args.train_dir)}
    if args.eval_dir and args.eval_rows:
        datasets["eval"] = _dataset(args.eval_dir)
    from ray.data import ExecutionOptions

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(args),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu,
            resources_per_worker=dict(sc.resources_per_worker) or None,
            accelerator_type=sc.accelerator_type, placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=args.output_dir,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            callbacks=ray_callbacks,
            logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        # Not split: every worker reads all rows in the same order and keeps its
        # stride of each global batch (train/data.py says why).
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    out = TrainResult(dict(result.metrics or {}), checkpoint, model_dir)
    _summary(out, args.output_dir)
    return out


def _summary(result: TrainResult, output_dir: str) -> None:
    """The last line a user reads, and `result.json` beside the run for scripts and jobs."""
    import json

    if "://" not in output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "result.json"), "w", encoding="utf-8") as f:
            json.dump({"metrics": result.metrics, "checkpoint": result.checkpoint,
                       "model_dir": result.model_dir}, f, indent=2, default=str)
    m = result.metrics
    loss = f"eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else f"train loss {m.get('train_loss', float('nan')):.4f}"
    print(f"[chatsft] done: step {m.get('step')}, {loss}; checkpoint {result.checkpoint}; model {result.model_dir}",
          flush=True)
    for key in sorted(k for k in m if k.startswith("before/")):
        after = key[len("before/"):]
        if after in m and not after.endswith(("/examples", "/skipped")):
            print(f"[chatsft] {after}: {m[key]:.4f} before training, {m[after]:.4f} after", flush=True)


def _dataset(folder: str):
    """The rows as a Ray Dataset in stored order, materialized before the workers start: the
    workers then only read blocks (no Ray Data tasks competing for the CPUs they hold)."""
    import ray.data

    from chatsft.train.data import open_parquet

    files = parquet_files(folder)
    names = open_parquet(files[0]).schema_arrow.names
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # one bar per worker pass clutters the training log
    ds = ray.data.read_parquet(files, columns=[c for c in COLUMNS if c in names], shuffle=None)
    return ds.materialize()


def _check_storage(cfg: Config, output_dir: str) -> None:
    import ray

    if "://" in output_dir or cfg.run.shared_storage:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise UserError(f"run.output_dir={cfg.run.output_dir}: a local path on a {len(nodes)}-node cluster; "
                        "use a URI (s3://, gs://) or shared storage and set run.shared_storage: true")


# --------------------------------------------------------------------- prepare


def prepared_rows(cfg: Config) -> Rows:
    """The prepared Parquet rows (chatsft.pipeline.prepare skips rows that are still fresh)."""
    from chatsft.pipeline import prepare

    p = prepare(cfg)
    eval_dir = p.eval_dir if p.eval_dir and parquet_files(p.eval_dir) else None
    if not parquet_files(p.train_dir):
        raise UserError(f"data.train: prepare wrote no rows to {p.train_dir}")
    return Rows(p.train_dir, eval_dir, count_rows(p.train_dir), count_rows(eval_dir) if eval_dir else 0)
