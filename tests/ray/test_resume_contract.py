"""The resume contract (train/resume.py), both ways, on real runs into one output folder:
a changed data or model setting is refused before anything is touched, naming the keys; a
changed learning rate is applied from the resumed step and said in the log and result.json;
train.resume=never moves the old run aside and starts fresh."""

import json
import os

import pytest

from chatsft.config import load_config
from chatsft.errors import UserError
from chatsft.train.driver import train

pytestmark = pytest.mark.slow


def cfg(tmp, *overrides):
    return load_config(None, [
        f"run.output_dir={tmp}/out", "run.name=r", "model.name_or_path=builtin:tiny-llama",
        "data.train=chatsft://samples/train.jsonl", "data.max_length=256", "data.template=chatml",
        "train.micro_batch_size=4", "train.lr=1e-2", "train.schedule=constant", "train.precision=fp32",
        "train.max_steps=2", "train.log_every=1", "train.deepspeed.stage=0", "tracking.enabled=false",
        "eval.tasks=[]", *overrides])


def files_of(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getmtime(os.path.join(d, f))
            for d, _, names in os.walk(folder) for f in names}


def test_changed_rows_refuse_and_changed_lr_applies(tmp_path, capsys):
    first = train(cfg(tmp_path), local=True)
    assert first.metrics["step"] == 2 and first.metrics["lr"] == pytest.approx(1e-2)
    assert "fresh run" in capsys.readouterr().out
    out = tmp_path / "out"
    before = files_of(out)

    with pytest.raises(UserError) as refused:
        train(cfg(tmp_path, "data.template=llama3", "data.max_length=128", "train.lr=1e-4"), local=True)
    line = str(refused.value)
    assert "checkpoint_000002 is of another run" in line
    assert 'data.template "chatml" -> "llama3"' in line and "data.max_length 256 -> 128" in line
    assert "train.resume=never" in line and "run.output_dir" in line
    assert files_of(out) == before  # rows, checkpoint, model and result.json untouched

    resumed = train(cfg(tmp_path, "train.lr=1e-4", "train.max_steps=4"), local=True)
    log = capsys.readouterr().out
    assert "resuming from" in log and "checkpoint_000002 at step 2" in log
    assert "train.lr 0.01 -> 0.0001" in log and "train.max_steps 2 -> 4" in log
    assert resumed.metrics["step"] == 4
    assert resumed.metrics["lr"] == pytest.approx(1e-4)  # the new lr, not the checkpoint's
    result = json.loads((out / "result.json").read_text())
    assert result["resumed"]["step"] == 2
    assert result["resumed"]["changed"]["train.lr"] == {"was": 0.01, "now": 0.0001}
    assert result["metrics"]["lr"] == pytest.approx(1e-4)

    fresh = train(cfg(tmp_path, "data.template=llama3", "train.resume=never"), local=True)
    log = capsys.readouterr().out
    assert "fresh run" in log and "moved to" in log
    assert fresh.metrics["step"] == 2
    (archived,) = (out / "archive").iterdir()
    assert (archived / "r" / "checkpoint_000004" / "chatsft_run.json").exists()
    assert (archived / "model" / "config.json").exists() and (archived / "result.json").exists()
    manifest = json.loads((out / "r" / "checkpoint_000002" / "chatsft_run.json").read_text())
    assert manifest["rows"]["data"]["template"] == "llama3"
