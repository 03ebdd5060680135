"""The row cache in a bucket (moto's S3 server) on a two-node Ray cluster: one entry per content
fingerprint, shared by runs that differ in what does not shape rows, published whole or not at all.

One cluster and one server for every assertion (each would cost a cluster start):
- two runs with other learning rates and output folders share one entry: the second prepares
  nothing and its log says so;
- a touched file (the same bytes uploaded again) reuses the entry and the run's checkpoint still
  resumes; one changed byte makes a new entry, and the resume check refuses naming the file;
- two `chatsft prepare` of one fingerprint started together leave one whole entry;
- a prepare killed as it was about to write its manifest leaves no entry a run would take, and
  the next prepare of that fingerprint prepares it;
- `chatsft cache prune` keeps every entry a live job holds a lease on.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chatsft import storage
from tests.clusterkit import TwoNodes
from tests.e2e.test_s3 import BUCKET, s3  # noqa: F401  (the moto server fixture)
from tests.ray.trainkit import tiny_cfg

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "platform" / "chatsft" / "samples"

# A prepare that dies (SIGKILL, nothing runs after it) the moment it would write a manifest: every
# part and report is written by then, the entry is not published.
KILL_AT_MANIFEST = """
import os, signal, sys
from chatsft import cli, storage
write = storage.write_text
def write_text(path, text):
    if path.endswith("/manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, text)
storage.write_text = write_text
sys.exit(cli.main(sys.argv[1:]))
"""


def _fp(cfg):
    from chatsft.pipeline.fingerprint import fingerprint
    from chatsft.pipeline.run import check_prepare
    from chatsft.plan import RunPlan

    return fingerprint(check_prepare(RunPlan.resolve(cfg)).identity)


def _prepare_proc(cfg, path: Path, *, kill_at_manifest: bool = False) -> subprocess.Popen:
    path.write_text(cfg.to_yaml())
    args = ["-c", KILL_AT_MANIFEST] if kill_at_manifest else ["-m", "chatsft.cli"]
    return subprocess.Popen([sys.executable, *args, "prepare", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_row_cache_in_a_bucket(s3, tmp_path, monkeypatch, request, capsys):  # noqa: F811
    import ray

    from chatsft.errors import UserError
    from chatsft.pipeline import cache, prepare
    from chatsft.pipeline.run import check_prepare
    from chatsft.plan import RunPlan
    from chatsft.train.driver import train
    from chatsft.train.resume import check_resume

    bucket, root = f"s3://{BUCKET}", f"s3://{BUCKET}/cache"
    text = "".join((SAMPLES / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:40])
    storage.write_text(f"{bucket}/records/train.jsonl", text)
    base = [f"data.train={bucket}/records/train.jsonl", "data.eval_fraction=0.1", f"data.cache={root}",
            "eval.tasks=[]", "train.max_steps=1"]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cluster = TwoNodes(tmp_path / "ray", env).start()
    request.addfinalizer(cluster.stop)
    ray.shutdown()  # an earlier test may have left a Ray running
    monkeypatch.setenv("RAY_ADDRESS", cluster.gcs)
    try:
        # 1. two runs, other lr and output folder: one entry, the second prepares nothing
        cfg_a = tiny_cfg(tmp_path, *base, "train.lr=1e-3", f"run.output_dir={bucket}/a")
        train(cfg_a, local=True)
        first = capsys.readouterr().out
        assert "is not in the cache" in first and "rendered in" in first and "published" in first, first[-2000:]
        train(tiny_cfg(tmp_path, *base, "train.lr=3e-4", f"run.output_dir={bucket}/b"), local=True)
        second = capsys.readouterr().out
        assert "cache hit" in second and "nothing to prepare" in second, second[-2000:]
        assert "rendered in" not in second and "preparing" not in second
        fp = _fp(cfg_a)
        assert [e.fingerprint for e in cache.entries(root)] == [fp]
        assert not storage.exists(f"{bucket}/b/data/train")  # the rows are the cache's, not the run's
        plan_a = RunPlan.resolve(cfg_a, local=True)

        # 2. the same bytes uploaded again (a new modification time): the entry, and a resume
        storage.write_text(f"{bucket}/records/train.jsonl", text)
        assert _fp(cfg_a) == fp
        assert check_resume(plan_a, check_prepare(plan_a).identity).checkpoint is not None
        prepare(RunPlan.resolve(cfg_a))
        assert "cache hit" in capsys.readouterr().out
        # one byte changed: another entry, and the checkpoint's run is refused naming the file
        at = text.index('"content": "') + len('"content": "')  # a byte of the first message's text
        storage.write_text(f"{bucket}/records/train.jsonl", text[:at] + chr(ord(text[at]) ^ 1) + text[at + 1:])
        with pytest.raises(UserError, match=r"records/train.jsonl: its content changed"):
            check_resume(plan_a, check_prepare(plan_a).identity)
        prepare(RunPlan.resolve(cfg_a))
        assert "is not in the cache" in capsys.readouterr().out
        assert len(cache.entries(root)) == 2

        # 3. two prepares of one fingerprint at once, and 4. one killed at its manifest
        together = tiny_cfg(tmp_path, *base, "run.seed=7")
        killed = tiny_cfg(tmp_path, *base, "run.seed=8")
        procs = [_prepare_proc(together, tmp_path / f"p{i}.yaml") for i in range(2)]
        victim = _prepare_proc(killed, tmp_path / "killed.yaml", kill_at_manifest=True)
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
        victim.communicate(timeout=600)
        assert victim.returncode == -signal.SIGKILL
        fp7, fp8 = _fp(together), _fp(killed)
        entry = cache.lookup(root, fp7)
        assert entry is not None and set(entry.manifest["files"]) >= {"train/stats.json", "train/part-00000.parquet"}
        assert sum("published" in o for o in outs) >= 1
        assert cache.lookup(root, fp8) is None  # no entry a run would take ...
        partial = {e.fingerprint: e for e in cache.entries(root)}[fp8]
        assert not partial.published and partial.leases == 1  # ... though its parts were written
        assert storage.list_files(storage.join(root, fp8), suffix=".parquet", recursive=True)
        prepare(RunPlan.resolve(killed))
        assert "is not in the cache" in capsys.readouterr().out and cache.lookup(root, fp8) is not None

        # 5. prune: nothing this process (a live job) reads; the rest once its leases are given up
        removed, in_use = cache.prune(root, 0)
        assert removed == [fp7] and set(in_use) == {fp, _fp(cfg_a), fp8}
        cache.LEASES_HELD.release_all()
        removed, in_use = cache.prune(root, 0)  # the killed prepare's lease holds until it goes stale
        assert set(removed) == {fp, _fp(cfg_a)} and in_use == [fp8]
        assert [e.fingerprint for e in cache.entries(root)] == [fp8]
    finally:
        ray.shutdown()
        cluster.stop()
        monkeypatch.delenv("RAY_ADDRESS")
