"""A generic MLflow run, fed through a background thread that retries: safe to call from a
training loop. It knows MLflow and nothing of chatsft's files or models (`record.py` does).

Logging never stops training: calls go through a background thread that retries
transient failures and, when the server stays away, drops the call, counts it
and reports it at the end. Reads (`metric_history`, `child_runs`) wait for what
is queued, then retry the same way in the caller's thread. Only a run that
cannot be opened at `start` is an error (before any compute is spent).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from chatsft.console import notes_to_log
from chatsft.errors import UserError, one_line
from chatsft.tracking.redaction import redact

log = logging.getLogger("chatsft.tracking")
T = TypeVar("T")


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
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


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Tracker:
    """One MLflow run: opened by `start`, written through the retrying thread, read back by step."""

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

    def __post_init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._client = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Create (or reopen) the run synchronously; a failure here is a UserError."""
        # MLflow's own HTTP retries wait minutes; ours are shorter and run off the training thread.
        # 30 s per call: a busy server's first queries (its store warming up) outlast 10.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):  # the store's folder (the run's output dir) may not exist yet
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            with notes_to_log("mlflow"):  # a new store's set-up notes (the client opens the store)
                self._client = MlflowClient(tracking_uri=self.uri)
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
                            f"{one_line(e)}") from None
        self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
        self._thread.start()
        return self.run_id

    def finish(self, status: Optional[str] = "FINISHED", timeout: float = 120.0) -> None:
        """Flush what is queued (within `timeout`), end the run with `status` (None: leave it
        running, for a worker's logger), and report the calls that failed."""
        if self._thread is None:
            return
        if status is not None:
            self.submit("set_terminated", lambda c: c.set_terminated(self.run_id, status=status))
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self.failures:
            msg = (f"MLflow: {len(self.failures)} logging call(s) failed and were dropped; "
                   f"last: {self.failures[-1]}")
            log.warning(msg)
            print(f"warning: {msg}")

    def wait(self, timeout: float = 120.0) -> None:
        """Block until what is queued so far has been sent (or dropped)."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(("barrier", lambda c: done.set()))
        done.wait(timeout)

    # ---------------------------------------------------------------- writing

    def submit(self, what: str, fn: Callable[[Any], None]) -> None:
        """Any MLflow call, `fn(MlflowClient)`, sent in order on the retrying thread; `what`
        names it in the failures reported at the end."""
        if self._thread is None:
            raise RuntimeError("Tracker.start() was not called")
        self._queue.put((what, fn))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(redact(k, v))) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            chunk = items[i: i + 100]
            self.submit("log_params", lambda c, chunk=chunk: c.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> int:
        """Log each metric of a step once: a metric already logged at this or a later step is
        skipped (a restarted worker group re-reports steps). Returns how many were logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if not _number(v) or step <= self.last_step.get(k, -1):
                continue
            self.last_step[k] = step
            items.append(Metric(k, float(v), now, step))
        if items:
            self.submit(f"log_metrics@{step}", lambda c: c.log_batch(self.run_id, metrics=items))
        return len(items)

    def log_values(self, metrics: dict[str, float], step: int = 0) -> None:
        """Metrics that are not part of the step sequence (data statistics, final scores)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _number(v)]
        if items:
            self.submit("log_values", lambda c: c.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, Any], run_id: Optional[str] = None) -> None:
        """Tags of this run, or of another (`run_id`: a sweep's child)."""
        rid = run_id
        for k, v in tags.items():
            self.submit(f"tag {k}", lambda c, k=k, v=v: c.set_tag(rid or self.run_id, k, str(v)))

    def terminate(self, run_id: str, status: str) -> None:
        """End another run (a sweep's child the scheduler stopped)."""
        self.submit(f"terminate {run_id}", lambda c: c.set_terminated(run_id, status))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.submit(f"text {artifact_file}", lambda c: c.log_text(self.run_id, text, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact (MLflow writes and removes its own temp file);
        the figure is closed once it is sent."""

        def call(client) -> None:
            import matplotlib.pyplot as plt

            try:
                client.log_figure(self.run_id, figure, artifact_file)
            finally:
                plt.close(figure)

        self.submit(f"figure {artifact_file}", call)

    @contextlib.contextmanager
    def fluent_run(self) -> Iterator[None]:
        """This run as MLflow's active fluent run (model flavors, the registry), the global
        tracking URI put back after."""
        import mlflow

        with _fluent_uri(self.uri), mlflow.start_run(run_id=self.run_id):
            yield

    def register_model(self, model_uri: str, name: str) -> None:
        import mlflow

        with _fluent_uri(self.uri):
            mlflow.register_model(model_uri, name)

    # ---------------------------------------------------------------- reading

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric as the run holds it (rank 0 may have logged it from another
        process), after what is queued here has been sent. [] when the server cannot say."""
        self.wait()
        points = self._read(f"history {key}", lambda c: c.get_metric_history(self.run_id, key))
        return [(m.step, m.value) for m in points or []]

    def child_runs(self) -> list[Any]:
        """The runs whose parent is this run (MLflow Run objects), after what is queued is sent."""
        self.wait()

        def search(c) -> list:
            exp = c.get_run(self.run_id).info.experiment_id
            return c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")

        return self._read("child runs", search) or []

    # ------------------------------------------------------------ internals

    def _read(self, what: str, fn: Callable[[Any], T]) -> Optional[T]:
        for attempt in range(self.retries + 1):
            try:
                return fn(self._client)
            except Exception as e:  # the server is away, or a transient error
                if attempt == self.retries:
                    self.failures.append(f"{what}: {one_line(e)}")
                    return None
                time.sleep(self.backoff * 2 ** attempt)
        return None

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
                        self.failures.append(f"{what}: {one_line(e)}")
                        down = True
                    else:
                        time.sleep(self.backoff * 2 ** attempt)

    def _last_logged_steps(self) -> dict[str, int]:
        run = self._client.get_run(self.run_id)
        return {key: max(m.step for m in self._client.get_metric_history(self.run_id, key))
                for key in run.data.metrics}
