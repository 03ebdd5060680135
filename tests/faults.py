"""Faults for training tests, injected through the loop's per-step hooks (WorkerArgs.hooks):
the production loop has no test seam of its own."""

from __future__ import annotations

import os
import sys


class ExitOnce:
    """The worker of rank `rank` dies (os._exit) right after optimizer step `step`, once: the
    marker file it leaves tells the restarted worker group to go on."""

    def __init__(self, step: int, marker: str, rank: int = 0) -> None:
        self.step, self.marker, self.rank = step, str(marker), rank

    def __call__(self, step: int, runtime) -> None:
        if step == self.step and runtime.rank == self.rank and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(f"rank {runtime.rank} exited after step {step}\n")
            sys.stdout.write("[test] worker exits on purpose\n")
            sys.stdout.flush()
            os._exit(1)


class StopAt:
    """Every worker raises right after optimizer step `step`: the run fails there (a lost node, a
    preempted job) and leaves its checkpoints for a restart."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, step: int, runtime) -> None:
        if step == self.step:
            raise RuntimeError(f"[test] stopped after step {step} on purpose")


class HangOnce:
    """The worker of rank `rank` stops making progress after optimizer step `step` (it sleeps
    for `seconds`), once: the marker file it leaves lets the restarted worker group go on."""

    def __init__(self, step: int, marker: str, rank: int = 1, seconds: float = 600.0) -> None:
        self.step, self.marker, self.rank, self.seconds = step, str(marker), rank, seconds

    def __call__(self, step: int, runtime) -> None:
        import time

        if step == self.step and runtime.rank == self.rank and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(f"rank {runtime.rank} hung after step {step}\n")
            time.sleep(self.seconds)


def _ship_by_value() -> None:
    # Ray workers may not have the tests folder on their path: send these classes by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_ship_by_value()
