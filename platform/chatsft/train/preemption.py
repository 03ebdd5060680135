"""A preemption notice becomes a checkpoint (train.preemption_grace_s).

A cloud's spot interruption reaches Ray as a node drain with a deadline (the
autoscaler's GCS DrainNode call; `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 30` by hand). Ray
Train 2.60 watches drains and waits for the workers in its PreemptingState, but
the training function is not told unless it calls `ray.train.get_preemption_info`,
a barrier through Ray's controller on every call. Here rank 0 polls the GCS for
drains of the group's nodes on a thread, and the notice rides on the collective
every step already does (the step's supervised-token count, loop.one_step), so
every rank learns it at the same step without an extra round trip. After that
step every rank saves a checkpoint and raises `Preempted`; Ray Train restarts the
group from that checkpoint on the nodes left (or a replacement), elastic as
after any lost node. Only a step begun and not finished is lost.

Each saved checkpoint's duration (the slowest rank's) is compared with the grace:
a grace shorter than a checkpoint would let the deadline cut the save short, so
the run stops there (after a whole checkpoint) naming the key.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from chatsft.errors import UserError
from chatsft.train.progress import say

POLL_S = 1.0  # a notice gives 30 s or more: a second's delay is cheap, and one GCS call a second is


class Preempted(RuntimeError):
    """Raised by every rank after its checkpoint on a preemption notice: Ray Train restarts the group."""


@dataclass
class Notice:
    """What a drain told the workers, and what they did about it."""

    node_id: str  # the drained node (the first, when several)
    host: str
    reason: str
    deadline: float  # epoch seconds; 0: the drain has no deadline
    seen_at: float  # when rank 0 saw it
    step: int = 0  # the step saved
    saved_at: float = 0.0  # when that checkpoint was whole

    @property
    def spare_s(self) -> Optional[float]:
        """Seconds left before the deadline once the checkpoint was whole (None: no deadline)."""
        return round(self.deadline - self.saved_at, 2) if self.deadline else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "spare_s": self.spare_s}


def draining_nodes() -> dict[str, int]:
    """{node id hex: drain deadline in epoch ms (0: none)} of the cluster, from the GCS: the source
    Ray Train's own PreemptionWatcher reads."""
    import ray._private.state

    return dict(ray._private.state.state.get_draining_nodes() or {})


class Watch:
    """Rank 0's poller of the GCS drain state for the group's nodes (a daemon thread)."""

    def __init__(self, nodes: dict[str, str], interval: float = POLL_S) -> None:
        self.nodes = nodes  # node id -> host of the group's ranks
        self.interval = interval
        self.notice: Optional[Notice] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chatsft-drain-watch", daemon=True)

    def start(self) -> "Watch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set() and self.notice is None:
            try:
                drained = {n: d for n, d in draining_nodes().items() if n in self.nodes}
            except Exception as e:  # a GCS hiccup: the next poll tries again
                say(f"preemption watch: could not read the drain state ({type(e).__name__}: {e})")
                drained = {}
            if drained:
                node = min(drained, key=lambda n: drained[n] or float("inf"))
                deadline = drained[node] / 1000.0
                self.notice = Notice(node, self.nodes[node], _drain_reason(deadline), deadline, time.time())
                left = f"deadline in {deadline - time.time():.1f}s" if deadline else "no deadline"
                say(f"preemption notice: node {self.nodes[node]} ({node[:8]}) is drained, "
                    f"{left}: checkpoint at the next step boundary")
            self._stop.wait(self.interval)


def _drain_reason(deadline: float) -> str:
    # The GCS tells a live node's drain deadline, not the reason its caller gave: a deadline is
    # what a spot interruption (DRAIN_NODE_REASON_PREEMPTION) carries, an idle termination has none.
    return "drain with a deadline (preemption)" if deadline else "drain without a deadline"


class Preemption:
    """One worker's side: the flag it adds to the step's collective, and the agreement it reads back."""

    def __init__(self, rank: int, grace_s: float, watch: Optional[Watch]) -> None:
        self.rank, self.grace_s, self.watch = rank, grace_s, watch
        self.agreed_deadline: Optional[float] = None  # set on every rank at the same step

    @classmethod
    def start(cls, rt: Any, grace_s: float) -> "Preemption":
        """Watching needs a Ray worker group (--local has no nodes to drain) and grace_s > 0. The
        ranks tell each other their nodes (a collective): rank 0 watches them all."""
        if grace_s <= 0 or rt.node_id == "local":
            return cls(rt.rank, grace_s, None)
        nodes = dict(x.split(" ", 1) for x in rt.gather(f"{rt.node_id} {socket.gethostname()}"))
        return cls(rt.rank, grace_s, Watch(nodes).start() if rt.rank == 0 else None)

    @property
    def watching(self) -> bool:
        return self.grace_s > 0

    def flag(self) -> float:
        """This rank's share of the step's all-reduce: rank 0 adds the notice's deadline in epoch
        ms + 1 (so a drain without a deadline still counts), the others 0."""
        notice = self.watch.notice if self.watch is not None else None
        return notice.deadline * 1000.0 + 1.0 if notice is not None else 0.0

    def agree(self, summed: float) -> None:
        if summed > 0 and self.agreed_deadline is None:
            self.agreed_deadline = (summed - 1.0) / 1000.0

    @property
    def due(self) -> bool:
        return self.agreed_deadline is not None

    def check_grace(self, rt: Any, seconds: float) -> None:
        """After a checkpoint: refuse a grace shorter than the slowest rank's save (collective)."""
        if not self.watching or rt.node_id == "local":
            return
        slowest = max(float(x) for x in rt.gather(f"{seconds:.3f}"))
        if rt.rank == 0:
            say(f"checkpoint took {slowest:.1f}s (train.preemption_grace_s={self.grace_s:g})")
        if slowest > self.grace_s:
            raise UserError(f"train.preemption_grace_s={self.grace_s:g}: a checkpoint of this run takes "
                            f"{slowest:.1f}s, longer than the time kept for it before a drain deadline; set it "
                            f"to at least {slowest * 1.5:.0f} (the run stopped after a whole checkpoint and "
                            "resumes from it)")

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()

    def notice(self) -> Optional[Notice]:
        return self.watch.notice if self.watch is not None else None
