"""The row cache: prepared rows kept under their content fingerprint in a bucket or shared folder.

    <data.cache>/<fingerprint>/
        manifest.json              written last: the entry exists once it does (names its attempt)
        attempt-<time>-<id>/       one prepare's rows: train/, eval/ (parts, stats.json, previews)
        leases/<job>.json          one a job reading (or writing) the entry: its heartbeat time
        used                       the time of the entry's last use

Publishing: a prepare writes its rows into a new attempt folder of its own, then
the manifest in one atomic write (a rename on a disk, one PUT on an object
store), listing every file with its size. A reader takes an entry only when
the manifest is there and every file it lists is there at that size, so a
prepare killed before its manifest leaves nothing a run would take. Two
prepares of one fingerprint at once each write their own attempt; the first
manifest stays (a second prepare that finds one on publishing drops its own
attempt and uses the published one); since rows are a pure function of the
fingerprint, both attempts hold the same bytes anyway.

Leases: a job that reads an entry (a run, an eval) or writes one (a prepare)
holds a small file with a heartbeat time, refreshed by a thread while the
process lives and removed when it ends. `prune` never removes an entry with a
lease whose heartbeat is younger than LEASE_TTL_S (a killed job's lease goes
stale, and then no longer protects anything).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from chatsft import storage

MANIFEST = "manifest.json"
USED = "used"
LEASES = "leases"
LEASE_BEAT_S = 30.0  # how often a live job refreshes its lease
LEASE_TTL_S = 300.0  # a lease not refreshed for this long belongs to a job that is gone


@dataclass(frozen=True)
class Entry:
    """A published entry: its fingerprint, its attempt folder and its manifest."""

    root: str  # data.cache
    fingerprint: str
    folder: str  # the attempt folder: train/ and eval/ are under it
    manifest: dict


@dataclass(frozen=True)
class EntryInfo:
    """One line of `chatsft cache list`."""

    fingerprint: str
    published: bool
    bytes: int
    records: int
    tokens: int
    last_use: float
    leases: int  # live leases (jobs reading or writing it now)


def entry_dir(root: str, fp: str) -> str:
    return storage.join(root, fp)


def lookup(root: str, fp: str) -> Optional[Entry]:
    """The published, whole entry of `fp`, or None (absent, or a manifest whose files are not all
    there at their sizes: never taken)."""
    folder = entry_dir(root, fp)
    manifest = storage.read_json(storage.join(folder, MANIFEST))
    if manifest is None or manifest.get("fingerprint") != fp:
        return None
    attempt = storage.join(folder, manifest["attempt"])
    have = {storage.relative(attempt, f.path): f.size for f in storage.list_files(attempt, recursive=True)}
    if any(have.get(name) != size for name, size in manifest["files"].items()):
        return None
    return Entry(root, fp, attempt, manifest)


def new_attempt(root: str, fp: str) -> str:
    """A fresh folder of its own for one prepare's rows of `fp`."""
    name = f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    return storage.join(entry_dir(root, fp), name)


def publish(root: str, fp: str, attempt: str, summary: dict) -> Entry:
    """Make the rows in `attempt` the entry of `fp` (the manifest, written last), or, when
    another prepare published first, drop `attempt` and return that entry."""
    folder = entry_dir(root, fp)
    found = lookup(root, fp)
    if found is None:
        files = {storage.relative(attempt, f.path): f.size for f in storage.list_files(attempt, recursive=True)}
        manifest = {"fingerprint": fp, "attempt": storage.basename(attempt), "files": files,
                    "published": time.time(), **summary}
        storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2) + "\n")
        found = lookup(root, fp)  # the manifest that stands: a prepare beside us may have written its own
    if found is None:
        raise RuntimeError(f"{folder}: the manifest just written does not describe a whole entry")
    if found.folder != attempt:
        storage.remove(attempt)
    touch(root, fp)
    return found


def touch(root: str, fp: str) -> None:
    """Record a use of the entry (`cache list` shows the last one)."""
    storage.write_text(storage.join(entry_dir(root, fp), USED), f"{time.time()}\n")


# ------------------------------------------------------------------------ leases


class _Leases:
    """The leases this process holds, refreshed by one daemon thread and removed at exit."""

    def __init__(self) -> None:
        self.held: dict[str, float] = {}  # lease file -> when taken
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        self.job = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def take(self, root: str, fp: str, role: str) -> str:
        path = storage.join(entry_dir(root, fp), LEASES, f"{self.job}-{role}.json")
        with self.lock:
            self.held.setdefault(path, time.time())
        self._beat(path)
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="chatsft-cache-lease", daemon=True)
            self.thread.start()
            atexit.register(self.release_all)
        return path

    def _beat(self, path: str) -> None:
        with self.lock:
            since = self.held.get(path)
        if since is not None:
            storage.write_text(path, json.dumps({"job": self.job, "since": since, "heartbeat": time.time()}) + "\n")

    def _loop(self) -> None:
        while True:
            time.sleep(LEASE_BEAT_S)
            with self.lock:
                paths = list(self.held)
            for path in paths:
                try:
                    self._beat(path)
                except Exception:  # a store that blips: the next beat retries, the TTL allows several
                    pass

    def release(self, path: str) -> None:
        with self.lock:
            self.held.pop(path, None)
        storage.remove(path)

    def release_all(self) -> None:
        with self.lock:
            paths = list(self.held)
        for path in paths:
            try:
                self.release(path)
            except Exception:  # at exit: a stale lease expires by itself
                pass


LEASES_HELD = _Leases()


def lease(root: str, fp: str, role: str = "read") -> str:
    """Hold a lease on entry `fp` for as long as this process runs (or until `release`)."""
    return LEASES_HELD.take(root, fp, role)


def release(path: str) -> None:
    LEASES_HELD.release(path)


def live_leases(root: str, fp: str, now: Optional[float] = None) -> list[dict]:
    now = time.time() if now is None else now
    out = []
    for f in storage.list_files(storage.join(entry_dir(root, fp), LEASES), suffix=".json"):
        d = storage.read_json(f.path)
        if d is not None and now - float(d.get("heartbeat", 0)) < LEASE_TTL_S:
            out.append(d)
    return out


# ------------------------------------------------------------------- list, prune


def entries(root: str) -> list[EntryInfo]:
    """Every fingerprint folder of the cache, published or not (a prepare under way, or one
    killed before its manifest), newest use first."""
    out = []
    for folder in storage.list_dirs(root):
        fp = storage.basename(folder)
        found = lookup(root, fp)
        files = storage.list_files(folder, recursive=True)
        used = _read_json_number(storage.join(folder, USED))
        leases = live_leases(root, fp)
        last = max([used or 0.0, *[float(d["heartbeat"]) for d in leases],
                    *[f.mtime_ns / 1e9 for f in files if f.path.endswith(MANIFEST)]])
        m = found.manifest if found else {}
        out.append(EntryInfo(fp, found is not None, sum(f.size for f in files), int(m.get("records", 0)),
                             int(m.get("tokens", 0)), last, len(leases)))
    return sorted(out, key=lambda e: -e.last_use)


def _read_json_number(path: str) -> Optional[float]:
    text = storage.read_text(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def prune(root: str, unused_for_s: float) -> tuple[list[str], list[str]]:
    """Remove every entry (published or a dead prepare's leftovers) not used for `unused_for_s`
    seconds and without a live lease, and the unnamed attempts of the published entries it keeps
    (two prepares that published at the same instant); returns (removed, kept because in use)."""
    removed, in_use = [], []
    now = time.time()
    for e in entries(root):
        if e.leases:
            in_use.append(e.fingerprint)
            continue
        if now - e.last_use >= unused_for_s:
            storage.remove(entry_dir(root, e.fingerprint))
            removed.append(e.fingerprint)
        elif e.published:  # kept: drop the attempts of prepares that lost the race to publish it
            named = lookup(root, e.fingerprint)
            for folder in storage.list_dirs(entry_dir(root, e.fingerprint)):
                name = storage.basename(folder)
                if named is not None and name.startswith("attempt-") and folder != named.folder:
                    storage.remove(folder)
    return removed, in_use
