"""benchmarks/prepare.py's hf comparison (4.), run on a few records so it does not rot."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "prepare.py"


def test_hf_against_builtin_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("bench_prepare", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = bench.bench_hf(12, 1)
    assert set(times) == {"built-in chatml", "hf, the tokenizer's chatml Jinja", "hf, a Qwen3-style template",
                          "hf, Gemma-4 style, thinking off", "hf, Gemma-4 style, enable_thinking",
                          "hf, Kimi-K2 style"}
    assert all(cpu > 0 and wall > 0 for cpu, wall in times.values())
    out = capsys.readouterr().out
    assert "12 conversations of 5 turns" in out and "(target hf <= 1.5x the built-in; the slowest hf here: " in out
