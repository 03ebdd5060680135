"""The hang watchdog's pieces without Ray: the reason it gives and the stacks it dumps; and a
real watchdog thread in a child process that stops making progress."""

import json
import subprocess
import sys
import textwrap

import pytest

from chatsft.config import ConfigError, load_config
from chatsft.train.watchdog import EXIT_CODE, dump_stacks, stall_reason


def test_the_slowest_rank_is_the_one_that_has_not_started_the_next_step():
    # rank 0 waits inside step 4 for rank 1, which ended step 3 after rank 0 did but never went on
    reports = {0: {"rank": 0, "node": "a", "step": 3, "started": True, "what": "the start of step 4", "at": 100.0},
               1: {"rank": 1, "node": "b", "step": 3, "started": False, "what": "the end of step 3", "at": 100.2}}
    reason = stall_reason(reports, world=2, timeout_s=30)
    assert reason == ("train.stall_timeout_s=30: no optimizer step finished in 30s; slowest: rank 1 on node b "
                      "(last progress: the end of step 3; the other ranks got further)")
    # where all are equally far, the oldest progress is the slowest
    reports[0].update(started=False, what="the end of step 3", at=99.0)
    assert "slowest: rank 0 on node a (last progress: the end of step 3)" in stall_reason(reports, 2, 30)


def test_a_rank_without_a_report_is_the_slowest():
    reports = {0: {"rank": 0, "node": "a", "step": 3, "started": True, "what": "the start of step 4", "at": 100.0}}
    assert "slowest: rank 1 (no report from it" in stall_reason(reports, world=2, timeout_s=5)


def test_stacks_name_every_thread():
    text = dump_stacks()
    assert "Current thread" in text and "test_watchdog.py" in text


def test_the_key_is_checked():
    assert load_config(None, []).train.stall_timeout_s == 0
    with pytest.raises(ConfigError, match="train.stall_timeout_s: must be >= 0"):
        load_config(None, ["train.stall_timeout_s=-1"])


def test_a_stalled_process_reports_and_exits(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from chatsft.train.watchdog import Watchdog
        w = Watchdog(0.5, rank=0, world=1, node="here", folder={str(tmp_path)!r}, grace_s=0).start()
        w.feed(2, started=False)
        def stuck_in_a_step():
            time.sleep(30)
        stuck_in_a_step()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == EXIT_CODE, out.stderr
    assert "stuck_in_a_step" in (tmp_path / "rank0.txt").read_text()
    assert json.loads((tmp_path / "rank0.json").read_text())["step"] == 2
    reason = (tmp_path / "reason.txt").read_text().strip()
    assert reason.startswith("train.stall_timeout_s=0.5: ") and "rank 0 on node here" in reason
    assert f"chatsft: stalled: {reason}" in out.stderr
