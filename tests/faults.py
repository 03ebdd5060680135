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


class ParkOnce:
    """Every rank stops right after optimizer step `step` and waits there (at most `seconds`)
    for its worker group to be torn down: the test takes a node away meanwhile. Each rank of a
    group of `world` workers (None: any) leaves `parked-rank<k>.json` (world size, node id) in
    `folder`; a smaller group waits unannounced for Ray Train to grow it. Once the test has
    written `folder/released`, a restarted group passes the step."""

    def __init__(self, step: int, folder: str, world=None, seconds: float = 300.0) -> None:
        self.step, self.folder, self.world, self.seconds = step, str(folder), world, seconds

    def __call__(self, step: int, runtime) -> None:
        import json
        import time

        if step != self.step or os.path.exists(os.path.join(self.folder, "released")):
            return
        if self.world is None or runtime.world == self.world:
            with open(os.path.join(self.folder, f"parked-rank{runtime.rank}.json"), "w") as f:
                json.dump({"world": runtime.world, "node_id": runtime.node_id}, f)
        deadline = time.time() + self.seconds
        while time.time() < deadline:
            time.sleep(0.2)
        raise RuntimeError(f"[test] parked after step {step} for {self.seconds}s: the group was never torn down")


class Pace:
    """Not a fault: every rank of `ranks` (None: all) sleeps `seconds` after each optimizer step,
    so a test can act in mid-run (an even pace) or make one rank a straggler (a single rank); each
    rank leaves its node id in `folder/rank<r>.json` once."""

    def __init__(self, seconds: float, folder: str, ranks=None) -> None:
        self.seconds, self.folder, self.ranks = seconds, str(folder), ranks

    def __call__(self, step: int, runtime) -> None:
        import json
        import time

        where = os.path.join(self.folder, f"rank{runtime.rank}.json")
        if not os.path.exists(where):
            with open(where, "w") as f:
                json.dump({"node_id": runtime.node_id, "world": runtime.world}, f)
        if self.ranks is None or runtime.rank in self.ranks:
            time.sleep(self.seconds)


class StepLog:
    """Not a fault: rank 0 appends each optimizer step it runs to `path`, one a line, so a test
    sees which steps a run trained (and so which checkpoint its workers resumed from)."""

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def __call__(self, step: int, runtime) -> None:
        if runtime.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{step}\n")

    def steps(self) -> list[int]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [int(line) for line in f if line.strip()]


def _ship_by_value() -> None:
    # Ray workers may not have the tests folder on their path: send these classes by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_ship_by_value()
