"""The row cache's publishing rules on a local folder (no Ray): an entry is whole or absent, the
first manifest stands, leases keep an entry from `prune` until they are given up or go stale."""

import json
import time

from chatsft import storage
from chatsft.pipeline import cache


def _attempt(root, fp, rows=b"rows"):
    folder = cache.new_attempt(root, fp)
    storage.write_bytes(storage.join(folder, "train", "part-00000.parquet"), rows)
    storage.write_text(storage.join(folder, "train", "stats.json"), "{}\n")
    return folder


def test_publish_lookup_and_prune(tmp_path):
    root, fp = str(tmp_path / "cache"), "f" * 64
    first = _attempt(root, fp)
    assert cache.lookup(root, fp) is None  # parts written, no manifest: nothing to take
    assert [(e.fingerprint, e.published) for e in cache.entries(root)] == [(fp, False)]
    entry = cache.publish(root, fp, first, {"records": 3, "tokens": 30})
    assert entry.folder == first and cache.lookup(root, fp).manifest["records"] == 3
    # a second prepare of the same fingerprint publishing later: the first manifest stands
    second = _attempt(root, fp)
    assert cache.publish(root, fp, second, {"records": 3, "tokens": 30}).folder == first
    assert not storage.exists(second)
    # a file cut short after publishing: the entry is no longer whole, so never taken
    storage.write_bytes(storage.join(first, "train", "part-00000.parquet"), b"ro")
    assert cache.lookup(root, fp) is None
    storage.write_bytes(storage.join(first, "train", "part-00000.parquet"), b"rows")
    # leases: a live one protects the entry, a released or stale one does not
    lease = cache.lease(root, fp)
    assert cache.prune(root, 0) == ([], [fp])
    cache.release(lease)
    stale = storage.join(cache.entry_dir(root, fp), cache.LEASES, "gone.json")
    storage.write_text(stale, json.dumps({"job": "gone", "heartbeat": time.time() - cache.LEASE_TTL_S - 1}))
    info = cache.entries(root)[0]
    assert (info.published, info.records, info.tokens, info.leases) == (True, 3, 30, 0) and info.bytes > 0
    assert cache.prune(root, 3600) == ([], [])  # used just now
    assert cache.prune(root, 0) == ([fp], []) and cache.entries(root) == []
