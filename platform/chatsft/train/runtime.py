"""Where a training worker runs: its rank and world, its collectives and its reports (the rows
it reads itself: train/data.py; its checkpoints it writes itself into the run's folder:
loop.save, train/checkpoint.py).

The loop (loop.py) talks only to a `WorkerRuntime`, in the shape of Ray Train
v2's TrainContext: `RayRuntime` is a worker of a TorchTrainer; `LocalRuntime`
is this process alone (`chatsft train --local`: debugging, GPU benchmarks), a
one-process gloo/NCCL group so the loop's collectives and DeepSpeed run
unchanged. Nothing in the loop asks which one it has.

Checkpoints are not the runtime's: both write them into the run's checkpoint
folder the same way and resume the newest whole one found there, so a Ray run
resumes what a `--local` run saved and the other way round. Ray Train gets
metrics only; its own checkpoint registry (and its retention, num_to_keep)
would know only the checkpoints its workers reported.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol


class WorkerRuntime(Protocol):
    rank: int
    world: int
    local_rank: int
    device: Any  # torch.device
    node_id: str

    def report(self, metrics: dict[str, Any]) -> None:
        """Hand metrics to whoever keeps them. Collective: every rank calls it."""

    def all_reduce(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""

    def gather(self, value: str) -> list[str]:
        """Every rank's `value`, in rank order."""

    def barrier(self) -> None:
        ...


class _Collectives:
    """torch.distributed collectives shared by both runtimes (the process group exists in both)."""

    world: int
    device: Any

    def all_reduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, value: str) -> list[str]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# --------------------------------------------------------------------------- ray


@dataclass
class RayRuntime(_Collectives):
    rank: int
    world: int
    local_rank: int
    device: Any
    node_id: str

    @classmethod
    def start(cls) -> "RayRuntime":
        """The runtime of the current Ray Train worker (its process group is up already)."""
        import ray
        import ray.train
        import ray.train.torch

        from chatsft.console import quiet_worker

        c = ray.train.get_context()
        device = ray.train.torch.get_device()
        quiet_worker(use_gpu=device.type == "cuda")
        return cls(c.get_world_rank(), c.get_world_size(), c.get_local_rank(), device,
                   ray.get_runtime_context().get_node_id())

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list))})


# ------------------------------------------------------------------------- local


@dataclass
class LocalRuntime(_Collectives):
    """This process alone."""

    device: Any
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node_id: str = "local"

    @classmethod
    def start(cls, *, use_gpu: bool) -> "LocalRuntime":
        import torch
        import torch.distributed as dist

        gpu = use_gpu and torch.cuda.is_available()
        device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        if gpu:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # A one-process group, so the loop's collectives and DeepSpeed run unchanged. It is
            # kept afterwards: DeepSpeed caches it, and a second run in this process reuses it.
            port = _free_port()
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                               "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
            dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                    rank=0, world_size=1)
        return cls(device)

    def report(self, metrics: dict[str, Any]) -> None:
        pass  # metrics reach the progress log and callbacks already; nobody else listens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
