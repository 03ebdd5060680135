"""Checkpoint uploads that never block a step (train/upload.py), to a slow object store: moto's
S3 server behind a proxy that passes uploads at 3 MB/s (benchmarks/slow_s3.py, its own process).

A --local run of 90 steps saves every 15 steps (15 MB each) to s3:// at 3 MB/s. Checked: each
upload ran while later steps trained (steps ended before it did; their time against the steps
after it is printed); a step into the upload of checkpoint 45, that checkpoint is
not yet whole and the checkpoint a resume takes is 30; at the end every
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
RATE = 3_000_000  # bytes per second, every upload connection together (an upload takes 5 s)


@pytest.fixture
def slow_s3(monkeypatch):
    """The throttled S3 (its own process); AWS_* point at the proxy, the bucket made directly."""
    import boto3

    # niced a little: the object store is another machine, its CPU not the trainer's (here they
    # share 2 cores), but starved it would take longer than a checkpoint interval
    proc = subprocess.Popen(["nice", "-n", "5", sys.executable, str(REPO / "benchmarks" / "slow_s3.py"), str(RATE)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        _, moto_port, proxy_port = proc.stdout.readline().split()
        env = {"AWS_ACCESS_KEY_ID": "chatsft", "AWS_SECRET_ACCESS_KEY": "chatsft-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        # what another node sees: the store itself, not this trainer's throttled link to it
        monkeypatch.setenv("SLOW_S3_DIRECT", f"http://127.0.0.1:{moto_port}")
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
        env = dict(os.environ, AWS_ENDPOINT_URL=os.environ["SLOW_S3_DIRECT"])
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, checkpoints, str(uploading), self.go],
                                     stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, step: int, runtime) -> None:
        self.ended[step] = time.time()
        if step == self.at:
            Path(self.go).write_text("")

    def seen(self):
        out, _ = self.proc.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])


def test_uploads_overlap_the_steps_and_a_resume_takes_the_last_whole(slow_s3, tmp_path):
    rows = rows_for(tiny_cfg(tmp_path), str(tmp_path), train_limit=64, eval_limit=0)
    cfg = tiny_cfg(tmp_path, f"run.output_dir={slow_s3}/run", "train.max_steps=90", "train.save_every=15", "train.epochs=4",
                   "train.keep_checkpoints=0", "train.threads=1", "train.log_every=12", "train.micro_batch_size=2")
    probe = Probe(f"{slow_s3}/run/t", at=46, uploading=45, go=tmp_path / "go")
    result = train_rows(cfg, rows, local=True, extras=Extras(hooks=[probe], tasks=[], export=False))
    assert result.metrics["step"] == 90
    print(result.goodput["line"])

    latest, problem = probe.seen()
    assert latest is not None and latest.rstrip("/").endswith("checkpoint_000030"), latest
    assert problem is not None and problem.startswith("partial"), problem  # 45 still uploading

    uploads = result.goodput["uploads"]
    assert [u["step"] for u in uploads] == [15, 30, 45, 60, 75, 90], uploads
    print("uploads:", [(u["step"], u["seconds"], u["bytes"]) for u in uploads])
    assert all(u["bytes"] / u["seconds"] < RATE * 1.2 for u in uploads)  # the throttle held them back
    assert [os.path.basename(f.path) for f in ckpt.scan(f"{slow_s3}/run/t") if f.problem is None] == \
        [f"checkpoint_{s:06d}" for s in (15, 30, 45, 60, 75, 90)]

    # Each checkpoint interval: its steps during the upload against its steps after it (side by
    # side in time, as this machine's load drifts); the steps that saved or probed left out.
    t = probe.ended
    ratios, during_all, after_all = [], [], []
    for u in uploads[:-1]:
        steps = range(u["step"] + 2, u["step"] + 15)
        during = [t[s] - t[s - 1] for s in steps if t[s] <= u["end"] and s != 46]
        after = [t[s] - t[s - 1] for s in steps if t[s - 1] >= u["end"] and s != 46]
        during_all += during
        after_all += after
        if len(during) >= 2 and len(after) >= 2:
            ratios.append(statistics.median(during) / statistics.median(after))
    print(f"per interval, median step during an upload / after it: {[round(r, 3) for r in ratios]}; "
          f"{len(during_all)} steps during, {len(after_all)} after")
    # Never blocking: steps ended while each upload ran (a synchronous upload has none). The
    # step-time ratio is a speed figure, printed here and measured by benchmarks/goodput.py: on a
    # shared 2-core machine the uploader's thread competes with the step for the same cores.
    overlapped = [sum(1 for s in range(u["step"] + 1, u["step"] + 15) if t[s] <= u["end"]) for u in uploads[:-1]]
    assert all(n >= 2 for n in overlapped), overlapped
