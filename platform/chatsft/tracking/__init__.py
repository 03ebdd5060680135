"""MLflow: one run per training (a parent run per sweep), logged once, by step.

Who logs: the driver opens the run (`record.RunRecord`: config, data statistics,
final results, the model); per-step metrics come from rank 0 of the training
workers only (`record.StepLogger`, a callback of the loop).

- `client.py`: `Tracker`, a generic MLflow run behind a retrying thread
  (`metric_history`, `child_runs` to read back); nothing of chatsft's files.
- `record.py`: `RunRecord` and `StepLogger`, what chatsft puts in a run.
- `plots.py`: loss curves and the shape of the prepared rows.
- `redaction.py`: credentials never reach MLflow.
- `probe.py`: is the server there (`should_track`), asked before compute is spent.

This package is a leaf: it knows MLflow, the storage and the row schema, nothing
of the pipeline or the trainer; the caller resolves the tracking URI (RunPlan).
"""

from chatsft.tracking.client import Tracker
from chatsft.tracking.plots import plot_data, plot_losses
from chatsft.tracking.probe import check_server, should_track
from chatsft.tracking.record import RunRecord, StepLogger
from chatsft.tracking.redaction import redact

__all__ = ["RunRecord", "StepLogger", "Tracker", "check_server", "plot_data", "plot_losses", "redact",
           "should_track"]
