"""Stragglers (train.straggler_ratio): which rank slows a synchronous run.

In data-parallel training every rank's step lasts as long as the slowest's: the
others wait in a collective. So a rank's step time says nothing; its busy time
(its step less its wait) does. The wait is measured at the step's first
collective (the supervised-token count, loop.one_step), where the ranks meet
before any forward: a rank that finished the previous step early (its compute,
its reading, its hooks) waits there for the late one. (The engine's gradient
reduction inside backward is counted as compute: with a rank slow in backward,
the others' extra wait there hides in their compute.)

Per logging interval every rank's busy and wait seconds are gathered (one
collective per interval, on every rank at the same steps); a rank whose busy time
exceeds the median of the other ranks' by the ratio for STREAK intervals in a row
is named, with its host and node, in the log and in MLflow. It is never stopped.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

from chatsft.train.progress import say

STREAK = 3


class Stragglers:
    def __init__(self, rt: Any, ratio: float) -> None:
        self.rt, self.ratio = rt, ratio
        self.on = ratio > 0 and rt.world > 1
        self.busy = self.wait = 0.0
        self.streak = [0] * rt.world
        self.named: list[str] = []  # "rank 1 on host (node abcd1234)", once each
        self.where: list[str] = []
        if self.on:
            self.where = [x for x in rt.gather(f"{socket.gethostname()} (node {rt.node_id[:8]})")]

    def step(self, seconds: float, waited: float) -> None:
        self.busy += max(0.0, seconds - waited)
        self.wait += waited

    def interval(self, step: int) -> dict[str, float]:
        """At a logging step (collective): per-rank busy and wait seconds of the interval, for
        rank 0's metrics; names a rank slow for STREAK intervals."""
        if not self.on:
            return {}
        got = [tuple(map(float, x.split())) for x in self.rt.gather(f"{self.busy:.6f} {self.wait:.6f}")]
        self.busy = self.wait = 0.0
        busy = [b for b, _ in got]
        out: dict[str, float] = {}
        for r, (b, wt) in enumerate(got):
            out[f"rank{r}/compute_s"], out[f"rank{r}/wait_s"] = b, wt
            others = statistics.median(busy[:r] + busy[r + 1:])
            slow = others > 0 and b > self.ratio * others
            self.streak[r] = self.streak[r] + 1 if slow else 0
            name = f"rank {r} on {self.where[r]}"
            if self.streak[r] == STREAK and name not in self.named:
                self.named.append(name)
                if self.rt.rank == 0:
                    say(f"straggler at step {step}: {name}: busy {b:.2f}s per interval against the other ranks' "
                        f"median {others:.2f}s (train.straggler_ratio={self.ratio:g}), {STREAK} intervals in a "
                        "row; it is not stopped")
                out["straggler_rank"] = float(r)
        return out


class Clock:
    """Seconds spent inside a collective, for `Stragglers.step`."""

    def __init__(self) -> None:
        self.waited = 0.0

    def __enter__(self) -> "Clock":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.waited += time.perf_counter() - self.t0
