"""benchmarks/long_context.py at --tiny sizes: every printed row is there and its figures are sane."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")


@pytest.mark.slow  # a few dozen forked 1-, 2- and 4-rank gloo groups, each one training step
def test_long_context_benchmark_runs_tiny(tmp_path):
    # its own interpreter: the ranks are forked, and a test runner that already ran a --local
    # training holds a process group the forked ranks would inherit
    figures = tmp_path / "got.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "long_context.py"), "--tiny", "--quiet",
                           "--cache", str(tmp_path), "--json", str(figures)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": PLATFORM})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    got = {k: {**r, "longest": {int(n): v for n, v in r["longest"].items()}} if "longest" in r else r
           for k, r in json.loads(figures.read_text()).items()}
    assert set(got) == {"off", "on"}
    for key, r in got.items():
        assert r["peak_n1_mb"] > 0 and r["peak_n2_mb"] > 0 and r["step_n1_s"] > 0 and r["step_n2_s"] > 0, r
        peak = re.search(rf"offload {key}\s*: peak per rank N=2 at \d+ / N=1 at \d+: ([\d.]+)x \(target <= 1.15", out)
        step = re.search(rf"offload {key}\s*: step time N=2 at \d+ / N=1 at \d+ \(equal tokens per rank\): "
                         r"([\d.]+)x", out)
        assert peak and step, out
        assert float(peak[1]) > 0 and float(step[1]) > 0
    # the search (offload off by default)
    lengths = got["off"]["longest"]
    # more ranks per row never hold fewer tokens within the same per-rank cap
    assert 0 < lengths[1] <= lengths[2] <= lengths[4], lengths
    longest = re.search(r"offload off: longest max_length within \d+ MB per rank: N=1 (\d+), N=2 (\d+) "
                        r"\(([\d.]+)x, target >= 1.8\), N=4 (\d+) \(([\d.]+)x, target >= 3.2\)", out)
    assert longest, out
    assert [int(longest[i]) for i in (1, 2, 4)] == [lengths[1], lengths[2], lengths[4]]
    assert float(longest[3]) >= 1 and float(longest[5]) >= 1
    assert re.search(r"offload on / off: peak N=1 at \d+ [\d.]+x, step time N=1 [\d.]+x", out)
