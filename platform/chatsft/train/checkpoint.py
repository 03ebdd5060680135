"""What a checkpoint holds beside the engine's weights and optimizer: where the loop is, and RNG.

Every rank writes `train_state_rank{r}.json` into the checkpoint folder (the
engine writes its own shards next to it); Ray Train merges the folders of all
ranks into one. The step is the number of optimizer steps done, `position`
the rows of the current epoch already consumed, so a resumed run takes the
very next global batch.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from chatsft import storage

STATE = "train_state_rank{rank}.json"
CHECKPOINT_RE = re.compile(r"checkpoint_(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (skipped ones included)
    epoch: int = 0
    position: int = 0  # rows of `epoch` consumed
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_state(folder: str, rank: int, state: TrainState) -> None:
    os.makedirs(folder, exist_ok=True)
    data = {"state": asdict(state), "rng": rng_state()}
    with open(os.path.join(folder, STATE.format(rank=rank)), "w", encoding="utf-8") as f:
        json.dump(data, f)


def read_state(folder: str, rank: int) -> tuple[TrainState, Optional[dict[str, Any]]]:
    """The loop state, and this rank's RNG (None when the checkpoint had fewer ranks).
    `folder` may be a URI."""
    text = storage.read_text(storage.join(folder, STATE.format(rank=rank)))
    if text is None:
        text = storage.read_text(storage.join(folder, STATE.format(rank=0)))
        if text is None:
            raise FileNotFoundError(2, "no train state in the checkpoint", folder)
        return TrainState(**json.loads(text)["state"]), None
    data = json.loads(text)
    return TrainState(**data["state"]), data["rng"]


def read_state_at(folder: str) -> tuple[TrainState, Optional[dict[str, Any]]]:
    return read_state(folder, 0)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def _complete(folders: list[str]) -> list[tuple[int, str]]:
    """(step, folder) of the checkpoint folders whose rank-0 state was written (it is written last)."""
    found = []
    for path in folders:
        m = CHECKPOINT_RE.search(path.rstrip("/"))
        if m and storage.exists(storage.join(path, STATE.format(rank=0))):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(folder: str) -> Optional[str]:
    """The newest complete checkpoint under a run's checkpoint folder (local or URI), or None."""
    found = _complete(storage.list_dirs(folder))
    return found[-1][1] if found else None


def prune(folder: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, path in _complete(storage.list_dirs(folder))[:-keep]:
        storage.remove(path)
