"""benchmarks/scale.py on a tiny corpus, so it does not rot: prepare (publishing to a row cache)
reports its object store peak within the bound prepare sets, and a run on the warm cache
reaches its first optimizer step without preparing anything."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_scale_runs_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH.parent))
    spec.loader.exec_module(bench)
    out = bench.bench_size(400, 2, [], 0, [1], str(tmp_path))
    prep = out["prepare"][1]
    assert prep["rows"] == 400 and 0 < prep["store_peak_mb"] <= bench._store_bound_mb(1)
    warm = out["warm"]
    assert warm["cache_hit"] and not warm["prepared"] and warm["first_step_s"] > 0, warm
    text = capsys.readouterr().out
    assert "warm cache, a new run" in text and "prepared anything: False" in text
