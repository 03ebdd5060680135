"""The console is chatsft's: library chatter goes to log files, chatsft's lines and warnings stay."""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings


def test_notes_of_a_call_go_to_the_log_file_not_the_console(tmp_path, monkeypatch, capsys):
    from chatsft.console import library_log, notes_to_log

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a Ray left running by an earlier test: its logs/
    log = library_log()
    lib = logging.getLogger("somelib")
    console = logging.StreamHandler(sys.stderr)
    lib.addHandler(console)
    try:
        with notes_to_log("somelib"):
            logging.getLogger("somelib.card").warning("the model card could not be retrieved")
            warnings.warn("no license file", UserWarning)
        lib.warning("after the call: on the console again")
    finally:
        lib.removeHandler(console)
    err = capsys.readouterr().err
    assert "model card" not in err and "no license" not in err and "on the console again" in err
    with open(log, encoding="utf-8") as f:
        kept = f.read()
    assert "the model card could not be retrieved" in kept and "UserWarning: no license file" in kept


def test_a_worker_console_passes_chatsft_and_warnings_only():
    from chatsft.console import quiet_worker

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("console")  # the name Ray Train's worker logging config gives it
    root.addHandler(handler)
    try:
        quiet_worker(use_gpu=True)
        quiet_worker(use_gpu=True)  # twice: one filter
        assert len(handler.filters) == 1

        def passes(name: str, level: int) -> bool:
            return handler.filter(logging.LogRecord(name, level, __file__, 1, "x", None, None))

        assert not passes("/ray/train/v2/_internal/execution/context.py", logging.INFO)  # the report dump
        assert passes("chatsft.tracking", logging.INFO) and passes("ray.train", logging.WARNING)
        assert not passes("py.warnings", logging.WARNING) and not passes("transformers.generation", logging.WARNING)
        assert passes("transformers.modeling_utils", logging.ERROR)
    finally:
        root.removeHandler(handler)


def test_ray_data_logs_warnings_on_the_console_and_everything_to_its_file(monkeypatch):
    from ray.data._internal import logging as data_logging

    from chatsft.console import _RAY_DATA_CONFIG, quiet_driver

    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    quiet_driver()
    import os

    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == _RAY_DATA_CONFIG
    ours, theirs = data_logging._get_logging_config(), data_logging.DEFAULT_CONFIG
    assert ours["handlers"]["console"]["level"] == "WARNING"
    assert ours["loggers"] == theirs["loggers"] and ours["handlers"]["file"] == theirs["handlers"]["file"]
    data_logging.configure_logging()  # Ray Data builds its handlers from it
    try:
        levels = {h.get_name() or type(h).__name__: h.level for h in logging.getLogger("ray.data").handlers}
        assert logging.WARNING in levels.values()
    finally:
        monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG")
        data_logging.configure_logging()


def test_deepspeed_notes_in_the_driver_go_to_the_log_file(tmp_path, monkeypatch, capsys):
    from chatsft.console import _ToLibraryLog, library_log, quiet_driver

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    log = library_log()
    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", "x")  # kept: the user's own choice wins
    quiet_driver()
    import os

    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == "x"
    ds = logging.getLogger("DeepSpeed")
    console = logging.StreamHandler(sys.stderr)
    ds.addHandler(console)
    try:
        ds.warning("Setting accelerator to CPU.")
        ds.error("a real DeepSpeed error")
    finally:
        ds.removeHandler(console)
        for f in [f for f in ds.filters if isinstance(f, _ToLibraryLog)]:
            ds.removeFilter(f)
    err = capsys.readouterr().err
    assert "Setting accelerator" not in err and "a real DeepSpeed error" in err
    with open(log, encoding="utf-8") as f:
        assert "WARNING DeepSpeed: Setting accelerator to CPU." in f.read()
