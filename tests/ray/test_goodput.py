"""Goodput (train/goodput.py): the ledger arithmetic on attempts written by the real Ledger, and
a --local run's summary line and result.json."""

import json
import re
import time

import pytest

from chatsft.train.goodput import Ledger, breakdown


def _attempt(folder, start, steps, setup=1.0, ckpt=0.0, evals=0.0, end=None):
    led = Ledger(str(folder), rank=0)
    led.start = start
    led.name = f"attempt-{start}"
    led.add("setup", setup)
    led.add("checkpoint", ckpt)
    led.add("eval", evals)
    led.steps = [(s, 1.0) for s in steps]
    led.flush(wait=True)
    # the ledger stamps its end at the flush: set the attempt's end as the test tells it
    path = folder / f"{led.name}.json"
    rec = json.loads(path.read_text())
    rec["end"] = end if end is not None else start + setup + len(steps) + ckpt + evals
    path.write_text(json.dumps(rec))


def test_a_rank_held_between_steps_still_writes_its_steps(tmp_path, monkeypatch):
    from chatsft.train import goodput

    monkeypatch.setattr(goodput, "FLUSH_S", 0.2)
    led = Ledger(str(tmp_path), rank=0)
    led.step(1, 0.5)
    led.step(2, 0.5)  # and then nothing: the loop waits in a collective, or its node is about to go
    path = tmp_path / f"{led.name}.json"
    deadline = time.time() + 10
    while time.time() < deadline and not (path.exists() and len(json.loads(path.read_text() or "{}").get("steps", [])) == 2):
        time.sleep(0.05)
    assert [s for s, _ in json.loads(path.read_text())["steps"]] == [1, 2]
    led.flush(wait=True)  # the attempt's end: the timer stops
    assert led._ticker is None and led._idle.is_set()


def test_breakdown_counts_survived_redone_and_restarts(tmp_path):
    t = 1000.0
    # submitted at t; prepare 2 s; attempt 1 starts at t+3 (start: 1 s + setup 1 s), steps 1-5, a
    # checkpoint at 4 (1 s); killed; attempt 2 starts 4 s after attempt 1's last record, resumes at
    # 4: steps 5-8 (step 5 redone)
    _attempt(tmp_path, t + 3, [1, 2, 3, 4, 5], ckpt=1.0, end=t + 3 + 1 + 5 + 1)
    _attempt(tmp_path, t + 3 + 7 + 4, [5, 6, 7, 8], setup=2.0, evals=0.5)
    end = t + 3 + 7 + 4 + 2 + 4 + 0.5 + 1.5  # 1.5 s of export and the like
    b = breakdown(str(tmp_path), submitted=t, end=end, prepare_s=2.0)
    assert b.attempts == 2 and b.steps_redone == 1
    assert b.productive_s == pytest.approx(8.0)
    s = b.seconds
    assert s["prepare"] == pytest.approx(2.0) and s["start"] == pytest.approx(2.0)
    assert s["redone"] == pytest.approx(1.0) and s["restart"] == pytest.approx(4.0 + 2.0)
    assert s["checkpoint"] == pytest.approx(1.0) and s["eval"] == pytest.approx(0.5)
    assert s["other"] == pytest.approx(1.5)
    assert b.productive_s + sum(s.values()) == pytest.approx(b.wall_s)
    assert b.goodput == pytest.approx(8.0 / 22.0)
    assert b.line() == "goodput 36%: start 9%, prepare 9%, eval 2%, checkpoint 5%, redone 5%, restart 27%, other 7%"


def test_a_local_run_reports_its_goodput(tmp_path, capsys):
    from trainkit import rows_for, tiny_cfg, train_rows

    cfg = tiny_cfg(tmp_path, "train.max_steps=6", "train.save_every=3", "train.eval_every=3")
    rows = rows_for(cfg, str(tmp_path), train_limit=32, eval_limit=8)
    t0 = time.time()
    result = train_rows(cfg, rows, local=True)
    g = result.goodput
    assert g is not None and g["attempts"] == 1 and g["steps_redone"] == 0 and g["preemptions"] == []
    assert 0 < g["goodput"] < 1 and g["seconds"]["checkpoint"] > 0 and g["seconds"]["eval"] > 0
    assert g["wall_s"] <= time.time() - t0 + 0.1
    # each figure is written to the millisecond: the sum may be off by half a millisecond per term
    terms = 1 + len(g["seconds"])
    assert g["productive_s"] + sum(g["seconds"].values()) == pytest.approx(g["wall_s"], abs=0.0005 * terms + 1e-9)
    assert re.fullmatch(r"goodput \d+%(: [a-z]+ \d+%(, [a-z]+ \d+%)*)?", g["line"]), g["line"]
    assert f"[chatsft] {g['line']}" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["goodput"]["line"] == g["line"]
