"""A trial's outcome as the sweep reads it from Tune's result: its checkpoint keeps the scheme of
the sweep's storage (Tune reports s3://bucket/x as bucket/x)."""

from types import SimpleNamespace

import pandas as pd
import pytest

from chatsft.sweep import _outcome


def result(checkpoint_paths, path):
    df = pd.DataFrame({"eval_loss": [2.0, 1.5], "step": [10, 20], "checkpoint_path": checkpoint_paths})
    return SimpleNamespace(metrics_dataframe=df, metrics={"trial_finished": True, "model_dir": None},
                           error=None, path=path, config={"train.lr": 3e-3})


@pytest.mark.parametrize("where, reported, expected", [
    ("s3://bucket/sweep", "bucket/sweep/trials/trial_1/t/checkpoint_000020",
     "s3://bucket/sweep/trials/trial_1/t/checkpoint_000020"),
    ("/data/sweep", "/data/sweep/trials/trial_1/t/checkpoint_000020",
     "/data/sweep/trials/trial_1/t/checkpoint_000020"),
])
def test_checkpoint_keeps_the_storage_scheme(where, reported, expected):
    out = _outcome(result([None, reported], "bucket/sweep/tune/trial_1"), "eval_loss", "min", where)
    assert out.checkpoint == expected
    assert (out.best, out.last, out.steps, out.status, out.name) == (1.5, 1.5, 20, "TERMINATED", "trial_1")
