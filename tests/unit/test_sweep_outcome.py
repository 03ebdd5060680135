"""A trial's outcome as the sweep reads it from Tune's result; its checkpoint is the newest whole
one in the trial's folder (the workers write checkpoints there, Tune never sees them)."""

from types import SimpleNamespace

import pandas as pd

from chatsft.sweep import _outcome


def result(path):
    df = pd.DataFrame({"eval_loss": [2.0, 1.5], "step": [10, 20]})
    return SimpleNamespace(metrics_dataframe=df, metrics={"trial_finished": True, "model_dir": None},
                           error=None, path=path, config={"train.lr": 3e-3})


def test_outcome_of_a_trial():
    asked = []

    def checkpoint_of(name):
        asked.append(name)
        return f"s3://bucket/sweep/trials/{name}/t-{name}/checkpoint_000020"

    out = _outcome(result("bucket/sweep/tune/trial_1"), "eval_loss", "min", checkpoint_of)
    assert asked == ["trial_1"]
    assert out.checkpoint == "s3://bucket/sweep/trials/trial_1/t-trial_1/checkpoint_000020"
    assert (out.best, out.last, out.steps, out.status, out.name) == (1.5, 1.5, 20, "TERMINATED", "trial_1")
