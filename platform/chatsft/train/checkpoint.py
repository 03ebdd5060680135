"""What a checkpoint holds beside the engine's weights and optimizer: where the loop is, and RNG.

Every rank writes `train_state_rank{r}.json` into the checkpoint folder (the
engine writes its own shards next to it); Ray Train merges the folders of all
ranks into one. The step is the number of optimizer steps done, `position`
the rows of the current epoch already consumed, so a resumed run takes the
very next global batch.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

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
    """The loop state, and this rank's RNG (None when the checkpoint had fewer ranks)."""
    path = os.path.join(folder, STATE.format(rank=rank))
    if not os.path.exists(path):
        path = os.path.join(folder, STATE.format(rank=0))
        with open(path, encoding="utf-8") as f:
            return TrainState(**json.load(f)["state"]), None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return TrainState(**data["state"]), data["rng"]


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def latest_local(folder: str) -> Optional[str]:
    """The newest complete checkpoint folder under `folder` (local mode), or None."""
    found = []
    for path in glob.glob(os.path.join(folder, "checkpoint_*")):
        m = CHECKPOINT_RE.search(path)
        if m and os.path.exists(os.path.join(path, STATE.format(rank=0))):
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def prune_local(folder: str, keep: int) -> None:
    found = sorted(p for p in glob.glob(os.path.join(folder, "checkpoint_*")) if CHECKPOINT_RE.search(p))
    for path in found[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def find_latest(output_dir: str, run_name: str) -> Optional[str]:
    """The latest checkpoint of a run, from Ray Train's storage or from --local mode."""
    candidates = []
    for folder in (os.path.join(output_dir, run_name), os.path.join(output_dir, "checkpoints")):
        for path in glob.glob(os.path.join(folder, "checkpoint_*")):
            if os.path.exists(os.path.join(path, STATE.format(rank=0))):
                with open(os.path.join(path, STATE.format(rank=0)), encoding="utf-8") as f:
                    step = json.load(f)["state"]["step"]
                candidates.append((step, os.path.getmtime(path), path))
    return max(candidates)[2] if candidates else None
