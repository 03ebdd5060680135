"""benchmarks/engines.py on the tiny model, one timed step: the comparison runs end to end."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


@pytest.mark.slow  # 6 processes start DeepSpeed or FSDP2 (a minute on 2 cores)
def test_engines_benchmark_runs_tiny(capsys):
    # imported by name: the spawned workers import the module of their function again
    sys.path.insert(0, BENCHMARKS)
    bench = importlib.import_module("engines")
    got = bench.main(["--model", "tiny", "--steps", "1", "--warmup", "1", "--length", "32"])
    assert set(got["engines"]) == {"fsdp2", "zero3", "zero2"}
    for row in got["engines"].values():
        assert row["peak_mb"] >= 50 and row["step_s"] > 0 and row["cpu_s"] > 0
    assert all(r > 0 for r in got["ratios"].values())
    out = capsys.readouterr().out
    assert "fsdp2 / ZeRO-3: peak RSS" in out and "(target <= 1)" in out
