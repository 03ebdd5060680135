"""Where a training worker runs: its rank and world, its checkpoints and its reports (the rows it
reads itself: train/data.py).

The loop (loop.py) talks only to a `WorkerRuntime`, in the shape of Ray Train
v2's TrainContext: `RayRuntime` is a worker of a TorchTrainer; `LocalRuntime`
is this process alone (`chatsft train --local`: debugging, GPU benchmarks), a
one-process gloo/NCCL group so the loop's collectives and DeepSpeed run
unchanged. Nothing in the loop asks which one it has.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Optional, Protocol

from chatsft import storage
from chatsft.train import checkpoint as ckpt


class WorkerRuntime(Protocol):
    rank: int
    world: int
    local_rank: int
    device: Any  # torch.device
    node_id: str

    def latest_checkpoint(self) -> ContextManager[Optional[str]]:
        """A local folder holding the latest checkpoint, for the duration of the `with`, or None."""

    def report(self, metrics: dict[str, Any], checkpoint: Optional[str] = None, name: Optional[str] = None) -> None:
        """Hand metrics (and a finished local checkpoint folder, called `name`) to whoever keeps them.
        Collective: every rank calls it with its own folder."""

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

        c = ray.train.get_context()
        return cls(c.get_world_rank(), c.get_world_size(), c.get_local_rank(), ray.train.torch.get_device(),
                   ray.get_runtime_context().get_node_id())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            yield None
            return
        with found.as_directory() as folder:
            yield folder

    def report(self, metrics: dict[str, Any], checkpoint: Optional[str] = None, name: Optional[str] = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list))}
        ray.train.report(plain, checkpoint=Checkpoint.from_directory(checkpoint) if checkpoint else None,
                         checkpoint_dir_name=name)


# ------------------------------------------------------------------------- local


@dataclass
class LocalRuntime(_Collectives):
    """This process alone. Checkpoints go to the run's checkpoint folder (the one Ray Train
    uses too), published whole and pruned to `keep`."""

    device: Any
    checkpoint_dir: str
    keep: int
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node_id: str = "local"

    @classmethod
    def start(cls, *, use_gpu: bool, checkpoint_dir: str, keep: int) -> "LocalRuntime":
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
        return cls(device, checkpoint_dir, keep)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        found = ckpt.latest(self.checkpoint_dir)
        if found is None or not storage.is_uri(found):
            yield found
            return
        with storage.scratch("chatsft-resume-") as tmp:
            storage.copy_tree(found, tmp)
            yield tmp

    def report(self, metrics: dict[str, Any], checkpoint: Optional[str] = None, name: Optional[str] = None) -> None:
        if checkpoint is None:
            return  # metrics reach the progress log and callbacks already; nobody else listens
        storage.publish_dir(checkpoint, storage.join(self.checkpoint_dir, name or storage.basename(checkpoint)))
        ckpt.prune(self.checkpoint_dir, self.keep)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
