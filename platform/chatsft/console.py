"""What reaches the console: chatsft's own lines, every warning and error, and Ray's start-up lines.

The libraries' running commentary is kept, in log files, off the console:

- Ray Data's progress log and plan lines: its console handler passes warnings only
  (`RAY_DATA_LOGGING_CONFIG`, a copy of Ray's default with that one level changed); all
  of it stays in the session's `logs/ray-data/` files. On a terminal Ray Data draws its
  progress bars (with ETA) as usual.
- Ray Train's "Reporting training result N: TrainingReport(...)" on every worker, and the
  libraries' deprecation notes there (Python warnings, transformers' own logger, both routed
  through logging): the console handler Ray Train puts on a worker's root logger passes
  chatsft's records, errors, and warnings other than those; all of it stays in Ray Train's
  worker files (`logs/train/ray-train-app-worker-*.log`).
- DeepSpeed's "... built successfully" print while its engine starts: that call's prints go
  to `chatsft-libraries.log` (`prints_to_log`).
- Transformers' "Loading weights" bars on every worker: off (`HF_HUB_DISABLE_PROGRESS_BARS`).
- DeepSpeed's "Setting accelerator to CPU": a worker without a GPU names its accelerator
  (`DS_ACCELERATOR=cpu`) instead of letting DeepSpeed guess and warn; in the driver, which
  imports DeepSpeed through transformers without training with it, DeepSpeed's notes below
  errors go to `chatsft-libraries.log`.
- MLflow's store set-up notes, and its model-card and license warnings for a local model:
  into `chatsft-libraries.log` (the Ray session's `logs/`, else the temp folder), scoped to
  the calls that make them.

Nothing here touches chatsft's own lines (`[chatsft] ...` on stdout, the `chatsft.*` loggers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from typing import Iterator

LIBRARY_LOG = "chatsft-libraries.log"
_RAY_DATA_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


# Loggers whose warnings are library housekeeping (deprecations inside torch, transformers):
# kept in the log files, not on the console. Their errors still show.
_HOUSEKEEPING = ("py.warnings", "transformers")


class _OwnAndWarnings(logging.Filter):
    """A console handler's filter: chatsft's records, anyone's errors, and warnings that are
    not library housekeeping."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("chatsft") or record.levelno >= logging.ERROR:
            return True
        housekeeping = any(record.name == n or record.name.startswith(n + ".") for n in _HOUSEKEEPING)
        return record.levelno >= logging.WARNING and not housekeeping


class _ToLibraryLog(logging.Filter):
    """On a library's logger: its records below ERROR are written to `library_log()` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        with open(library_log(), "a", encoding="utf-8") as f:
            f.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")
        return False


def quiet_driver() -> None:
    """In the process that runs prepare and drives training, before Ray starts: its workers inherit
    the environment. Transformers' "Loading weights" bars, echoed from every worker, are not
    chatsft's story either (Hugging Face's own switch, which transformers reads)."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", _RAY_DATA_CONFIG)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ToLibraryLog) for f in deepspeed.filters):
        deepspeed.addFilter(_ToLibraryLog())


def quiet_worker(use_gpu: bool) -> None:
    """In a Ray Train worker, once Ray Train has set up its loggers (the train function's start)."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.captureWarnings(True)  # Python warnings through logging: to the worker's log file
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # transformers' own stderr handler: its records go
        hf_logging.enable_propagation()       # through the root logger (file, filtered console)
    except ImportError:
        pass
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "console" and not any(isinstance(f, _OwnAndWarnings) for f in handler.filters):
            handler.addFilter(_OwnAndWarnings())


def library_log() -> str:
    """The file the libraries' notes go to: the Ray session's logs/ when Ray runs here, else the temp folder."""
    folder = tempfile.gettempdir()
    try:
        import ray

        node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
        if node is not None:
            folder = node.get_logs_dir_path()
    except ImportError:
        pass
    return os.path.join(folder, LIBRARY_LOG)


@contextlib.contextmanager
def prints_to_log() -> Iterator[None]:
    """For the call inside: what is printed to stdout goes to `library_log()` (a library that
    print()s its progress). Only for calls that print nothing of chatsft's."""
    with open(library_log(), "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        yield


@contextlib.contextmanager
def notes_to_log(*loggers: str, level: int = logging.INFO) -> Iterator[None]:
    """For the call inside: what `loggers` say at `level` or above, and the Python warnings raised,
    go to `library_log()` and not to the console. Warnings raised by other threads meanwhile are
    caught too (Python's warning filters are process-wide); they are kept in the same file."""
    handler = logging.FileHandler(library_log(), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    saved = []
    for name in loggers:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, list(lg.handlers)))
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            handler.emit(logging.LogRecord("py.warnings", logging.WARNING, w.filename, w.lineno,
                                           f"{w.category.__name__}: {w.message}", None, None))
    finally:
        for lg, propagate, handlers in saved:
            lg.removeHandler(handler)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = propagate
        handler.close()
