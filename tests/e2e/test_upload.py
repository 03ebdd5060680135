"""Checkpoint uploads that never block a step (train/upload.py), to a slow object store: moto's
S3 server behind a proxy that passes uploads at 2 MB/s (benchmarks/slow_s3.py, its own process).

A --local run of 90 steps saves every 30 steps (15 MB each) to s3:// at 2 MB/s. Checked: each
upload ran while later steps trained, and those steps took no longer than the steps without an
upload (median, within 1.1x; the steps that saved are left out of both); a step into the upload
of checkpoint 60, that checkpoint is not yet whole and the checkpoint a resume takes is 30; at the end every
checkpoint is whole (the last upload is waited for) and the upload times are in result.json."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatsft.train import checkpoint as ckpt
from chatsft.train.driver import Extras
from tests.ray.trainkit import rows_for, tiny_cfg, train_rows

pytestmark = pytest.mark.slow
BUCKET = "chatsft-slow"
REPO = Path(__file__).resolve().parents[2]
RATE = 2_000_000  # bytes per second, every upload connection together


@pytest.fixture
def slow_s3(monkeypatch):
    """The throttled S3 (its own process); AWS_* point at the proxy, the bucket made directly."""
    import boto3

    # niced: the object store is another machine, its CPU not the trainer's (here they share 2 cores)
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(REPO / "benchmarks" / "slow_s3.py"), str(RATE)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        _, moto_port, proxy_port = proc.stdout.readline().split()
        env = {"AWS_ACCESS_KEY_ID": "chatsft", "AWS_SECRET_ACCESS_KEY": "chatsft-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        proc.kill()
        proc.wait()


PROBE = """
import json, os, sys, time
from chatsft.train import checkpoint as c
folder, uploading, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.05)
print(json.dumps([c.latest(folder), c.problem_of(folder + "/" + c.checkpoint_name(uploading))]))
"""


class Probe:
    """Rank 0 (--local: this process) notes when each step ended; at step `at` it tells another
    process (started, torch imported, before the run) to ask what a resume would take and whether
    checkpoint `uploading` is whole yet, as a restarted worker would."""

    def __init__(self, checkpoints: str, at: int, uploading: int, go: Path) -> None:
        self.at, self.go = at, str(go)
        self.ended: dict[int, float] = {}
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, checkpoints, str(uploading), self.go],
                                     stdout=subprocess.PIPE, text=True)

    def __call__(self, step: int, runtime) -> None:
        self.ended[step] = time.time()
        if step == self.at:
            Path(self.go).write_text("")

    def seen(self):
        out, _ = self.proc.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])


def test_uploads_overlap_the_steps_and_a_resume_takes_the_last_whole(slow_s3, tmp_path):
    rows = rows_for(tiny_cfg(tmp_path), str(tmp_path), train_limit=64, eval_limit=0)
    cfg = tiny_cfg(tmp_path, f"run.output_dir={slow_s3}/run", "train.max_steps=90", "train.save_every=30", "train.epochs=4",
                   "train.keep_checkpoints=0", "train.threads=1", "train.log_every=12", "train.micro_batch_size=2")
    probe = Probe(f"{slow_s3}/run/t", at=61, uploading=60, go=tmp_path / "go")
    result = train_rows(cfg, rows, local=True, extras=Extras(hooks=[probe], tasks=[], export=False))
    assert result.metrics["step"] == 90
    uploads = result.goodput["uploads"]
    print("uploads (step, s, bytes):", [(u["step"], u["seconds"], u["bytes"]) for u in uploads])
    print("step ends:", {s: round(t - probe.ended[1], 2) for s, t in probe.ended.items()})
    print("uploads from-to:", [(round(u["start"] - probe.ended[1], 2), round(u["end"] - probe.ended[1], 2)) for u in uploads])
    print(result.goodput["line"], result.goodput["seconds"])

    latest, problem = probe.seen()
    assert latest is not None and latest.rstrip("/").endswith("checkpoint_000030"), latest
    assert problem is not None and problem.startswith("partial"), problem  # 60 still uploading

    uploads = result.goodput["uploads"]
    assert [u["step"] for u in uploads] == [30, 60, 90], uploads
    print("uploads:", [(u["step"], u["seconds"], u["bytes"]) for u in uploads])
    assert all(u["bytes"] / u["seconds"] < RATE * 1.2 for u in uploads)  # the throttle held them back
    assert [os.path.basename(f.path) for f in ckpt.scan(f"{slow_s3}/run/t") if f.problem is None] == \
        ["checkpoint_000030", "checkpoint_000060", "checkpoint_000090"]

    t = probe.ended
    during, without = [], []
    for s in range(2, 91):
        if s % 30 == 0 or s == 61:
            continue  # these steps saved (the local save is their checkpoint time), 61 started the probe
        window = any(u["start"] <= t[s - 1] and t[s] <= u["end"] for u in uploads[:2])
        (during if window else without).append(t[s] - t[s - 1])
    ratio = statistics.median(during) / statistics.median(without)
    print(f"{len(during)} steps during an upload, median {statistics.median(during) * 1000:.0f} ms; "
          f"{len(without)} without, {statistics.median(without) * 1000:.0f} ms: {ratio:.3f}x")
    assert len(during) >= 4 and len(without) >= 8
    assert ratio <= 1.1
