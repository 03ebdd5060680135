"""MLflow: one run per training (a parent run per sweep), logged once, by step.

Who logs: the driver opens the run (`RunRecord`: config, data statistics,
final results, the model); per-step metrics come from rank 0 of the training
workers only (`StepLogger`, a callback of the loop). Steps already logged are
not logged again, so a worker group restarted from a checkpoint continues the
same run without duplicates.

This module is a leaf: it knows MLflow, the config and the storage, nothing of
the pipeline or the trainer; the caller resolves the tracking URI (RunPlan).

Logging never stops training: calls go through a background thread that
retries transient failures and, when the server stays away, drops the call,
counts it and reports it at the end. Only an unreachable server *at start* is
an error (before any compute is spent), unless `tracking.required: false`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from chatsft import storage
from chatsft.errors import UserError

log = logging.getLogger("chatsft.tracking")

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential|access[_-]?key)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_QUERY_SECRET = re.compile(r"([?&][^=&\s]*(?:token|key|secret|password|sig|signature)[^=&\s]*=)[^&\s]+", re.I)


def redact(key: str, value: Any) -> Any:
    """Credentials never reach MLflow: secret-looking keys, URL user:password@ and signed query params."""
    if _SECRET_KEY.search(key) and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        value = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}***@", value)
        value = _QUERY_SECRET.sub(r"\1***", value)
    return value


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's fluent API (the only way to log a flavor) needs a global tracking URI, and
    set_tracking_uri also exports it as $MLFLOW_TRACKING_URI: a later run in the same process
    would then silently log to this server. Set it for the call and put both back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    before = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = before
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def _local_artifacts(uri: str) -> Optional[str]:
    """A SQLite store keeps its artifacts beside it (MLflow's default is ./mlruns of the CWD)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def check_server(uri: str, timeout: float = 5.0) -> Optional[str]:
    """None if the tracking server answers; else why not. Only http(s) URIs are probed."""
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (user-given server)
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        # Servers behind auth proxies answer 401/403 on /health: reachable all the same.
        return None if e.code in (401, 403) else f"HTTP {e.code}"
    except Exception as e:  # connection refused, DNS, timeout
        return str(getattr(e, "reason", e))


def preflight(cfg: Any, uri: Optional[str]) -> bool:
    """Check the tracking server before compute is spent. Returns whether to track
    (`uri` is the run's resolved tracking URI, None when tracking is off)."""
    if not cfg.tracking.enabled or uri is None:
        return False
    problem = check_server(uri)
    if problem is None:
        return True
    shown = redact("uri", uri)
    if cfg.tracking.required:
        raise UserError(f"tracking.uri: MLflow server {shown} is unreachable ({problem}); start it, fix "
                        "tracking.uri, or set tracking.required=false to train without it")
    log.warning("MLflow server %s is unreachable (%s): training goes on without tracking", shown, problem)
    print(f"warning: MLflow server {shown} is unreachable ({problem}); training goes on without tracking")
    return False


@dataclass
class Tracker:
    """An MLflow run fed through a background thread; safe to call from a training loop."""

    uri: str
    experiment: str
    run_name: str
    run_id: Optional[str] = None  # resume this run (sweep trial, restart)
    parent_run_id: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    retries: int = 4
    backoff: float = 0.5
    failures: list[str] = field(default_factory=list)
    last_step: dict[str, int] = field(default_factory=dict)  # metric -> last step logged
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._client = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Create (or reopen) the run synchronously; a failure here is a UserError."""
        # MLflow's own HTTP retries wait minutes; ours are shorter and run off the training thread.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):  # the store's folder (the run's output dir) may not exist yet
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        try:
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(
                self.experiment, artifact_location=_local_artifacts(self.uri))
            if self.run_id is None:
                tags = dict(self.tags)
                tags["mlflow.runName"] = self.run_name
                if self.parent_run_id:
                    tags["mlflow.parentRunId"] = self.parent_run_id
                self.run_id = self._client.create_run(exp_id, tags=tags, run_name=self.run_name).info.run_id
            else:
                self._client.update_run(self.run_id, status="RUNNING")
                self.last_step = self._last_logged_steps()
        except Exception as e:
            raise UserError(f"tracking.uri: cannot open an MLflow run at {redact('uri', self.uri)}: "
                            f"{_one_line(e)}") from None
        self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
        self._thread.start()
        return self.run_id

    def finish(self, status: Optional[str] = "FINISHED", timeout: float = 120.0) -> None:
        """Flush what is queued (within `timeout`), end the run with `status` (None: leave it
        running, for a worker's logger), and report the calls that failed."""
        if self._thread is None:
            return
        if status is not None:
            self._submit("set_terminated", lambda c: c.set_terminated(self.run_id, status=status))
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self.failures:
            msg = (f"MLflow: {len(self.failures)} logging call(s) failed and were dropped; "
                   f"last: {self.failures[-1]}")
            log.warning(msg)
            print(f"warning: {msg}")

    # ---------------------------------------------------------------- logging

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(redact(k, v))) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            chunk = items[i: i + 100]
            self._submit("log_params", lambda c, chunk=chunk: c.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> int:
        """Log each metric of a step once: a metric already logged at this or a later step is
        skipped (a restarted worker group re-reports steps). Returns how many were logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or step <= self.last_step.get(k, -1):
                continue
            self.last_step[k] = step
            items.append(Metric(k, float(v), now, step))
            self.history.setdefault(k, []).append((step, float(v)))
        if items:
            self._submit(f"log_metrics@{step}", lambda c: c.log_batch(self.run_id, metrics=items))
        return len(items)

    def log_values(self, metrics: dict[str, float], step: int = 0) -> None:
        """Metrics that are not part of the step sequence (data statistics, final scores)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self._submit("log_values", lambda c: c.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._submit(f"tag {k}", lambda c, k=k, v=v: c.set_tag(self.run_id, k, str(v)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(f"text {artifact_file}", lambda c: c.log_text(self.run_id, text, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact (MLflow writes and removes its own temp file);
        the figure is closed once it is sent."""

        def call(client) -> None:
            import matplotlib.pyplot as plt

            try:
                client.log_figure(self.run_id, figure, artifact_file)
            finally:
                plt.close(figure)

        self._submit(f"figure {artifact_file}", call)

    def log_data_stats(self, stats: dict, split: str, folder: Optional[str] = None) -> None:
        """stats.json of a prepared split: numbers as metrics, the file and the preview as artifacts."""
        flat = {}
        for k, v in stats.items():
            if isinstance(v, dict):
                flat.update({f"data/{split}/{k}/{kk}": vv for kk, vv in v.items()})
            else:
                flat[f"data/{split}/{k}"] = v
        self.log_values(flat)
        if folder:
            for name in ("stats.json", "template_report.txt", "mask_preview.html", "bad_records.jsonl"):
                text = storage.read_text(storage.join(folder, name))
                if text is not None:
                    self.log_text(text, f"data/{split}/{name}")
        else:
            self.log_text(json.dumps(stats, indent=2, sort_keys=True), f"data/{split}/stats.json")

    def log_model(self, model_dir: str, *, task: str = "text-generation", register_as: Optional[str] = None,
                  flavor: bool = True, flavor_max_bytes: int = 2 << 30) -> None:
        """The exported HF folder as an MLflow `transformers` model when it is small enough to
        load here (MLflow's flavor needs the objects: logging from a checkpoint path is broken
        with transformers 5), else as a plain artifact folder `model/`."""

        def call(client) -> None:
            with storage.scratch("chatsft-mlflow-model-") as tmp:
                local = model_dir
                if storage.is_uri(model_dir):  # MLflow reads the folder from local disk
                    storage.copy_tree(model_dir, tmp)
                    local = tmp
                uri = log(client, local)
            client.set_tag(self.run_id, "model_uri", uri)  # where to load it from
            if register_as:
                import mlflow

                with _fluent_uri(self.uri):
                    mlflow.register_model(uri, register_as)

        def log(client, local: str) -> str:
            import mlflow

            size = sum(p.stat().st_size for p in Path(local).rglob("*") if p.is_file())
            if flavor and size <= flavor_max_bytes:
                with _fluent_uri(self.uri), mlflow.start_run(run_id=self.run_id):
                    info = mlflow.transformers.log_model(
                        transformers_model=_load_for_mlflow(local, task), name="model", task=task,
                        pip_requirements=_pip_requirements())
                return info.model_uri
            client.log_artifacts(self.run_id, local, "model")
            return f"runs:/{self.run_id}/model"

        self._submit("model", call)


    def wait(self, timeout: float = 120.0) -> None:
        """Block until what is queued so far has been sent (or dropped)."""
        done = threading.Event()
        self._queue.put(("barrier", lambda c: done.set()))
        done.wait(timeout)

    # ------------------------------------------------------------ internals

    def _submit(self, what: str, fn: Callable[[Any], None]) -> None:
        if self._thread is None:
            raise RuntimeError("Tracker.start() was not called")
        self._queue.put((what, fn))

    def _drain(self) -> None:
        # After a call has failed all its retries the server is taken to be away: later
        # calls get one try each until one goes through, so a dead server costs the
        # queue seconds, not minutes.
        down = False
        while True:
            item = self._queue.get()
            if item is None:
                return
            what, fn = item
            tries = 1 if down else self.retries + 1
            for attempt in range(tries):
                try:
                    fn(self._client)
                    down = False
                    break
                except Exception as e:  # the server is away, or a transient error
                    if attempt == tries - 1:
                        self.failures.append(f"{what}: {_one_line(e)}")
                        down = True
                    else:
                        time.sleep(self.backoff * 2 ** attempt)

    def _last_logged_steps(self) -> dict[str, int]:
        run = self._client.get_run(self.run_id)
        return {key: max(m.step for m in self._client.get_metric_history(self.run_id, key))
                for key in run.data.metrics}


def _load_for_mlflow(model_dir: str, task: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cls = AutoModelForSeq2SeqLM if task == "text2text-generation" else AutoModelForCausalLM
    return {"model": cls.from_pretrained(model_dir), "tokenizer": AutoTokenizer.from_pretrained(model_dir)}


def _pip_requirements() -> list[str]:
    # Stated, not inferred: MLflow's inference imports torchvision, which has no CPU wheel here.
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "peft"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return reqs


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())[:300]


# ---------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: dict[str, list[tuple[int, float]]]) -> Optional[Any]:
    """Train and eval loss by step in one figure."""
    series = {k: v for k, v in history.items() if k in ("train_loss", "eval_loss") and v}
    if not series:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for key, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o" if key == "eval_loss" else None, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_data(rows_dir: str, max_rows: int = 50_000) -> Optional[Any]:
    """Distributions of per-row supervision ratio and length, read from the prepared Parquet rows."""
    import numpy as np

    from chatsft.data.schema import IGNORE

    files = storage.list_files(rows_dir, suffix=".parquet")
    if not files:
        return None
    lengths, ratios = [], []
    for f in files:
        table = storage.read_parquet(f.path, columns=["input_ids", "labels"])
        for labels in table.column("labels").to_pylist():
            lab = np.asarray(labels)
            lengths.append(len(lab))
            ratios.append(float((lab != IGNORE).mean()) if len(lab) else 0.0)
            if len(lengths) >= max_rows:
                break
        if len(lengths) >= max_rows:
            break
    fig, (a, b) = _pyplot().subplots(1, 2, figsize=(10, 4))
    a.hist(ratios, bins=40)
    a.set_xlabel("supervised tokens / tokens (per row)")
    a.set_ylabel("rows")
    b.hist(lengths, bins=40)
    b.set_xlabel("tokens per row")
    fig.suptitle(f"{len(lengths)} rows of {storage.basename(rows_dir)}")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------ a training run


def plot_goodput(goodput: dict) -> Optional[Any]:
    """The run's wall time as one stacked bar: optimizer steps that survived, then each cause."""
    shares = {"steps": goodput["goodput"], **{k: v for k, v in goodput["shares"].items() if v > 0}}
    fig, ax = _pyplot().subplots(figsize=(7, 2.2))
    left = 0.0
    for name, share in shares.items():
        ax.barh([0], [share * 100], left=left * 100, label=f"{name} {share * 100:.1f}%")
        left += share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of wall time from submission to the end")
    ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    return fig


class StepLogger:
    """Rank 0's per-step metrics -> the run. Picklable: it travels to the Ray worker and opens
    its own client there; a restarted worker reopens the run and skips steps already logged.
    (A plain class, not a dataclass: `dataclasses.asdict` of the worker arguments must not
    turn it into a dict.)"""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str) -> None:
        self.uri, self.experiment, self.run_name, self.run_id = uri, experiment, run_name, run_id
        self._tracker: Optional[Tracker] = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tracker"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tracker = None

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment, self.run_name, run_id=self.run_id)
            try:
                self._tracker.start()
            except UserError as e:  # the server went away after preflight: train on, say so
                print(f"warning: {e}; step metrics are not logged")
                self._tracker = None
                return
        self._tracker.log_metrics(metrics, step)

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.finish(status=None)


@dataclass
class RunRecord:
    """The driver's side of a training run: config, data, final results, model."""

    cfg: Any
    tracker: Tracker

    @classmethod
    def start(cls, cfg: Any, uri: str, *, run_name: Optional[str] = None, parent_run_id: Optional[str] = None,
              tags: Optional[dict[str, str]] = None) -> "RunRecord":
        t = Tracker(uri, cfg.tracking.experiment, run_name or cfg.run.name,
                    parent_run_id=parent_run_id, tags=dict(tags or {}))
        t.start()
        t.log_params(cfg.flat())
        t.log_text(cfg.to_yaml(), "config.yaml")
        print(f"[chatsft] MLflow run {t.run_id} at {redact('uri', t.uri)} (experiment {cfg.tracking.experiment})")
        return cls(cfg, t)

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def step_logger(self) -> StepLogger:
        t = self.tracker
        return StepLogger(t.uri, t.experiment, t.run_name, t.run_id)

    def log_data(self, train_dir: str, eval_dir: Optional[str]) -> None:
        for split, folder in (("train", train_dir), ("eval", eval_dir)):
            if not folder:
                continue
            text = storage.read_text(storage.join(folder, "stats.json"))
            if text is not None:
                self.tracker.log_data_stats(json.loads(text), split, folder)
            fig = plot_data(folder)
            if fig is not None:
                self.tracker.log_figure(fig, f"plots/data_{split}.png")

    def complete(self, metrics: dict[str, Any], model_dir: Optional[str], checkpoint: Optional[str],
                 *, seq2seq: bool = False) -> None:
        t = self.tracker
        final = {f"final/{k}": v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        t.log_values(final, step=int(metrics.get("step", 0) or 0))
        if checkpoint:
            t.set_tags({"checkpoint": redact("checkpoint", checkpoint)})
        fig = plot_losses(self._history())
        if fig is not None:
            t.log_figure(fig, "plots/loss.png")
        if model_dir and self.cfg.tracking.log_model and storage.is_dir(model_dir):
            adapter = storage.exists(storage.join(model_dir, "adapter_config.json"))
            t.set_tags({"model_dir": model_dir})
            t.log_model(model_dir, task="text2text-generation" if seq2seq else "text-generation",
                        register_as=self.cfg.tracking.register_as, flavor=not adapter)
        t.finish("FINISHED")

    def log_resume(self, resume: dict) -> None:
        """A resumed run: where from, and the settings that changed (applied from that step)."""
        self.tracker.set_tags({"resumed_from": resume["checkpoint"], "resumed_at_step": resume["step"],
                               "resume_changed": ", ".join(resume["changed"]) or "nothing"})
        self.tracker.log_text(json.dumps(resume, indent=2, default=str), "resume.json")

    def log_stalls(self, folder: str, reasons: list[str]) -> None:
        """Attempts the hang watchdog stopped: every rank's stacks and the one-line reason of each,
        as artifacts under stalls/ (read from the run's storage, where the workers left them)."""
        for f in storage.list_files(folder, recursive=True):
            text = storage.read_text(f.path)
            if text is not None:
                inner = f.path[len(folder.rstrip("/")) + 1:]
                self.tracker.log_text(text, f"stalls/{inner}")
        self.tracker.set_tags({"stalls": len(reasons), "stall_reason": reasons[-1] if reasons else ""})

    def log_goodput(self, goodput: dict) -> None:
        """The run's goodput (train/goodput.py): a metric per cause, the breakdown as a bar plot and
        JSON, and the preemptions and stragglers as tags."""
        t = self.tracker
        t.log_values({"goodput": goodput["goodput"], **{f"goodput/{k}": v for k, v in goodput["shares"].items()}},
                     step=0)
        t.log_text(json.dumps(goodput, indent=2), "goodput.json")
        t.set_tags({"goodput": goodput["line"], "preemptions": len(goodput["preemptions"]),
                    "stragglers": "; ".join(goodput.get("stragglers", [])) or "none"})
        fig = plot_goodput(goodput)
        if fig is not None:
            t.log_figure(fig, "plots/goodput.png")

    def fail(self, error: BaseException) -> None:
        self.tracker.set_tags({"error": _one_line(error)})
        self.tracker.finish("FAILED")

    def _history(self) -> dict[str, list[tuple[int, float]]]:
        """Loss curves as the run holds them (rank 0 logged them, possibly in another process)."""
        self.tracker.wait()
        out: dict[str, list[tuple[int, float]]] = {}
        for key in ("train_loss", "eval_loss"):
            try:
                out[key] = [(m.step, m.value) for m in self.tracker._client.get_metric_history(self.run_id, key)]
            except Exception as e:
                self.tracker.failures.append(f"history {key}: {_one_line(e)}")
        return out
