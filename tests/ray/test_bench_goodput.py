"""benchmarks/goodput.py on tiny sizes: the three runs (baseline, a drain handled, a node lost
unhandled with synchronous uploads) finish on a 2-node cluster, and each prints and writes its
breakdown: the handled run preempted once with nothing redone, the unhandled one restarted.
(The targets need the default sizes.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_goodput_benchmark_runs_on_tiny_sizes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "goodput.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "goodput.py"), "--steps", "12", "--save-every", "4",
                           "--preempt-at", "6", "--rows", "32", "--epochs", "2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    runs = got["runs"]
    assert set(runs) == {"baseline", "handled", "unhandled"}
    assert runs["baseline"]["attempts"] == 1 and runs["baseline"]["preemptions"] == []
    (p,) = runs["handled"]["preemptions"]
    assert runs["handled"]["attempts"] == 2 and runs["handled"]["steps_redone"] == 0 and p["step"] >= 6
    # The lost node costs a restart. The steps it redid since checkpoint 4 are counted only as far as
    # the killed attempt's ledger was flushed (within FLUSH_S, 2 s, of each step's end: a tiny run's steps may all fall in one such window).
    assert runs["unhandled"]["attempts"] == 2 and runs["unhandled"]["shares"]["restart"] > 0
    for name, g in runs.items():
        assert f"  {name:10s} {g['line']}" in proc.stdout
    assert "goodput handled / baseline:" in proc.stdout and "checkpoint share unhandled (sync)" in proc.stdout
