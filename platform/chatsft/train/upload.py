"""Checkpoint uploads that never block a step (train.checkpoint_upload=async).

The local save is synchronous (the engine's shards and each rank's state into a
local folder: the only checkpoint time on the critical path); the copy to the
run's checkpoint folder (s3://, gs://, a shared disk) runs on a thread of each
worker while training goes on. Ray Train's own async upload (`ray.train.report(...,
checkpoint_upload_mode=ASYNC)`) would hand the checkpoint to Ray Train's registry,
which this project keeps out of its checkpoints (runtime.py says why), so the
upload is this module's.

One upload at a time per worker: a save that finds the previous upload still
running waits for it (that wait is checkpoint time on the critical path). A
checkpoint is listed only once whole, by the rule every reader uses
(train/checkpoint.py): each rank's thread, once its files are up, writes
`upload_rank<r>.json` (its files and sizes) into the checkpoint folder; rank 0's
thread waits for every rank's, then writes its own state last, listing every
file. So a resume during an unfinished upload takes the previous whole
checkpoint, and retention (run by rank 0's thread after that) never deletes it
first.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from chatsft import storage
from chatsft.train import checkpoint as ckpt

DONE = "upload_rank{rank}.json"
WAIT_FOR_RANKS_S = 6 * 3600.0  # a rank whose upload never ends has died: its group restarts first


@dataclass
class Upload:
    step: int
    started: float
    ended: float = 0.0
    bytes: int = 0

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Uploader:
    """One worker's background uploads, one at a time."""

    def __init__(self, rank: int, world: int, on_whole: Optional[Callable[[Upload], None]] = None) -> None:
        self.rank, self.world, self.on_whole = rank, world, on_whole
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.done: list[Upload] = []

    def wait(self) -> float:
        """Until the previous upload is done (rank 0: its checkpoint whole); the seconds waited.
        An upload that failed raises here, on the training thread."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload failed: {type(e).__name__}: {e}") from e
        return time.perf_counter() - t0

    def submit(self, local: str, target: str, step: int, record: Optional[dict[str, Any]],
               prune: Callable[[], None]) -> None:
        """Upload the files of `local` (this worker's; removed afterwards) into `target`; rank 0
        passes its state `record`, written last once every rank's files are there."""
        self.wait()
        up = Upload(step, time.time())
        self._thread = threading.Thread(target=self._run, args=(local, target, up, record, prune),
                                        name=f"chatsft-upload-{step}", daemon=True)
        self._thread.start()

    def _run(self, local: str, target: str, up: Upload, record: Optional[dict[str, Any]],
             prune: Callable[[], None]) -> None:
        try:
            mine = ckpt.listing(local)
            up.bytes = sum(mine.values())
            if mine:
                storage.copy_tree(local, target)
            storage.write_text(storage.join(target, DONE.format(rank=self.rank)), json.dumps(mine))
            if self.rank == 0:
                files = self._every_rank(target)
                ckpt.write_record(target, 0, record or {}, files)
                prune()
            up.ended = time.time()
            self.done.append(up)
            if self.rank == 0 and self.on_whole is not None:
                self.on_whole(up)
        except BaseException as e:  # raised on the training thread at the next save or the end
            self._error = e
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def _every_rank(self, target: str) -> dict[str, int]:
        files: dict[str, int] = {}
        deadline = time.time() + WAIT_FOR_RANKS_S
        for r in range(self.world):
            path = storage.join(target, DONE.format(rank=r))
            while (text := storage.read_text(path) if storage.exists(path) else None) is None:
                if time.time() > deadline:
                    raise TimeoutError(f"rank {r} never finished uploading {target}")
                time.sleep(0.2)
            files.update(json.loads(text))
        return files


def wanted(cfg: Any, checkpoint_dir: str) -> bool:
    """Async uploads where a copy is slow: an object store or a shared disk; a plain local folder
    (and --local's) gets the synchronous copy."""
    return cfg.train.checkpoint_upload == "async" and (storage.is_uri(checkpoint_dir) or cfg.run.shared_storage)
