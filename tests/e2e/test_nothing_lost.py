"""Nothing a user has is ever lost: `chatsft export` writes only where it may, retention deletes
only complete checkpoints older than the newest complete one, and a corrupt newest checkpoint
is named by path while the run resumes from the one before it (and says so everywhere).

Real runs of the tiny model in this process (`--local`), on rows written by the test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from chatsft.cli import main
from chatsft.train import checkpoint as ckpt
from chatsft.train.driver import Extras
from tests.faults import StepLog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ray"))
from trainkit import rows_for, state_of, tiny_cfg, train_rows  # noqa: E402

pytestmark = pytest.mark.slow
RUN = ["train.save_every=2", "train.micro_batch_size=2", "train.grad_accum=2"]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(err: str, verb: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err[-2000:]
    assert lines[0].startswith(f"chatsft {verb}: error: "), lines[0]
    return lines[0]


def test_export_never_deletes_what_it_did_not_write(tmp_path, capsys, monkeypatch):
    cfg = tiny_cfg(tmp_path, *RUN, "train.max_steps=2", "eval.tasks=[]")
    train_rows(cfg, rows_for(cfg, str(tmp_path), train_limit=16, eval_limit=0), local=True)
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    out = tmp_path / "out"
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.txt").write_text("three years of work\n")
    (mine / "config.json").write_text("{}\n")  # looks like a model folder; still the user's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("the working folder's own file\n")
    before_run, before_mine = snapshot(out), snapshot(mine)

    def export(*extra: str) -> tuple[int, str]:
        rc = main(["export", str(config), *extra])
        return rc, capsys.readouterr().err

    # a folder of the user's: refused, named, --force offered; nothing in it touched
    rc, err = export("--out", str(mine))
    assert rc == 2, err
    line = one_error(err, "export")
    assert str(mine) in line and "--force" in line, line
    assert snapshot(mine) == before_mine
    # the run's own folder, its parent and the working folder: never, even with --force
    for where in (out, tmp_path, Path(".")):
        for force in ([], ["--force"]):
            rc, err = export("--out", str(where), *force)
            assert rc == 2, (where, force, err)
            assert "--out" in one_error(err, "export")
            assert snapshot(out) == before_run, (where, force)
            assert (tmp_path / "keep.txt").exists() and snapshot(mine) == before_mine
    # a new folder, a previous export of the same kind and the run's own model folder: written
    assert export("--out", str(tmp_path / "exported"))[0] == 0
    assert export("--out", str(tmp_path / "exported"))[0] == 0
    assert (tmp_path / "exported" / "config.json").exists()
    assert export()[0] == 0 and (out / "model" / "config.json").exists()
    # and the user's folder when the user says so
    assert export("--out", str(mine), "--force")[0] == 0
    assert not (mine / "notes").exists() and (mine / "config.json").read_text() != "{}\n"
    assert (tmp_path / "keep.txt").read_text() == "the working folder's own file\n"


def test_retention_keeps_the_last_good_checkpoint(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, *RUN, "train.save_every=1", "train.keep_checkpoints=2", "train.max_steps=2")
    rows = rows_for(cfg, str(tmp_path), train_limit=24, eval_limit=0)
    train_rows(cfg, rows, local=True)
    run = tmp_path / "out" / "t"
    assert sorted(os.listdir(run)) >= ["checkpoint_000001", "checkpoint_000002"]
    # a save of step 3 cut off mid-write: its files are there, the model's shard only half written
    partial = run / "checkpoint_000003"
    shutil.copytree(run / "checkpoint_000002", partial)
    shard = partial / "state" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    partial_files = snapshot(partial)

    ckpt.prune(str(run), 1)  # what every save does with train.keep_checkpoints=1
    assert (run / "checkpoint_000002").is_dir(), "retention deleted the last good checkpoint"
    assert not (run / "checkpoint_000001").exists(), "retention kept an older complete checkpoint"
    assert snapshot(partial) == partial_files, "retention touched the partial checkpoint"

    log = StepLog(tmp_path / "steps")
    resumed = train_rows(tiny_cfg(tmp_path, *RUN, "train.save_every=1", "train.keep_checkpoints=1",
                                  "train.max_steps=4"), rows, local=True, extras=Extras(hooks=[log]))
    said = capsys.readouterr().out
    assert str(partial) in said, said[-3000:]  # the partial checkpoint is named by path
    assert os.path.basename(resumed.resume.checkpoint) == "checkpoint_000002"
    assert log.steps() == [3, 4]
    # the newest complete checkpoint is the run's last; nothing older is kept beyond it
    assert state_of(str(run / "checkpoint_000004"))["step"] == 4
    assert sorted(p for p in os.listdir(run) if p.startswith("checkpoint_")) == ["checkpoint_000004"]


def test_a_corrupt_newest_checkpoint_is_named_and_the_one_before_used(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, *RUN, "train.max_steps=4", "train.keep_checkpoints=2")
    rows = rows_for(cfg, str(tmp_path), train_limit=24, eval_limit=0)
    train_rows(cfg, rows, local=True)
    run = tmp_path / "out" / "t"
    bad = run / "checkpoint_000004" / "state" / "mp_rank_00_model_states.pt"
    bad.write_bytes(b"\0" * bad.stat().st_size)  # same size, its content gone (a disk error)
    capsys.readouterr()

    log = StepLog(tmp_path / "steps")
    resumed = train_rows(tiny_cfg(tmp_path, *RUN, "train.max_steps=6", "train.keep_checkpoints=2"), rows,
                         local=True, extras=Extras(hooks=[log]))
    said = capsys.readouterr().out
    assert str(run / "checkpoint_000004") in said and "corrupt" in said, said[-3000:]
    named = resumed.resume.checkpoint
    assert os.path.basename(named) == "checkpoint_000002"
    assert json.loads((tmp_path / "out" / "result.json").read_text())["resumed"]["checkpoint"] == named
    assert log.steps() == [3, 4, 5, 6]  # the workers loaded checkpoint 2, the one named
    assert resumed.metrics["step"] == 6


def test_a_second_run_name_gets_its_own_model_and_result(tmp_path):
    rows = rows_for(tiny_cfg(tmp_path), str(tmp_path), train_limit=16, eval_limit=0)
    first = train_rows(tiny_cfg(tmp_path, *RUN, "train.max_steps=1"), rows, local=True)
    out = tmp_path / "out"
    assert first.model_dir == str(out / "model")
    kept = {k: v for k, v in snapshot(out).items() if k.startswith(("model/", "result.json", "t/"))}

    second = train_rows(tiny_cfg(tmp_path, *RUN, "train.max_steps=2", "run.name=u"), rows, local=True)
    assert second.model_dir == str(out / "u" / "model")
    now = snapshot(out)
    assert {k: now.get(k) for k in kept} == kept, "the second run name overwrote the first one's files"
    assert json.loads((out / "result.json").read_text())["run"] == "t"
    result = json.loads((out / "u" / "result.json").read_text())
    assert result["run"] == "u" and result["metrics"]["step"] == 2 and result["model_dir"] == second.model_dir
    assert (out / "u" / "model" / "config.json").exists()
    # each name finds its own again: the first run resumes into the folder's model/ as before
    again = train_rows(tiny_cfg(tmp_path, *RUN, "train.max_steps=2"), rows, local=True)
    assert again.model_dir == str(out / "model") and again.resume.step == 1
    assert json.loads((out / "u" / "result.json").read_text()) == result
