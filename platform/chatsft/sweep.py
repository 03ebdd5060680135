"""`chatsft sweep`: Ray Tune over `train`, the Ray Train v2 way.

The rows are prepared once, before any trial starts; every trial trains on the
same Parquet rows. Each trial is a plain function that builds and fits a
TorchTrainer for its own config; the trainer's reports reach Tune through a
callback that forwards evaluations only, so the scheduler (ASHA by default)
compares trials on eval loss at the steps it was measured. A failed trial is
reported with its cause and does not end the sweep. MLflow: one parent run for
the sweep, a child run per trial, the best trial tagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from chatsft import storage
from chatsft.config import Config, from_dict, set_key
from chatsft.errors import UserError, one_line
from chatsft.plan import RunPlan


@dataclass
class TrialOutcome:
    name: str
    params: dict[str, Any]
    status: str  # TERMINATED (ran to the end), STOPPED (early, by the scheduler), ERROR
    best: Optional[float]  # best value of the sweep metric it reported
    last: Optional[float]
    steps: int
    error: Optional[str]
    model_dir: Optional[str]
    checkpoint: Optional[str]  # the last checkpoint it reported


@dataclass
class SweepResult:
    trials: list[TrialOutcome]
    best: Optional[TrialOutcome]
    best_config: Optional[Config]
    best_checkpoint: Optional[str]
    best_model_dir: Optional[str]
    parent_run_id: Optional[str]


def search_space(plan: RunPlan) -> dict[str, Any]:
    """sweep.space -> Tune's param space, keyed by the dotted config key."""
    from ray import tune

    cfg = plan.config
    if not cfg.sweep.space:
        raise UserError("sweep.space: empty; name at least one key, e.g. "
                        "sweep.space={train.lr: {type: loguniform, low: 1e-5, high: 1e-3}}")
    space = {}
    for key, dim in cfg.sweep.space.items():
        _check_key(plan, key)
        if dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "choice":
            space[key] = tune.choice([_number(v) for v in dim.values])
        else:
            space[key] = tune.grid_search([_number(v) for v in dim.values])
    return space


def _number(value: Any) -> Any:
    """PyYAML reads `3e-4` (no dot) as a string; a sweep value that reads as a number is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_key(plan: RunPlan, key: str) -> None:
    cfg = plan.config
    try:
        trial_config(plan, {key: _number(_probe_value(cfg, key))}, "probe")
    except Exception as e:
        raise UserError(f"sweep.space.{key}: {e}") from None


def _probe_value(cfg: Config, key: str) -> Any:
    dim = cfg.sweep.space[key]
    return dim.values[0] if dim.values else dim.low


def trial_config(base: RunPlan, params: dict[str, Any], trial: str) -> Config:
    """The base config with the trial's values; each trial writes under trials/<trial> and
    records in the sweep's MLflow store (not a store of its own under its output dir)."""
    raw = base.config.to_dict()
    if base.tracking_uri:
        raw["tracking"]["uri"] = base.tracking_uri
    for key, value in params.items():
        set_key(raw, key, value)
    raw["run"]["name"] = f"{base.config.run.name}-{trial}"
    raw["run"]["output_dir"] = storage.join(base.output_dir, "trials", trial)
    return from_dict(Config, raw)


def max_concurrent(plan: RunPlan) -> int:
    """Trials at once: what the cluster fits given each trial's workers (unless set)."""
    import ray

    cfg = plan.config
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    total = ray.cluster_resources()
    need = plan.workers
    fits = min(int(total.get(k, 0) // (v * need)) for k, v in plan.worker_resources.items() if v > 0)
    if fits < 1:
        raise UserError(f"scaling: one trial needs {need} x {plan.worker_resources}, the cluster has {total}")
    return fits


def check_sweep(plan: RunPlan) -> None:
    """What a sweep needs of the config, checked before any data is prepared."""
    cfg = plan.config
    if cfg.sweep.metric == "eval_loss" and plan.eval_split == "none":
        raise UserError("sweep.metric=eval_loss needs an eval split: set data.eval or data.eval_fraction")
    if cfg.train.eval_every <= 0:
        raise UserError("train.eval_every: a sweep needs evaluations during training (> 0) so the "
                        "scheduler can compare trials before they end")


def sweep(cfg: Config) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from chatsft.raysetup import ensure_ray
    from chatsft.tracking import RunRecord, should_track
    from chatsft.train.driver import check_storage, prepared_rows

    plan = RunPlan.resolve(cfg)
    check_sweep(plan)
    space = search_space(plan)
    tracked = should_track(cfg.tracking, plan.tracking_uri)
    ensure_ray()
    check_storage(plan)
    rows = prepared_rows(plan)  # once, shared by every trial
    parent = RunRecord.start(cfg, plan.tracking_uri, run_name=f"{cfg.run.name}-sweep",
                             tags={"chatsft.role": "sweep"}) if tracked else None
    if parent is not None:
        parent.log_data(rows.train_dir, rows.eval_dir)

    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    scheduler = (ASHAScheduler(time_attr="step", grace_period=cfg.sweep.grace_period * cfg.train.eval_every,
                               reduction_factor=cfg.sweep.reduction_factor,
                               max_t=_max_steps(plan, rows.train_rows))
                 if cfg.sweep.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_parameters(_run_trial, base=plan, rows=rows, tracked=tracked,
                                     parent_run_id=parent.run_id if parent else None)
    # The trial function only drives its TorchTrainer; the workers hold the CPUs and GPUs.
    # Tune wants a non-empty request: a little memory, so trials never keep workers waiting.
    trainable = tune.with_resources(trainable, {"memory": 64 * 2**20})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                    num_samples=cfg.sweep.num_samples,
                                    max_concurrent_trials=max_concurrent(plan),
                                    trial_name_creator=_name, trial_dirname_creator=_name),
        run_config=tune.RunConfig(name=f"{cfg.run.name}-sweep",
                                  storage_path=storage.join(plan.output_dir, "tune"),
                                  verbose=1),
    )
    grid = tuner.fit()
    outcomes = [_outcome(r, metric, mode, lambda name: _trial_checkpoint(plan, name)) for r in grid]
    ok = [t for t in outcomes if t.best is not None and math.isfinite(t.best)]
    best = (min if mode == "min" else max)(ok, key=lambda t: t.best) if ok else None
    result = SweepResult(outcomes, best, None, None, None, parent.run_id if parent else None)
    if best is not None:
        result.best_config = trial_config(plan, best.params, best.name)
        result.best_checkpoint = best.checkpoint
        if best.model_dir and storage.is_dir(best.model_dir):
            result.best_model_dir = storage.join(plan.output_dir, "best", "model")
            storage.publish_dir(best.model_dir, result.best_model_dir)
    print(table(outcomes, best, metric))
    if best is not None:
        print(f"[chatsft] best trial {best.name}: {metric} {best.best:.4f} with "
              + ", ".join(f"{k}={v}" for k, v in best.params.items()))
        print(f"[chatsft] best checkpoint {result.best_checkpoint}; model {result.best_model_dir}")
    if parent is not None:
        _record(parent, cfg, outcomes, best, metric)
    if best is None:
        raise UserError(f"sweep: no trial reported a finite {metric}; see the table above")
    return result


def _max_steps(plan: RunPlan, train_rows: int) -> int:
    """ASHA's horizon: the longest trial, counting the largest epochs in the space."""
    from chatsft.train.schedule import total_steps

    cfg = plan.config
    epochs = [cfg.train.epochs]
    dim = cfg.sweep.space.get("train.epochs")
    if dim is not None:
        epochs += [int(_number(v)) for v in dim.values] or [int(dim.high or 1)]
    # One past the longest trial: ASHA stops a trial that reaches max_t at that very report,
    # which would cut it off before it exports its model.
    return max(total_steps(train_rows, plan.global_batch, e, cfg.train.max_steps) for e in epochs) + 1


# ------------------------------------------------------------------ the trial


def _run_trial(params: dict[str, Any], *, base: RunPlan, rows: Any, tracked: bool,
               parent_run_id: Optional[str]) -> None:
    """One trial: its config, a child MLflow run, and a TorchTrainer whose evaluations go to Tune."""
    from ray import tune

    from chatsft.train.driver import Extras, train_tracked

    trial = tune.get_context().get_trial_name()
    plan = RunPlan.resolve(trial_config(base, params, trial))
    cfg = plan.config
    result = train_tracked(plan, rows, tracked=tracked,
                           extras=Extras(ray_callbacks=[_EvalsToTune(cfg.sweep.metric)]),
                           parent_run_id=parent_run_id, run_name=cfg.run.name, log_data=False)
    # The last word for the table: where the model and the MLflow run are.
    tune.report({"step": result.metrics.get("step", 0), "model_dir": result.model_dir or "", "trial_finished": True,
                 cfg.sweep.metric: _finite(result.metrics.get(cfg.sweep.metric))})


def _finite(value: Any) -> float:
    # A diverged trial reports NaN; schedulers compare numbers, so it becomes +inf (worst for min).
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return float("inf")
    return float(value)


def _evals_to_tune_class():
    from ray.train.v2.api.callback import UserCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalsToTune(UserCallback):  # Ray's callback interface; forwarding is ours
        """Forward the trainer's reports to Tune only when they carry a fresh evaluation."""

        def __init__(self, metric: str) -> None:
            self.metric = metric
            self.inner = TuneReportCallback()

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if m.get("eval_step") != m.get("step") or self.metric not in m:
                return
            m[self.metric] = _finite(m[self.metric])
            self.inner.after_report(run_context, [m], checkpoint)

    return EvalsToTune


def _EvalsToTune(metric: str):
    return _evals_to_tune_class()(metric)


# -------------------------------------------------------------------- results


def _trial_checkpoint(plan: RunPlan, trial: str) -> Optional[str]:
    """The newest whole checkpoint in a trial's folder (its workers write them there, not to Tune)."""
    from chatsft.train.checkpoint import latest

    run = trial_config(plan, {}, trial).run
    return latest(storage.join(run.output_dir, run.name))


def _outcome(r: Any, metric: str, mode: str, checkpoint_of: Callable[[str], Optional[str]]) -> TrialOutcome:
    """What a trial did; `checkpoint_of(trial name)` finds its newest whole checkpoint."""
    df = r.metrics_dataframe
    values = [] if df is None or metric not in df else [float(v) for v in df[metric].dropna()]
    finite = [v for v in values if math.isfinite(v)]
    best = (min if mode == "min" else max)(finite) if finite else (values[0] if values else None)
    m = r.metrics or {}
    done = bool(m.get("trial_finished"))
    status = "ERROR" if r.error else ("TERMINATED" if done else "STOPPED")
    name = storage.basename(r.path) if r.path else "?"
    steps = int(df["step"].max()) if df is not None and "step" in df and len(df) else 0
    return TrialOutcome(name=name, params=dict(r.config), status=status, best=best,
                        last=values[-1] if values else None, steps=steps,
                        error=one_line(r.error) if r.error else None,
                        model_dir=m.get("model_dir") or None, checkpoint=checkpoint_of(name) if r.path else None)


def _name(trial: Any) -> str:
    """Trial name = its folder name = the suffix of its run name and MLflow run."""
    return f"trial_{trial.trial_id}"


def table(trials: list[TrialOutcome], best: Optional[TrialOutcome], metric: str) -> str:
    keys = sorted({k for t in trials for k in t.params})
    head = ["trial", *keys, f"best {metric}", "steps", "status"]
    rows = []
    for t in trials:
        status = t.status if not t.error else f"ERROR: {t.error}"
        rows.append([t.name + (" *" if t is best else ""), *[_fmt(t.params.get(k)) for k in keys],
                     _fmt(t.best), str(t.steps), status])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _record(parent: Any, cfg: Config, trials: list[TrialOutcome], best: Optional[TrialOutcome],
            metric: str) -> None:
    """Parent run: the table, the best trial; children: the best tagged, stopped ones closed."""
    t = parent.tracker
    t.log_text(table(trials, best, metric), "sweep_table.txt")
    if best is not None:
        t.log_values({f"best_{metric}": best.best})
        t.set_tags({"best_trial": best.name, **{f"best.{k}": v for k, v in best.params.items()}})
    children = t.child_runs()
    by_trial = {c.data.tags.get("mlflow.runName", "").removeprefix(f"{cfg.run.name}-"): c for c in children}
    for trial in trials:
        child = by_trial.get(trial.name)
        if child is None:
            continue
        if best is not None and trial.name == best.name:
            t.set_tags({"best": "true"}, run_id=child.info.run_id)
            t.set_tags({"best_run_id": child.info.run_id})
        t.set_tags({"sweep_status": trial.status}, run_id=child.info.run_id)
        if "goodput" in child.data.metrics:  # a trial that ran to its end (train/goodput.py)
            t.log_values({f"goodput/{trial.name}": child.data.metrics["goodput"]})
        if child.info.status == "RUNNING":  # stopped by the scheduler mid-run
            t.terminate(child.info.run_id, "KILLED")
    t.finish("FINISHED")
