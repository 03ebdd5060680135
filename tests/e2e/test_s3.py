"""Object storage end to end, as on a cloud cluster with no shared disk: a real S3-compatible
server (moto's), credentials and endpoint in the AWS_* variables users set, two Ray nodes
with temp dirs of their own, an `mlflow server` keeping its artifacts in the bucket.

Records are read from the bucket, prepare writes rows there, training reads them and writes
checkpoints there; the worker is killed after a checkpoint and Ray Train restarts it from the
bucket; the final weights equal those of an uninterrupted `--local` run on the same rows (also
in the bucket); the model is exported to the bucket, MLflow's artifacts land in it, and
`chatsft eval` reads the model back from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatsft import storage
from tests.clusterkit import TwoNodes
from tests.conftest import MlflowServer, free_port
from tests.faults import ExitOnce
from tests.ray.trainkit import Timer, tiny_cfg, weights

pytestmark = pytest.mark.slow
BUCKET = "chatsft-e2e"
REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "platform" / "chatsft" / "samples"


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 and a bucket in it; the AWS_* variables point at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "chatsft", "AWS_SECRET_ACCESS_KEY": "chatsft-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def _head(path: Path, n: int) -> str:
    with open(path, encoding="utf-8") as f:
        return "".join(next(f) for _ in range(n))


def test_s3_end_to_end(s3, tmp_path, monkeypatch, request):
    import ray

    from chatsft.plan import RunPlan
    from chatsft.train.data import count_rows
    from chatsft.train.driver import Extras, Rows, train, train_on_rows

    bucket = f"s3://{BUCKET}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # a loaded CI machine answers slowly
    storage.write_text(f"{bucket}/records/train.jsonl", _head(SAMPLES / "train.jsonl", 40))
    storage.write_text(f"{bucket}/records/heldout.jsonl", _head(SAMPLES / "heldout.jsonl", 8))
    run = ["train.max_steps=6", "train.save_every=2", "train.micro_batch_size=2", "train.grad_accum=2",
           "train.schedule=cosine", "train.warmup_steps=2", "scaling.max_failures=1", "train.keep_checkpoints=2",
           f"data.train={bucket}/records/train.jsonl", f"data.eval={bucket}/records/heldout.jsonl",
           "eval.tasks=[]", "run.name=s3"]

    server = MlflowServer(tmp_path / "mlflow", artifacts=f"{bucket}/mlflow").start()
    request.addfinalizer(server.stop)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # chatsft reaches workers as py_modules
    cluster = TwoNodes(tmp_path / "ray", env).start()
    request.addfinalizer(cluster.stop)
    marker = tmp_path / "killed-once"
    ray.shutdown()  # an earlier test may have left a Ray running
    monkeypatch.setenv("RAY_ADDRESS", cluster.gcs)
    try:
        cfg = tiny_cfg(tmp_path, *run, f"run.output_dir={bucket}/run", "tracking.enabled=true",
                       f"tracking.uri={server.uri}", "tracking.experiment=s3")
        with Timer():
            # prepare on the cluster, train; the worker exits after step 3 (latest checkpoint: 2)
            result = train(cfg, hooks=[ExitOnce(3, marker)])
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    finally:
        ray.shutdown()
        cluster.stop()
        monkeypatch.delenv("RAY_ADDRESS")

    # rows, checkpoints and the model are in the bucket
    assert storage.list_files(f"{bucket}/run/data/train", suffix=".parquet")
    assert storage.exists(f"{bucket}/run/data/train/stats.json")
    assert marker.exists(), "the worker was never killed"
    assert result.metrics["step"] == 6
    assert result.checkpoint == f"{bucket}/run/s3/checkpoint_000006", result.checkpoint
    assert storage.exists(f"{bucket}/run/s3/checkpoint_000006/train_state_rank0.json")
    assert result.model_dir == f"{bucket}/run/model"
    assert storage.exists(f"{bucket}/run/model/config.json")

    # the same rows, uninterrupted, with --local (also on s3): the same final weights
    data = f"{bucket}/run/data"
    rows = Rows(f"{data}/train", f"{data}/eval", count_rows(f"{data}/train"), count_rows(f"{data}/eval"))
    straight = train_on_rows(RunPlan.resolve(tiny_cfg(tmp_path, *run, f"run.output_dir={bucket}/straight"),
                                             local=True), rows, Extras(tasks=[]))
    a, b = (weights(_download(d, tmp_path / name)) for d, name in
            ((straight.model_dir, "straight"), (result.model_dir, "resumed")))
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # MLflow: the run's artifacts (data stats, the model) are objects in the bucket
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
            for o in page.get("Contents", [])]
    assert any(k.endswith(f"{result.run_id}/artifacts/data/train/stats.json") for k in keys), keys[:20]
    assert any("/model/" in k or "/models/" in k for k in keys), keys[:20]
    server.stop()

    # `chatsft eval` reads the exported model back from the bucket
    config = tmp_path / "eval.yaml"
    config.write_text(cfg.to_yaml())
    out = subprocess.run([sys.executable, "-m", "chatsft.cli", "eval", str(config), "--model", result.model_dir,
                          "tracking.enabled=false"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"eval of {result.model_dir}" in out.stdout
    loss = float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("eval_loss")))
    assert loss == pytest.approx(result.metrics["eval_loss"], rel=1e-4), out.stdout


def _download(uri: str, local: Path) -> str:
    storage.copy_tree(uri, str(local))
    return str(local)


def test_parquet_source_in_a_bucket_reads_row_groups_as_locally(s3, tmp_path):
    """A glob of Parquet files in the bucket: their row groups are the read units, and what they
    yield (rows numbered from 1 in each file, the JSON of each record) is what the same files give
    on a local disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatsft.pipeline.read import plan_units, read_lines, row_groups
    from chatsft.sources import expand_source

    records = [json.loads(x) for x in (SAMPLES / "train.jsonl").read_text().splitlines()[:40]]
    for name, part in (("a.parquet", records[:25]), ("b.parquet", records[25:])):
        pq.write_table(pa.Table.from_pylist([{"id": i, **r} for i, r in enumerate(part)]), tmp_path / name,
                       row_group_size=4)
        s3.upload_file(str(tmp_path / name), BUCKET, f"chats/{name}")

    def rows(spec):
        files = expand_source(spec)
        units = plan_units(files, lambda asked: [], groups=lambda fis: [row_groups(files[i].location) for i in fis])
        out = [(files[fi].display.rsplit("/", 1)[1], n, raw) for b in read_lines(files, units)
               for fi, n, raw in zip(b["file_idx"].to_pylist(), b["line"].to_pylist(), b["raw"].to_pylist())]
        return files, units, out

    files, units, remote = rows(f"s3://{BUCKET}/chats/*.parquet")
    assert [f.display for f in files] == [f"s3://{BUCKET}/chats/a.parquet", f"s3://{BUCKET}/chats/b.parquet"]
    assert all(f.format == "parquet" and not f.local for f in files) and len(units) == 7 + 4
    _, _, local = rows(str(tmp_path / "*.parquet"))
    assert remote == local and len(remote) == 40 and remote[25][:2] == ("b.parquet", 1)
