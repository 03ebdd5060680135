"""benchmarks/gpu.py on a CPU (--dry-run): every configuration of the GPU table is built, the 0.5B
model's count and FLOP formula are printed, and every row this machine can step takes a timed step
through chatsft's loop (TRL's SFTTrainer too where trl is installed); a row that breaks, or a
process over its cap, is a FAILED row with its reason and the table still comes out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "gpu.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dry_run(out: Path, *args: str) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "results.json").read_text())["rows"]


@pytest.mark.slow  # a timed step of every row, in subprocesses: half a minute
def test_dry_run_builds_every_row_and_steps_those_this_machine_can(tmp_path):
    gpu = bench_module()
    stdout, rows = dry_run(tmp_path)
    # the real model's config: Qwen2.5-0.5B's published parameter count, its FLOPs per token
    assert "494,032,768 parameters, N = 494,032,768 in matmuls" in stdout
    assert "FLOPs per step = 6 N T + 12 L h K" in stdout and "2.964 GFLOP per token" in stdout
    plan = stdout[stdout.index("plan:"):stdout.index("setup ")]
    stepped = []
    for row in gpu.table_rows("sdpa"):
        assert row.name in plan
        got = rows[row.name.strip()]
        if gpu.missing(row):
            assert got["status"] == "SKIPPED" and all(m in got["reason"] for m in gpu.missing(row)), got
        elif row.cuda_only:
            assert got["status"] == "CPU" and row.cuda_only in got["reason"], got
        else:
            assert got["status"] == "OK", (row.name, got)
            assert got["step_time"] > 0 and got["learned_tok_s"] > 0 and got["tokens_per_step"] == 2 * 256
            stepped.append(row.name.strip())
    assert {"compile off", "LoRA r=16", "fused AdamW off", "bf16 weights, no fp32 masters"} <= set(stepped)
    assert ("TRL SFTTrainer" in stepped) == (importlib.util.find_spec("trl") is not None)
    headline = rows[gpu.table_rows("sdpa")[0].name.strip()]
    assert headline["profile"]["top"] and "where the time goes" in stdout
    assert "the GPU machine does not have" not in (tmp_path / "rows.log").read_text()


def test_a_row_that_breaks_is_failed_and_the_next_still_runs(tmp_path):
    # flash attention without CUDA or flash-attn: each row's own load raises, in one process
    stdout, rows = dry_run(tmp_path, "--only", "compile off,fused AdamW off",
                           "--set", "model.attn_implementation=flash_attention_2")
    for name in ("compile off", "fused AdamW off"):
        assert rows[name]["status"] == "FAILED", rows[name]
        assert rows[name]["reason"].startswith("UserError: model.attn_implementation=flash_attention_2: not usable")
    log = (tmp_path / "rows.log").read_text()
    assert "===== compile off: FAILED" in log and "===== fused AdamW off: FAILED" in log
    assert "  fused AdamW off                           FAILED  UserError: model.attn_implementation" in stdout


def test_a_process_over_its_cap_is_killed_and_its_rows_failed(tmp_path):
    stdout, rows = dry_run(tmp_path, "--only", "compile off", "--budget-s", "0")
    assert rows["compile off"]["status"] == "FAILED"
    assert rows["compile off"]["reason"].startswith("over its 1 s cap (last output: ")
    assert "  compile off                               FAILED  over its 1 s cap" in stdout
