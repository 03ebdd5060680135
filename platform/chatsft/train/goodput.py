"""Goodput: the share of a run's wall time spent in optimizer steps that survived.

Rank 0 of every attempt (the first, and each group Ray Train restarts) keeps a
`Ledger` of where its time went: setup (model load, engine, resume), evaluation,
checkpoints on the critical path, and each optimizer step by number. It writes
the ledger, a small JSON, into the run's goodput folder (one per `chatsft train`
invocation, beside its checkpoints) at every checkpoint and evaluation, at a
preemption, at the end, and otherwise within FLUSH_S of a step's end (a timer
thread, so a rank held between steps still writes them): a killed attempt leaves
what it had done up to FLUSH_S before, and the steps it did since its last
checkpoint count as redone.

The driver (`breakdown`) reads them at the end. A step number's last execution
survived; an earlier execution of the same step was redone after a restart. Time
between one attempt's last record and the next attempt's start, plus the next
attempt's setup, was lost to the restart (waiting for nodes included); the time
before the first attempt, less prepare, is start. What no cause claims (export,
logging, the driver's own work) is `other`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from chatsft import storage

FLUSH_S = 2.0
CAUSES = ("start", "prepare", "eval", "checkpoint", "redone", "restart", "other")


class Ledger:
    """One attempt's time by cause (rank 0 writes it; the other ranks keep none)."""

    def __init__(self, folder: Optional[str], rank: int) -> None:
        self.folder = folder if rank == 0 else None
        self.start = time.time()
        self.name = time.strftime("attempt-%Y%m%dT%H%M%S-", time.gmtime(self.start)) + os.urandom(3).hex()
        self.causes: dict[str, float] = {"setup": 0.0, "eval": 0.0, "checkpoint": 0.0}
        self.steps: list[tuple[int, float]] = []
        self.extra: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pending: Optional[dict] = None
        self._writer: Optional[threading.Thread] = None
        self._dirty = False
        self._ticker: Optional[threading.Thread] = None
        self._idle = threading.Event()  # set: the ticker stops (the attempt's last flush)

    def add(self, cause: str, seconds: float) -> None:
        self.causes[cause] = self.causes.get(cause, 0.0) + seconds

    def timed(self, cause: str) -> "_Timed":
        return _Timed(self, cause)

    def step(self, step: int, seconds: float) -> None:
        self.steps.append((step, round(seconds, 6)))
        self._dirty = True
        if self.folder is not None and self._ticker is None:
            self._idle.clear()
            self._ticker = threading.Thread(target=self._tick, name="chatsft-goodput-tick", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._idle.wait(FLUSH_S):
            if self._dirty:
                self.flush()

    def flush(self, wait: bool = False) -> None:
        """Write the ledger as it is now, on a thread (the run's folder may be a slow object store,
        and no step waits for bookkeeping); `wait`: until it is written (the end of an attempt; the
        timer stops until the next step)."""
        if self.folder is None:
            return
        if wait and self._ticker is not None:
            self._idle.set()
            self._ticker = None
        self._dirty = False
        record = self._record(end=time.time())
        with self._lock:
            self._pending = record
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write, name="chatsft-goodput", daemon=True)
                self._writer.start()
            writer = self._writer
        if wait:
            writer.join()

    def _record(self, end: float) -> dict:
        # the timer thread copies what the loop (and the upload thread) may be changing meanwhile
        while True:
            try:
                return {"attempt": self.name, "start": self.start, "end": end, "causes": dict(self.causes),
                        "steps": list(self.steps), **{k: list(v) if isinstance(v, list) else v
                                                     for k, v in list(self.extra.items())}}
            except RuntimeError:  # a dict resized under the copy: copy again
                continue

    def _write(self) -> None:
        while True:
            with self._lock:
                record, self._pending = self._pending, None
                if record is None:
                    self._writer = None
                    return
            try:
                storage.write_text(storage.join(self.folder, f"{self.name}.json"), json.dumps(record))
            except Exception as e:  # goodput is bookkeeping: it never stops training
                print(f"[chatsft] goodput ledger not written ({type(e).__name__}: {e})", flush=True)


class _Timed:
    def __init__(self, ledger: Ledger, cause: str) -> None:
        self.ledger, self.cause = ledger, cause

    def __enter__(self) -> "_Timed":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.ledger.add(self.cause, self.seconds)


# ------------------------------------------------------------------------- the driver


@dataclass
class Breakdown:
    wall_s: float
    productive_s: float
    seconds: dict[str, float]  # cause -> seconds (CAUSES)
    attempts: int
    steps_redone: int
    preemptions: list[dict] = field(default_factory=list)
    uploads: list[dict] = field(default_factory=list)  # background checkpoint uploads (train/upload.py)

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    def share(self, cause: str) -> float:
        return self.seconds.get(cause, 0.0) / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        """"goodput 86%: start 7%, eval 4%, checkpoint 1%, redone 2%" (causes under 0.5% left out)."""
        parts = [f"{c} {self.share(c) * 100:.0f}%" for c in CAUSES if self.share(c) >= 0.005]
        return f"goodput {self.goodput * 100:.0f}%" + (": " + ", ".join(parts) if parts else "")

    def to_json(self) -> dict[str, Any]:
        return {"goodput": round(self.goodput, 4), "wall_s": round(self.wall_s, 3),
                "productive_s": round(self.productive_s, 3),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "shares": {k: round(self.share(k), 4) for k in CAUSES},
                "attempts": self.attempts, "steps_redone": self.steps_redone, "preemptions": self.preemptions,
                "uploads": self.uploads}


def read_attempts(folder: str) -> list[dict]:
    out = []
    for f in storage.list_files(folder) if storage.exists(folder) else []:
        text = storage.read_text(f.path) if f.path.endswith(".json") else None
        if text:
            out.append(json.loads(text))
    return sorted(out, key=lambda a: a["start"])


def breakdown(folder: str, *, submitted: float, end: float, prepare_s: float = 0.0) -> Breakdown:
    """The run's time from `submitted` to `end` by cause, from the attempts' ledgers in `folder`."""
    attempts = read_attempts(folder)
    last: dict[int, float] = {}
    executed = 0.0
    runs = 0
    for a in attempts:
        for step, secs in a["steps"]:
            last[step] = secs  # a later attempt's execution of the step is the one that survived
            executed += secs
            runs += 1
    productive = sum(last.values())
    sec = dict.fromkeys(CAUSES, 0.0)
    sec["prepare"] = prepare_s
    sec["redone"] = executed - productive
    if attempts:
        sec["start"] = max(0.0, attempts[0]["start"] - submitted - prepare_s) + attempts[0]["causes"].get("setup", 0.0)
        for before, a in zip(attempts, attempts[1:]):
            sec["restart"] += max(0.0, a["start"] - before["end"]) + a["causes"].get("setup", 0.0)
        sec["eval"] = sum(a["causes"].get("eval", 0.0) for a in attempts)
        sec["checkpoint"] = sum(a["causes"].get("checkpoint", 0.0) for a in attempts)
    wall = max(end - submitted, 1e-9)
    sec["other"] = max(0.0, wall - productive - sum(v for k, v in sec.items() if k != "other"))
    return Breakdown(wall, productive, sec, len(attempts), runs - len(last),
                     [a["preempted"] for a in attempts if a.get("preempted")],
                     [u for a in attempts for u in a.get("uploads", [])])
