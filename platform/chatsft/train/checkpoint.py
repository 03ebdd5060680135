"""What a checkpoint holds beside the engine's weights and optimizer: where the loop is, and RNG.

Every rank writes its engine shards and `train_state_rank{r}.json` into the
checkpoint folder of the run (the same folder whichever of Ray Train or
`--local` runs the loop); rank 0 writes its state last, once all ranks' files
are there, listing every file with its size. A checkpoint is whole when that
state is there and the files are as it lists them; `latest` (what every run
resumes) and `prune` (retention) see only whole ones. The step is the number of
optimizer steps done, `position` the rows of the current epoch already
consumed, so a resumed run takes the very next global batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from chatsft import storage
from chatsft.errors import MissingFile

STATE = "train_state_rank{rank}.json"
CHECKPOINT_RE = re.compile(r"checkpoint_(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (skipped ones included)
    epoch: int = 0
    position: int = 0  # rows of `epoch` consumed
    world_size: int = 1
    engine: str = ""  # train.engine that wrote it ("": a chatsft before the engines were recorded)
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


def write_state(folder: str, rank: int, state: TrainState, files: Optional[dict[str, int]] = None) -> None:
    """This rank's loop state and RNG into `folder` (a local path or URI). Rank 0's is written
    last, once every rank's files are in place, with `files` (each file's size): its presence
    says the checkpoint is complete, the sizes let a reader tell a file cut short."""
    write_record(folder, rank, state_record(state), files)


def state_record(state: TrainState) -> dict[str, Any]:
    """The loop state and this process's RNG now (a background upload writes it later)."""
    return {"state": asdict(state), "rng": rng_state()}


def write_record(folder: str, rank: int, record: dict[str, Any], files: Optional[dict[str, int]] = None) -> None:
    data = dict(record)
    if files is not None:
        data["files"] = files
    storage.write_text(storage.join(folder, STATE.format(rank=rank)), json.dumps(data))


def read_state(folder: str, rank: int) -> tuple[TrainState, Optional[dict[str, Any]]]:
    """The loop state, and this rank's RNG (None when the checkpoint had fewer ranks).
    `folder` may be a URI."""
    text = storage.read_text(storage.join(folder, STATE.format(rank=rank)))
    if text is None:
        text = storage.read_text(storage.join(folder, STATE.format(rank=0)))
        if text is None:
            raise MissingFile(folder, "no train state in the checkpoint")
        return TrainState(**json.loads(text)["state"]), None
    data = json.loads(text)
    return TrainState(**data["state"]), data["rng"]


def read_state_at(folder: str) -> tuple[TrainState, Optional[dict[str, Any]]]:
    return read_state(folder, 0)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def listing(folder: str) -> dict[str, int]:
    """Every file under `folder` (local or URI): its path relative to the folder -> its size."""
    root = folder.rstrip("/") + "/"
    return {f.path[len(root):] if f.path.startswith(root) else os.path.relpath(f.path, folder): f.size
            for f in storage.list_files(folder, recursive=True)}


# ------------------------------------------------------------- which checkpoints are whole


@dataclass(frozen=True)
class Found:
    """A checkpoint folder of a run: its step, where it is, and what is wrong with it (None: whole)."""

    step: int
    path: str
    problem: Optional[str] = None


def problem_of(folder: str) -> Optional[str]:
    """Why the checkpoint in `folder` cannot be resumed, or None when it is whole: its rank-0 state
    (written last) must be there, every file it lists at its size, every JSON readable and every
    torch file's zip directory intact (a file cut short or overwritten loses it). Reads the state
    and the tail of each torch file, never the weights."""
    text = storage.read_text(storage.join(folder, STATE.format(rank=0)))
    if text is None:
        return f"partial: no {STATE.format(rank=0)} (its save was cut off before it completed)"
    try:
        listed = json.loads(text).get("files")
    except ValueError:
        return f"corrupt: {STATE.format(rank=0)} is not valid JSON"
    have = listing(folder)
    for name, size in sorted((listed or {}).items()):
        if name not in have:
            return f"partial: {name} is missing"
        if have[name] != size:
            return f"partial: {name} has {have[name]} of its {size} bytes"
    for name in sorted(have):
        path = storage.join(folder, name)
        if name.endswith(".json"):
            try:
                json.loads(storage.read_text(path) or "")
            except ValueError:
                return f"corrupt: {name} is not valid JSON"
        elif name.endswith(".pt") and not _zip_intact(path):
            return f"corrupt: {name} is not a readable torch file"
    return None


def _zip_intact(path: str) -> bool:
    """torch.save writes a zip archive: its central directory, at the end, names every record."""
    import zipfile

    try:
        with storage.open_input(path) as fh, zipfile.ZipFile(fh) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def scan(folder: str) -> list[Found]:
    """Every checkpoint folder under a run's checkpoint folder (local or URI), oldest first, each
    with its problem (None: whole)."""
    found = []
    for path in storage.list_dirs(folder):
        m = CHECKPOINT_RE.search(path.rstrip("/"))
        if m:
            found.append(Found(int(m.group(1)), path, problem_of(path)))
    return sorted(found, key=lambda f: f.step)


def usable(folder: str) -> tuple[Optional[str], list[Found]]:
    """The newest whole checkpoint (None if there is none), and the broken ones newer than it
    (partial or corrupt), which a resume skips and names."""
    found = scan(folder)
    whole = [f for f in found if f.problem is None]
    newest = whole[-1] if whole else None
    skipped = [f for f in found if f.problem is not None and (newest is None or f.step > newest.step)]
    return (newest.path if newest else None), skipped


def latest(folder: str) -> Optional[str]:
    """The newest whole checkpoint under a run's checkpoint folder (local or URI), or None: the one
    a run resumes, whichever of Ray Train's workers or --local wrote it."""
    return usable(folder)[0]


def prune(folder: str, keep: int) -> None:
    """Retention: delete the whole checkpoints older than the newest `keep` whole ones (0 keeps
    all). A partial or corrupt folder is neither counted nor deleted, so it never takes the place
    of the last good checkpoint."""
    if keep <= 0:
        return
    whole = [f for f in scan(folder) if f.problem is None]
    for f in whole[:-keep]:
        storage.remove(f.path)


@contextlib.contextmanager
def local_copy(folder: str) -> Iterator[str]:
    """The checkpoint as a local folder for the duration (a URI's files copied to scratch first)."""
    if not storage.is_uri(folder):
        yield folder
        return
    with storage.scratch("chatsft-resume-") as tmp:
        storage.copy_tree(folder, tmp)
        yield tmp
