"""The hang watchdog (train.stall_timeout_s): a rank that makes no progress stops the attempt.

Every rank runs one watchdog thread, fed by the loop when a step starts and when it ends
(evaluations and checkpoints between two steps included). Steps are collective, so when one
rank hangs every rank stops making progress, and each rank's watchdog fires within moments
of the others'. A firing rank

1. dumps every thread's Python stack (faulthandler, which needs no lock the hung thread may
   hold) to the log and, with its last progress, to `<stall_dir>/<attempt>/rank<k>.{txt,json}`
   in the run's storage (s3 too: nodes share no disk);
2. waits a little for the other ranks' reports and names the slowest: the rank whose last
   progress is oldest (or that wrote none), and its node;
3. prints that one-line reason, writes it to `reason.txt`, and ends its process: the attempt
   fails and Ray Train's FailureConfig restarts the worker group from the latest checkpoint.
   The main thread may be inside a collective (C++, no Python to interrupt), so exiting the
   process is the one way out that always works.

The driver logs the reports and the reasons to MLflow after the run (train/driver.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

from chatsft import storage

REASON = "reason.txt"
EXIT_CODE = 75  # what a stalled worker exits with


@dataclass
class Progress:
    step: int  # optimizer steps completed by this rank
    started: bool  # and it has started the next one (it is ahead of a rank that has not)
    what: str  # the last thing it started or finished, in words
    at: float  # wall time of that (ranks on different nodes compare these)


class Watchdog:
    def __init__(self, timeout_s: float, *, rank: int, world: int, node: str, folder: str,
                 grace_s: Optional[float] = None) -> None:
        self.timeout_s, self.rank, self.world, self.node, self.folder = timeout_s, rank, world, node, folder
        # how long a firing rank waits for the others' reports before it names the slowest
        self.grace_s = grace_s if grace_s is not None else min(30.0, max(5.0, timeout_s / 2))
        self.progress = Progress(0, False, "setup", time.time())
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Watchdog":
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="chatsft-watchdog", daemon=True)
        self._thread.start()
        return self

    def feed(self, step: int, started: bool) -> None:
        """`step` optimizer steps are done; `started`: and the next one has begun."""
        what = f"the start of step {step + 1}" if started else f"the end of step {step}"
        self.progress = Progress(step, started, what, time.time())
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ internals

    def _watch(self) -> None:
        tick = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(tick):
            if time.monotonic() - self._last > self.timeout_s:
                self._fire()
                return

    def _fire(self) -> None:
        stacks = dump_stacks()
        p = self.progress
        idle = time.time() - p.at
        _log(f"[chatsft watchdog] rank {self.rank} on node {self.node}: no progress for {idle:.0f}s "
             f"(train.stall_timeout_s={self.timeout_s:g}; last: {p.what}); its threads:\n{stacks}")
        try:
            storage.write_text(storage.join(self.folder, f"rank{self.rank}.txt"), stacks)
            storage.write_text(storage.join(self.folder, f"rank{self.rank}.json"), json.dumps(
                {"rank": self.rank, "node": self.node, "step": p.step, "started": p.started, "what": p.what,
                 "at": p.at}))
            reports = self._reports(wait=True)
            reason = stall_reason(reports, self.world, self.timeout_s)
            storage.write_text(storage.join(self.folder, REASON), reason + "\n")
        except Exception as e:  # the storage itself may be what hangs or fails: still stop the attempt
            reason = (f"train.stall_timeout_s={self.timeout_s:g}: rank {self.rank} on node {self.node} made no "
                      f"progress for {idle:.0f}s (the other ranks' reports could not be read: {e})")
        _log(f"chatsft: stalled: {reason}")
        os._exit(EXIT_CODE)

    def _reports(self, wait: bool) -> dict[int, dict]:
        deadline = time.monotonic() + (self.grace_s if wait else 0)
        while True:
            found = {}
            for f in storage.list_files(self.folder, suffix=".json"):
                text = storage.read_text(f.path)
                if text:
                    r = json.loads(text)
                    found[int(r["rank"])] = r
            if len(found) >= self.world or time.monotonic() >= deadline:
                return found
            time.sleep(0.5)


def stall_reason(reports: dict[int, dict], world: int, timeout_s: float) -> str:
    """One line naming the slowest rank: one that wrote no report (it is stuck where even its
    watchdog cannot run, or on a lost node), else the one least far: fewest steps done, not yet
    in the next one (the others wait for it there), then the oldest last progress."""
    head = f"train.stall_timeout_s={timeout_s:g}: no optimizer step finished in {timeout_s:g}s"
    missing = [r for r in range(world) if r not in reports]
    if missing:
        return f"{head}; slowest: rank {missing[0]} (no report from it; " \
               f"ranks {', '.join(map(str, missing))} silent)"
    slow = min(reports.values(), key=lambda r: (r["step"], r["started"], r["at"], r["rank"]))
    others = [r for r in reports.values() if r is not slow]
    behind = "; the other ranks got further" if any((r["step"], r["started"]) > (slow["step"], slow["started"])
                                                     for r in others) else ""
    return f"{head}; slowest: rank {slow['rank']} on node {slow['node']} (last progress: {slow['what']}{behind})"


def dump_stacks() -> str:
    """Every thread's Python stack, as faulthandler writes it (it needs a real file)."""
    import faulthandler

    with tempfile.TemporaryFile(mode="w+", prefix="chatsft-stacks-") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


def _log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
